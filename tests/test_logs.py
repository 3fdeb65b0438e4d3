"""Logs an attacker cannot fill: bytes of log per bad request, and the cap on every log line.

First release: 300 bad requests (a 100 KB wrong-arity call, an unknown parameter, an
unknown event id) added 10.9 MB to the frontend's log, a traceback each and every
input of the wrong-arity call. Now: at most one line per refused request (at INFO,
the level the ``direct`` deployment runs at), no inputs, no traceback.
"""

from __future__ import annotations

import logging
import logging.config
import sys

import httpx
import pytest

from splitspace.shared.config.logs import LogCap, route_gradio_tracebacks, uvicorn_log_config
from tests.support import Deployment, wait_for

MARKER = "zq-marker-"
"""A string inside every bad input: it must never reach a log."""
BYTES_PER_REQUEST = 200


def _bad_requests(d: Deployment, tier: str, rounds: int) -> int:
    base = (d.frontend if tier == "frontend" else d.backend).url  # type: ignore[union-attr]
    api = "generate" if tier == "frontend" else "no_such_api"
    sent = 0
    with httpx.Client(timeout=30) as c:
        for i in range(rounds):
            # A wrong-arity call of 100 KB (over the body limit), and one that fits.
            c.post(f"{base}/gradio_api/call/{api}", json={"data": [MARKER * 10_000, i]})
            c.post(f"{base}/gradio_api/call/{api}", json={"data": [MARKER * 100, i]})
            c.post(f"{base}/gradio_api/call/v2/{api}", json={"prompt": MARKER, f"{MARKER}{i}": 1})
            c.get(f"{base}/gradio_api/call/{api}/{MARKER}{i}")
            sent += 4
    return sent


def _logging_again(d: Deployment, tier: str) -> bool:
    """Whether one more refused call gets its line in the log now: not while the log cap's
    window is spent (``direct`` is shared: the tests before may have spent it, e.g. test_guard's)."""
    proc = d.frontend if tier == "frontend" else d.backend
    assert proc is not None
    api = "generate" if tier == "frontend" else "no_such_api"
    before = proc.log_path.stat().st_size
    httpx.post(f"{proc.url}/gradio_api/call/v2/{api}", json={"prompt": "probe", "probe": 1}, timeout=30)
    return wait_for(lambda: "refused POST" in proc.log_path.read_bytes()[before:].decode("utf-8", "replace"), 1, 0.05)


@pytest.mark.parametrize("tier", ["frontend", "backend"])
def test_bad_requests_cost_at_most_one_short_line_each(direct: Deployment, tier: str) -> None:
    proc = direct.frontend if tier == "frontend" else direct.backend
    assert proc is not None
    assert wait_for(lambda: _logging_again(direct, tier), 30, 0.5), "the log cap never let a line through"
    before = proc.log_path.stat().st_size
    sent = _bad_requests(direct, tier, 75)  # 300 requests
    grown = proc.log_path.stat().st_size - before
    added = proc.log_path.read_bytes()[before:].decode("utf-8", "replace")
    print(f"\n{tier}: {grown} bytes, {len(added.splitlines())} lines of log for {sent} bad requests")
    assert grown <= sent * BYTES_PER_REQUEST, f"{grown} bytes of log for {sent} bad requests"
    assert len(added.splitlines()) <= sent, added[-2000:]
    assert MARKER not in added, "an input reached the log"
    assert "Traceback" not in added, added[-3000:]
    assert "refused POST" in added  # the one line: at INFO, each refusal says what and why


# -- the cap itself ---------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _record(msg: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("t", logging.ERROR, __file__, 1, msg, args, exc_info)


def test_a_long_message_is_cut_and_says_its_length() -> None:
    cap = LogCap(max_chars=100)
    record = _record("value: %s", "x" * 10_000)
    assert cap.filter(record)
    text = record.getMessage()
    assert len(text) < 200 and "cut" in text


def test_a_traceback_keeps_its_end() -> None:
    cap = LogCap(max_traceback_chars=300)

    def deep(n: int) -> None:
        if n == 0:
            raise ValueError("the real cause")
        deep(n - 1)

    try:
        deep(50)
    except ValueError as exc:
        record = _record("failed", exc=exc)
    assert cap.filter(record)
    text = logging.Formatter().format(record)
    assert "the real cause" in text and len(text) < 600 and "cut" in text


def test_records_over_the_burst_are_dropped_and_counted() -> None:
    clock = FakeClock()
    cap = LogCap(burst=3, window_s=10, clock=clock)
    passed = [cap.filter(_record("line %d", i)) for i in range(10)]
    assert passed == [True] * 3 + [False] * 7
    clock.now = 10.5
    record = _record("after")
    assert cap.filter(record)
    assert "7 log records dropped" in record.getMessage()


def test_uvicorns_access_records_keep_their_arguments() -> None:
    cap = LogCap(max_chars=60)
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:1", "GET", "/" + "a" * 500, "1.1", 404),
        None,
    )
    assert cap.filter(record)
    assert isinstance(record.args, tuple) and len(record.args) == 5 and record.args[4] == 404
    assert len(record.getMessage()) < 200


def test_gradio_printed_tracebacks_go_through_logging(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    import gradio.queueing

    route_gradio_tracebacks()
    try:
        raise KeyError("inside gradio")
    except KeyError:
        with caplog.at_level(logging.ERROR, logger="gradio.traceback"):
            gradio.queueing.traceback.print_exc()
    assert any(r.name == "gradio.traceback" and r.exc_info for r in caplog.records)
    assert "inside gradio" not in capsys.readouterr().err  # not printed past the log's cap
    assert gradio.queueing.traceback.format_exc is not None  # the rest of the module is untouched


def test_every_handler_of_the_server_config_is_capped() -> None:
    config = uvicorn_log_config("info")
    assert config["root"]["level"] == "INFO"
    assert all(h.get("filters") == ["cap"] for h in config["handlers"].values())
    logging.config.dictConfig(config)  # what uvicorn does with it
    try:
        filters = {id(f) for h in logging.getLogger().handlers for f in h.filters}
        filters |= {id(f) for h in logging.getLogger("uvicorn").handlers for f in h.filters}
        assert len(filters) == 1  # one budget for the whole process
    finally:
        logging.getLogger().handlers.clear()
        logging.getLogger().setLevel(logging.WARNING)
        sys.stderr.flush()
