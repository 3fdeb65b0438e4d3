"""The public CPU tier: the Gradio UI and API, validation, forwarding to the GPU tier."""
