"""Plain Gradio frontend ("CPU tier") -- baseline, no custom fairness.

Same two endpoints as the backend; each forwards through ONE shared
gradio_client.Client (created once at startup) to the backend.
default_concurrency_limit=10, as a typical CPU tier would use.

Caller identity: the incoming `x-user` header is forwarded per call with
Client.predict(..., headers={...}) (supported by gradio_client 2.x; note that
per-call headers only reach the queue/join POST and that Client-constructor
headers win over per-call ones on key collision -- gradio_client's client.py).

usage: python frontend.py PORT BACKEND_URL
"""

import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import gradio as gr  # noqa: E402
from gradio_client import Client  # noqa: E402

PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 7862
BACKEND = sys.argv[2] if len(sys.argv) > 2 else "http://127.0.0.1:7861/"

# One shared client for the whole process (max_workers=40 is gradio_client's default).
client = Client(BACKEND, verbose=False, download_files=False, analytics_enabled=False)


def _hdrs(request: gr.Request | None) -> dict:
    user = request.headers.get("x-user") if request is not None else None
    return {"x-user": user} if user else {}


def work(ms: float, request: gr.Request) -> str:
    return client.predict(ms, api_name="/work", headers=_hdrs(request))


def echo(s: str, request: gr.Request) -> str:
    return client.predict(s, api_name="/echo", headers=_hdrs(request))


with gr.Blocks() as demo:
    gr.api(work, api_name="work")  # concurrency_limit="default" -> 10
    gr.api(echo, api_name="echo")  # concurrency_limit="default" -> 10

if __name__ == "__main__":
    demo.queue(default_concurrency_limit=10)
    demo.launch(
        server_name="127.0.0.1",
        server_port=PORT,
        quiet=True,
        show_error=True,
        ssr_mode=False,
    )
