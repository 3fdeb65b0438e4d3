"""OpenAI images API benchmark: the SDK's ``images.generate`` vs the same request through Gradio's REST flow.

One deployment (``sleep:0``: the GPU costs nothing, so what is measured is the frontend's
path), one key, sequential calls, the flows interleaved round by round so that the
machine's drift hits each alike:

- ``openai sdk``: ``OpenAI(base_url=.../v1).images.generate(n=1, size=64x64)``, the PNG in
  the answer (``b64_json``);
- ``httpx /v1``: the same POST made with httpx (the SDK's own cost taken out);
- ``gradio rest``: ``POST /gradio_api/call/generate`` then its event stream (the curl flow),
  which ends with the image's URL;
- ``gradio rest + file``: that, and the GET of the PNG (what a caller needs to hold the
  image, as the SDK's answer does).

Run: python bench/openai_images.py [--seq 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Deployment, bench_quotas, median, pct  # noqa: E402

KEY = "key-openai-bench"
QUOTAS = bench_quotas(
    {"bench": (KEY, "bulk")},
    "\n[tiers.bulk]\nweight = 1\nmax_running = 1\nmax_queued = 1000\ngpu_seconds = 1e9\nwindow_s = 3600\n",
)
FIELDS: dict[str, Any] = {
    "prompt": "bench",
    "negative_prompt": "",
    "width": 64,
    "height": 64,
    "steps": 1,
    "guidance_scale": 0.0,
    "seed": 1,
}
GRADIO_DATA = list(FIELDS.values())
OPENAI_BODY = {"prompt": "bench", "n": 1, "size": "64x64", "steps": 1, "guidance_scale": 0.0, "seed": 1}


def flows(url: str) -> dict[str, Callable[[], None]]:
    headers = {"authorization": f"Bearer {KEY}"}
    sdk = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    http = httpx.Client(timeout=60, headers=headers)

    def openai_sdk() -> None:
        extra = {k: v for k, v in OPENAI_BODY.items() if k not in ("prompt", "n", "size")}
        result = sdk.images.generate(prompt="bench", n=1, size="64x64", extra_body=extra)  # type: ignore[arg-type]
        assert result.data[0].b64_json, result

    def httpx_v1() -> None:
        r = http.post(f"{url}/v1/images/generations", json=OPENAI_BODY)
        assert r.status_code == 200 and r.json()["data"][0]["b64_json"], r.text

    def gradio_rest(fetch: bool = False) -> None:
        r = http.post(f"{url}/gradio_api/call/generate", json={"data": GRADIO_DATA})
        event_id = r.json()["event_id"]
        event, payload = "", None
        with http.stream("GET", f"{url}/gradio_api/call/generate/{event_id}") as s:
            for line in s.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    payload = json.loads(line[5:])
                    break
        assert event == "complete", payload
        if fetch:
            assert payload is not None
            image = http.get(payload[0]["url"])
            assert image.status_code == 200 and image.content.startswith(b"\x89PNG")

    return {
        "openai sdk": openai_sdk,
        "httpx /v1": httpx_v1,
        "gradio rest": gradio_rest,
        "gradio rest + file": lambda: gradio_rest(fetch=True),
    }


def timed(call: Callable[[], None], n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=200, help="calls per flow per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, flows interleaved")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="splitspace-openai-"))
    d = Deployment(work, model="sleep:0", quotas=QUOTAS).start()
    try:
        assert d.frontend is not None
        calls = flows(d.frontend.url)
        for call in calls.values():  # warm up connections and caches
            timed(call, 20)
        times: dict[str, list[float]] = {name: [] for name in calls}
        p50s: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                t = timed(call, args.seq)
                times[name] += t
                p50s[name].append(median(t))
        base = median(p50s["gradio rest"]) * 1000
        print(
            f"\n== openai images: sequential calls, {args.rounds} interleaved rounds of {args.seq} "
            f"(sleep:0, 64x64, one key) =="
        )
        print(f"{'flow':<22}{'p50 ms':>8}{'p95 ms':>8}{'vs gradio rest':>16}")
        for name in calls:
            p50 = median(p50s[name]) * 1000
            print(f"{name:<22}{p50:>8.2f}{pct(times[name], 95) * 1000:>8.2f}{p50 - base:>+15.2f}ms")
        print("(p50: the median of the rounds' medians; vs gradio rest: its p50 minus the Gradio REST flow's)")
    finally:
        d.stop()


if __name__ == "__main__":
    main()
