"""A developer's app for the tests: GPU functions of each shape splitspace carries, and one
function without the decorator, which stays on the frontend.

    SPLITSPACE_APP=tests/apps/studio.py splitspace dev
"""

import time
from pathlib import Path

import gradio as gr
import numpy as np

import splitspace


@splitspace.gpu(duration=0.5)
def mirror(picture: np.ndarray) -> np.ndarray:
    """The picture flipped left to right."""
    return picture[:, ::-1]


@splitspace.gpu(duration=0.1)
def stats(text: str) -> tuple[str, int]:
    """Two outputs: the text in capitals, and its length."""
    return text.upper(), len(text)


def count(text: str) -> int:
    """No decorator: runs on the frontend, as in plain Gradio."""
    return len(text.split())


@splitspace.gpu(duration=0.1)
def nap(ms: float) -> str:
    """Holds the GPU for ``ms`` milliseconds."""
    time.sleep(float(ms) / 1000)
    return "rested"


@splitspace.gpu(duration=1)
def hold(path: str) -> str:
    """Holds the GPU until the test creates the file at ``path`` (at most a minute)."""
    deadline = time.monotonic() + 60
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the test never released the GPU")
        time.sleep(0.02)
    return "released"


@splitspace.gpu(batch=True, max_batch_size=4, duration=lambda xs: 0.1 * len(xs))
def double(xs: list[float]) -> list[list[float]]:
    """Gradio's batch semantics: each value doubled, and how many calls shared the batch.
    A negative value fails the whole batch (as a bad input can fail a model's batch)."""
    if any(x < 0 for x in xs):
        raise ValueError("a negative value")
    return [[2 * x for x in xs], [len(xs)] * len(xs)]


@splitspace.gpu(duration=0.1)
def countdown(n: float):  # noqa: ANN201 (a generator)
    """A generator: each yield is streamed, the last one is the result (tests/apps/streams.py has more)."""
    for i in range(int(n), -1, -1):
        yield str(i)


@splitspace.gpu
def fussy(text: str) -> str:
    if text == "bad":
        raise gr.Error("no bad words here", title="Fussy")
    if text == "boom":
        raise ValueError("/secret/path/model.py exploded")
    return text


with gr.Blocks() as demo:
    picture = gr.Image(type="numpy", label="Picture")
    mirrored = gr.Image(type="numpy", format="png", label="Mirrored")
    text = gr.Textbox(label="Text")
    shouted = gr.Textbox(label="Shouted")
    length = gr.Number(label="Length", precision=0)
    words = gr.Number(label="Words", precision=0)
    ms = gr.Number(label="Milliseconds")
    path = gr.Textbox(label="Path")
    rested = gr.Textbox(label="Rested")
    x = gr.Number(label="X")
    doubled = gr.Number(label="Doubled")
    batch_size = gr.Number(label="Batch size", precision=0)
    go = gr.Button("Go")
    go.click(mirror, picture, mirrored, api_name="mirror")
    go.click(stats, text, [shouted, length], api_name="stats")
    go.click(count, text, words, api_name="count")
    go.click(nap, ms, rested, api_name="nap")
    go.click(hold, path, rested, api_name="hold")
    go.click(double, x, [doubled, batch_size], api_name="double", batch=True, max_batch_size=4)
    go.click(fussy, text, shouted, api_name="fussy")
    go.click(countdown, x, shouted, api_name="countdown")

if __name__ == "__main__":
    demo.launch()
