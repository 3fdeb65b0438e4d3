"""What machines reach beyond the page: MCP's loopback, Gradio's per-call costs removed,
OpenAI's images API (``/v1``).

May import splitspace.shared; the OpenAI route also the door (``door/``) and splitspace.session,
to go in as every other call does.
"""
