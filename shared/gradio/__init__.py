"""Gradio's mechanisms both tiers adjust: handler signatures, queue bounds, session bounds.

May import contract and config.
"""
