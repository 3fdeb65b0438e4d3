"""Fairness at the frontend's door: per-client lines, caps and the in-flight ledger.

May import splitspace.shared and splitspace.session; no Gradio page code.
"""
