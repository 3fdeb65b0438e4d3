"""The user's function that bench/app.py's noisy neighbour measures: 100 ms on the "GPU".

``splitspace`` serves it on two tiers (``SPLITSPACE_APP=bench/sleep_app.py``); run as a script
it is one plain Gradio tier (``GRADIO_SERVER_PORT=PORT python bench/sleep_app.py``), the
decorator changing nothing there, with Gradio's default one slot for the event (one GPU).
"""

import time

import gradio as gr

import splitspace


@splitspace.gpu(duration=0.1)
def work(text: str) -> str:
    """Hold the GPU for 100 ms."""
    time.sleep(0.1)
    return text


demo = gr.Interface(work, gr.Textbox(label="Text"), gr.Textbox(label="Same text"), api_name="work")

if __name__ == "__main__":
    demo.launch()
