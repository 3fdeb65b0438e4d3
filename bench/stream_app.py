"""The generator that bench/stream.py measures, as a splitspace app and as a plain Gradio tier.

``splitspace`` serves it on two tiers (``SPLITSPACE_APP=bench/stream_app.py``); run as a
script it is one plain Gradio tier (``python bench/stream_app.py PORT``), the decorator
changing nothing there, with one slot for the event (one GPU). Each chunk carries its index
and the time it was made (``time.time()``), which the benchmark compares with its arrival.
"""

import asyncio
import os
import sys
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import gradio as gr  # noqa: E402

import splitspace  # noqa: E402


@splitspace.gpu(duration=lambda n, every_ms: max(0.01, float(n) * float(every_ms) / 1000))
def chunks(n: float, every_ms: float):  # noqa: ANN201 (a generator)
    """``n`` chunks, ``every_ms`` apart (the GPU busy meanwhile)."""
    for i in range(int(n)):
        if i:
            time.sleep(float(every_ms) / 1000)
        yield f"{i} {time.time():.6f}"


@splitspace.gpu(duration=lambda n, every_ms: max(0.01, float(n) * float(every_ms) / 1000))
async def achunks(n: float, every_ms: float):  # noqa: ANN201 (an async generator)
    """``chunks`` as an async generator."""
    for i in range(int(n)):
        if i:
            await asyncio.sleep(float(every_ms) / 1000)
        yield f"{i} {time.time():.6f}"


with gr.Blocks() as demo:
    n, every, out = gr.Number(label="Chunks"), gr.Number(label="Every ms"), gr.Textbox(label="Chunk")
    go = gr.Button("Go")
    go.click(chunks, [n, every], out, api_name="chunks", concurrency_limit=1)
    go.click(achunks, [n, every], out, api_name="achunks", concurrency_limit=1)

if __name__ == "__main__":
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name="127.0.0.1",
        server_port=int(sys.argv[1]) if len(sys.argv) > 1 else 7870,
        quiet=True,
        show_error=True,
        ssr_mode=False,
    )
