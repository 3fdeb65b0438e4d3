"""A developer's app for the streaming tests: generator functions on the GPU tier.

Each yield carries the time it was produced (``time.time()`` on the GPU tier, the same
clock as the tests' on this machine), so a test can tell when each chunk arrived against
when it was made. ``log``, when given, is a file each generator appends one line to per
yield and one ``closed`` line to when it is closed: how far it got, and that it stopped.

    SPLITSPACE_APP=tests/apps/streams.py splitspace dev
"""

import asyncio
import time
from pathlib import Path

import gradio as gr

import splitspace


def _note(log: str, line: str) -> None:
    if log:
        with Path(log).open("a") as f:
            f.write(line + "\n")


@splitspace.gpu(duration=lambda n, every_ms, log: max(0.01, n * every_ms / 1000))
def ticks(n: float, every_ms: float, log: str):  # noqa: ANN201 (a generator)
    """``n`` chunks ``every_ms`` apart: "index time" each."""
    try:
        for i in range(int(n)):
            if i:
                time.sleep(float(every_ms) / 1000)
            now = time.time()
            _note(log, f"{i} {now:.6f}")
            yield f"{i} {now:.6f}"
    finally:
        _note(log, "closed")


@splitspace.gpu(duration=0.05)
async def aticks(n: float, every_ms: float, log: str):  # noqa: ANN201 (an async generator)
    """``ticks`` as an async generator."""
    try:
        for i in range(int(n)):
            if i:
                await asyncio.sleep(float(every_ms) / 1000)
            now = time.time()
            _note(log, f"{i} {now:.6f}")
            yield f"{i} {now:.6f}"
    finally:
        _note(log, "closed")


@splitspace.gpu(duration=0.05, time_limit=1)
def runaway(every_ms: float, log: str):  # noqa: ANN201 (a generator)
    """Never ends by itself: its time limit (1 s) stops it."""
    i = 0
    try:
        while True:
            now = time.time()
            _note(log, f"{i} {now:.6f}")
            yield f"{i} {now:.6f}"
            i += 1
            time.sleep(float(every_ms) / 1000)
    finally:
        _note(log, "closed")


@splitspace.gpu(duration=0.05)
def reply(message: str, history: list):  # noqa: ANN201 (a generator)
    """A gr.Chatbot (messages) answered word by word, 50 ms apart: the history, the answer growing in it."""
    history = [*history, {"role": "user", "content": message}]
    answer = ""
    for i, word in enumerate(message.split()):
        if i:
            time.sleep(0.05)
        answer = f"{answer} {word.upper()}".strip()
        yield "", [*history, {"role": "assistant", "content": answer}]


with gr.Blocks() as demo:
    n = gr.Number(label="Chunks", value=5)
    every = gr.Number(label="Every ms", value=10)
    log = gr.Textbox(label="Log")
    out = gr.Textbox(label="Chunk")
    go = gr.Button("Go")
    go.click(ticks, [n, every, log], out, api_name="ticks")
    go.click(aticks, [n, every, log], out, api_name="aticks")
    go.click(runaway, [every, log], out, api_name="runaway")
    chatbot = gr.Chatbot(label="Chat")
    message = gr.Textbox(label="Message")
    message.submit(reply, [message, chatbot], [message, chatbot], api_name="reply")

if __name__ == "__main__":
    demo.launch()
