"""Header and cookie names that cross the tiers or reach clients.

One place, so that the frontend that writes a header and the GPU tier that
reads it can never disagree on its spelling.
"""

IDENTITY_HEADER = "x-splitspace-identity"
"""Signed cross-tier identity token (frontend -> GPU tier)."""

IP_TOKEN_HEADER = "x-ip-token"
"""Hugging Face ZeroGPU's per-visitor token, forwarded verbatim per call."""

SESSION_COOKIE = "splitspace_session"
"""The browser session cookie set by the frontend."""

ADMIN_HEADER = "x-splitspace-admin"
"""Admin API calls carry the admin token here (``Authorization`` may hold a Hub token)."""

CALLER_HEADER = "x-splitspace-caller"
"""The frontend's signed note of an MCP caller's real address, on Gradio's MCP loopback call
to the frontend itself (written and read by the frontend only; see ``session/caller.py``)."""
