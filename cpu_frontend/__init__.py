"""The public CPU tier: the Gradio UI and API, validation, forwarding to the GPU tier.

``core.py`` holds the tier (identity, validation, the fair door, the hop) with no Gradio
in it; ``app.py`` is its Gradio edge and the app's wiring; ``jobs/`` and ``api/`` are the
other ways in, over the same core.
"""
