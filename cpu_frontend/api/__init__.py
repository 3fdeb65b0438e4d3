"""What machines reach beyond the page: MCP's loopback and Gradio's per-call costs removed.

May import splitspace.shared.
"""
