"""The frontend's Gradio tuning changes when work is done, never what a session holds."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util

import gradio as gr
from gradio import state_holder

from splitspace.cpu_frontend.api import gradio_tuning


def _blocks() -> gr.Blocks:
    with gr.Blocks() as demo:
        prompt = gr.Textbox(label="Prompt")
        width = gr.Slider(64, 1024, 512, step=8, label="Width")
        image = gr.Image(label="Image", type="filepath")
        info = gr.JSON(label="Info")
        gr.Button("Go").click(lambda p, w: (None, {}), [prompt, width], [image, info])
    return demo


def test_applies_to_this_gradio():
    """If Gradio changes the internals it patches, this fails: look at the module again."""
    gradio_tuning.apply()
    assert getattr(state_holder.SessionState, "_splitspace_lazy", False)
    if importlib.util.find_spec("matplotlib") is None:  # nothing to switch: no per-call import attempt
        assert gr.utils.MatplotlibBackendMananger is contextlib.nullcontext


def test_a_lazy_session_holds_what_gradios_own_holds():
    gradio_tuning.apply()
    demo = _blocks()
    original = state_holder.SessionState.__mro__[1]
    eager, lazy = original(demo), state_holder.SessionState(demo)
    assert isinstance(lazy.config_values, gradio_tuning.LazyConfigValues)
    ids = [b._id for b in demo.blocks.values() if isinstance(b, gr.components.Component)]
    prompt_id, width_id, image_id, info_id = ids[:4]
    for state in (eager, lazy):  # what a call does: inputs' and outputs' values into the config
        state._update_value_in_config(prompt_id, "a red fox")
        state._update_value_in_config(width_id, 256)
        state._update_value_in_config(info_id, {"seed": 1})
        state._update_value_in_config(info_id, {"seed": 2})  # the last value wins
        state[image_id] = demo.blocks[image_id]  # a block set into the session
    assert dict.__len__(lazy.config_values) == 1  # only the block set was rendered so far
    assert lazy.config_values.get(prompt_id)["props"]["value"] == "a red fox"
    assert dict(lazy.config_values.items()) == dict(eager.config_values.items())
    assert list(lazy.components) == list(eager.components)


def test_queue_holds_as_many_sessions_as_requests_in_flight():
    """Gradio keeps each session's messages in an LRUCache(2000): the 2,001st REST call in
    flight would evict the first's, whose stream then breaks off. If Gradio changes that
    cache, this fails: look at shared/gradio/gradio_queue.py again."""
    from gradio.utils import LRUCache

    from splitspace.shared.gradio.gradio_queue import hold_sessions

    demo = _blocks()
    demo.queue()
    cache = demo._queue.pending_messages_per_session
    assert isinstance(cache, LRUCache) and cache.max_size == 2000
    assert hold_sessions(demo, 20_000)
    for i in range(5000):
        cache[f"session-{i}"] = object()
    assert "session-0" in cache and len(cache) == 5000


def test_queue_analytics_stay_bounded():
    """Gradio summarises its last 10,000 event records with pandas after every event: a
    cost per call that grows with the calls served. If Gradio changes that, this fails:
    look at shared/gradio/gradio_queue.py again."""
    from splitspace.shared.gradio.gradio_queue import ANALYTICS_EVENTS, ANALYTICS_EVERY, bound_analytics

    demo = _blocks()
    demo.queue()
    queue = demo._queue
    assert (queue.ANALYTICS_MAX_EVENTS, queue.ANAYLTICS_CACHE_FREQUENCY) == (10_000, 1)
    assert isinstance(queue.event_analytics, dict) and callable(queue.compute_analytics_summary)
    assert bound_analytics(demo)
    assert (queue.ANALYTICS_MAX_EVENTS, queue.ANAYLTICS_CACHE_FREQUENCY) == (ANALYTICS_EVENTS, ANALYTICS_EVERY)


def test_finished_sessions_are_forgotten():
    """Gradio keeps a session's entry after its last event ends, for good. The sweep drops
    it, and keeps a session with an event pending or a message not yet read."""
    from gradio.utils import LRUCache

    from splitspace.shared.gradio.gradio_queue import forget_finished_sessions

    demo = _blocks()
    demo.queue()
    queue = demo._queue
    assert isinstance(queue.pending_event_ids_session, dict)
    assert isinstance(queue.pending_messages_per_session, LRUCache)
    for session, pending, unread in (("done", set(), False), ("busy", {"e1"}, False), ("unread", set(), True)):
        queue.pending_event_ids_session[session] = pending
        queue.pending_messages_per_session[session] = asyncio.Queue()
        if unread:
            queue.pending_messages_per_session[session].put_nowait("a message")
    assert forget_finished_sessions(demo) == 1
    assert set(queue.pending_event_ids_session) == {"busy", "unread"}
    assert "done" not in queue.pending_messages_per_session and "busy" in queue.pending_messages_per_session


def test_a_closed_pages_session_state_is_given_back():
    """Gradio keeps a ``SessionState`` per session in ``StateHolder.session_data`` (up to
    ``state_session_capacity``, 10,000): the ``unload`` handlers make one when a page's
    heartbeat stream ends, and nothing removes it. shared/gradio/gradio_sessions.py bounds the
    capacity and drops a closed page's state. If Gradio changes the heartbeat route or the
    holder, this fails: look at shared/gradio/gradio_sessions.py again."""
    from splitspace.shared.gradio.gradio_sessions import (
        HeartbeatCap,
        OpenHeartbeats,
        bound_session_states,
        forget_finished_states,
        session_count,
    )
    from tests.support import serve_in_thread, wait_for

    unloads: list[str] = []

    def page() -> gr.Blocks:
        demo = _blocks()

        def on_unload(request: gr.Request) -> None:  # as the frontend's page
            unloads.append(str(request.session_hash))

        demo.unload(on_unload)
        demo.queue()
        return demo

    def open_and_close(url: str, session: str) -> bytes:
        import socket

        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(f"GET /gradio_api/heartbeat/{session} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            head = b""
            while b"ALIVE" not in head and b"\r\n\r\n{" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
        return head

    plain = page()
    assert plain.state_session_capacity == 10_000
    with serve_in_thread(gr.mount_gradio_app(gr.routes.App(), plain, path="")) as url:
        assert b"ALIVE" in open_and_close(url, "s1")
        assert wait_for(lambda: unloads == ["s1"], 30)
        assert wait_for(lambda: session_count(plain) == 1, 30)  # Gradio keeps the closed page's state

    capped = page()
    assert bound_session_states(capped, 3)
    app = gr.mount_gradio_app(gr.routes.App(), capped, path="")
    assert capped.state_holder.capacity == 3  # Gradio's own bound, read when the app is mounted
    app.add_middleware(HeartbeatCap, blocks=capped, address=lambda scope: "a", streams=OpenHeartbeats(1, 1))
    with serve_in_thread(app) as url:
        assert b"ALIVE" in open_and_close(url, "s2")
        assert wait_for(lambda: unloads == ["s1", "s2"], 30)
        assert wait_for(lambda: session_count(capped) == 0, 30)  # given back once its unload ran
        for session in ("a", "b", "c", "d"):
            capped.state_holder[session]
        assert list(capped.state_holder.session_data) == ["b", "c", "d"]
        capped._queue.pending_event_ids_session["c"] = {"an event"}  # a call of "c" still runs
        assert forget_finished_states(capped, open_pages={"d"}) == 2  # "d": its page is open
        assert list(capped.state_holder.session_data) == ["c", "d"]
