"""The frontend's credentials for a private GPU tier on Hugging Face Spaces.

A private Space answers on its direct URL (``https://owner-name.hf.space``) only
to requests that carry a Hub token that can read it, as ``Authorization:
Bearer``. ``splitspace deploy`` sets that token as the frontend Space's
``HF_TOKEN`` secret. It is the same for every call (it authenticates the
frontend Space, never a visitor), so it belongs in the transport's shared
client headers, unlike the per-call identity token and ``x-ip-token``.
Off Spaces, with no ``HF_TOKEN``, nothing is added. ``Settings.hf_token`` reads
the variable (at the edge); the transports take the headers as an argument.
"""

from __future__ import annotations


def backend_auth_headers(hf_token: str | None) -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}`` for a Hub token, else ``{}``."""
    token = (hf_token or "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}
