"""A text function on the GPU tier: the smallest splitspace app.

splitspace dev examples/shout.py
"""

import gradio as gr

import splitspace


@splitspace.gpu(duration=lambda text, times: 0.05 * times)  # as @spaces.GPU(duration=...)
def shout(text: str, times: int) -> str:
    return " ".join([text.upper()] * int(times))


demo = gr.Interface(
    shout,
    [gr.Textbox(label="Text", max_length=200), gr.Slider(1, 5, step=1, value=2, label="Times")],
    gr.Textbox(label="Shouted"),
    api_name="shout",
)

if __name__ == "__main__":
    demo.launch()
