"""Durable jobs (``/v1/jobs``) through the real tiers: caps, places, cancel, owners, idempotency,
restarts, expiry, Redis; and in-process, that a waiting job costs no task."""

from __future__ import annotations

import asyncio
import base64
import signal
import uuid
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from splitspace.cpu_frontend.door.door import FairDoor
from splitspace.cpu_frontend.jobs.runner import JobRunner
from splitspace.cpu_frontend.jobs.sqlite_store import SqliteJobStore
from splitspace.cpu_frontend.jobs.targets import Finished, JobUpdate
from splitspace.cpu_frontend.jobs.webhooks import Deliveries, Sender
from splitspace.session.identity import Identity
from splitspace.shared.contract.calls import Call
from splitspace.shared.contract.hop import Status
from tests.job_support import GENERATE, JOB_QUOTAS, auth, wait_job
from tests.support import Deployment, free_port, gpu_depth, start_tier, wait_for


def post(url: str, body: dict[str, Any], who: str, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/jobs", json=body, headers={**auth(who), **headers}, timeout=10)


def cancel_all(url: str, who: str) -> None:
    for job in httpx.get(f"{url}/v1/jobs?limit=100", headers=auth(who), timeout=10).json()["data"]:
        if job["status"] in ("queued", "running"):
            httpx.post(f"{url}/v1/jobs/{job['id']}/cancel", headers=auth(who), timeout=10)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Both tiers, each image taking 1.5 s (time enough to see places and caps), no webhook allow list."""
    work = tmp_path_factory.mktemp("jobs")
    d = Deployment(
        work, model="sleep:1500", quotas=JOB_QUOTAS, frontend_env={"SPLITSPACE_JOBS_PATH": str(work / "jobs.sqlite3")}
    )
    d.start()
    yield d
    d.stop()


@pytest.fixture
def url(jobs: Deployment) -> Iterator[str]:
    assert jobs.frontend is not None
    yield jobs.frontend.url
    for who in ("plain", "narrow", "hooked"):
        cancel_all(jobs.frontend.url, who)
    wait_for(lambda: gpu_depth(jobs.backend_urls()) == (0, 0), 30)


def test_a_job_runs_and_its_outputs_are_served(url: str) -> None:
    r = post(url, GENERATE, "plain")
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["position"] >= 1 and r.headers["location"] == job["links"]["self"]
    done = wait_job(url, job["id"], auth("plain"))
    assert done["status"] == "succeeded", done
    image, info = done["outputs"]
    assert image["type"] == "file" and image["mime_type"] == "image/png" and info["client"] == "key:plain"
    png = httpx.get(image["url"], headers=auth("plain")).content
    assert png.startswith(b"\x89PNG") and len(png) == image["size"]
    inline = httpx.get(f"{url}/v1/jobs/{job['id']}?include=b64", headers=auth("plain")).json()
    assert base64.b64decode(inline["outputs"][0]["b64"]) == png
    listed = httpx.get(f"{url}/v1/jobs", headers=auth("plain")).json()
    assert listed["data"][0]["id"] == job["id"]
    assert done["started_at"] is not None and done["finished_at"] >= done["started_at"]


def test_invalid_inputs_are_refused_naming_the_input(url: str) -> None:
    cases = {
        "width": {"endpoint": "/generate", "inputs": {"prompt": "x", "width": 63}},
        "colour": {"endpoint": "/generate", "inputs": {"prompt": "x", "colour": "red"}},
        "prompt": {"endpoint": "/generate", "data": []},
        "endpoint": {"endpoint": "/nothing", "inputs": {}},
        "webhook_events.0": {**GENERATE, "webhook_events": ["exploded"]},
        "surprise": {**GENERATE, "surprise": 1},
    }
    for field, body in cases.items():
        r = post(url, body, "plain")
        assert r.status_code == 400, (field, r.text)
        assert r.json()["field"] == field and r.json()["title"] == "Invalid request", r.text
    by_list = post(url, {"endpoint": "generate", "data": ["a fox", "", 64, 64, 1]}, "plain")
    assert by_list.status_code == 202, by_list.text


def test_the_cap_is_the_gradio_apis_and_a_cancel_frees_a_place_at_once(url: str) -> None:
    first, second = post(url, GENERATE, "narrow"), post(url, GENERATE, "narrow")  # max_running 1 + max_queued 1
    assert first.status_code == second.status_code == 202
    over = post(url, GENERATE, "narrow")
    assert over.status_code == 429 and over.json()["title"] == "Queue full" and int(over.headers["retry-after"]) >= 1
    gradio = httpx.post(
        f"{url}/gradio_api/call/generate", headers=auth("narrow"), json={"data": ["a fox", "", 64, 64, 1, 0.0, 1]}
    )
    assert gradio.status_code == 429, "one cap for the jobs and the Gradio API"
    cancelled = httpx.post(f"{url}/v1/jobs/{second.json()['id']}/cancel", headers=auth("narrow"))
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert post(url, GENERATE, "narrow").status_code == 202, "the cancelled job's place is free at once"
    assert httpx.post(f"{url}/v1/jobs/{first.json()['id']}/cancel", headers=auth("narrow")).status_code == 200
    again = httpx.post(f"{url}/v1/jobs/{second.json()['id']}/cancel", headers=auth("narrow"))
    assert again.status_code == 200 and again.json()["status"] == "cancelled", "cancelling twice is no error"


def test_waiting_jobs_have_places_and_cancelling_drops_them_on_the_gpu_tier(url: str, jobs: Deployment) -> None:
    ids = [post(url, GENERATE, "plain").json()["id"] for _ in range(6)]
    # one snapshot of all six (the list): read one by one, a job finishing between two reads moves the rest up
    listed = {v["id"]: v for v in httpx.get(f"{url}/v1/jobs?limit=100", headers=auth("plain")).json()["data"]}
    views = [listed[i] for i in ids]
    assert all(v["status"] in ("queued", "running") for v in views)
    waiting = [v["position"] for v in views[2:]]  # past the door's two per client, they wait there
    assert waiting == sorted(waiting) and len(set(waiting)) == len(waiting) and waiting[0] >= 1, views
    assert all(v["eta_s"] is not None for v in views[2:])
    wait_for(lambda: gpu_depth(jobs.backend_urls())[0] >= 1, 10)
    for n, i in reversed(list(enumerate(ids))):  # the waiting first, so that none moves up meanwhile
        r = httpx.post(f"{url}/v1/jobs/{i}/cancel", headers=auth("plain"))
        # the two the door passed on may have finished by now (1.5 s each, on a loaded machine)
        assert r.status_code == 200 or (n < 2 and r.status_code == 409 and "succeeded" in r.text), r.text
    assert wait_for(lambda: gpu_depth(jobs.backend_urls()) == (0, 0), 10), "the GPU tier dropped them"
    ended = httpx.post(f"{url}/v1/jobs/{post(url, GENERATE, 'plain').json()['id']}/cancel", headers=auth("plain"))
    assert ended.status_code == 200
    finished = wait_job(url, post(url, GENERATE, "plain").json()["id"], auth("plain"))
    refused = httpx.post(f"{url}/v1/jobs/{finished['id']}/cancel", headers=auth("plain"))
    assert refused.status_code == 409, "a finished job stays finished"


def test_only_its_owner_sees_or_cancels_a_job(url: str) -> None:
    job = post(url, GENERATE, "plain").json()
    for who in ({"Authorization": auth("narrow")["Authorization"]}, {}):
        assert httpx.get(f"{url}/v1/jobs/{job['id']}", headers=who).status_code == 404
        assert httpx.post(f"{url}/v1/jobs/{job['id']}/cancel", headers=who).status_code == 404
        assert httpx.get(f"{url}/v1/jobs/{job['id']}/files/0", headers=who).status_code == 404
        listed = httpx.get(f"{url}/v1/jobs", headers=who).json()["data"]
        assert job["id"] not in [j["id"] for j in listed]
    assert httpx.get(f"{url}/v1/jobs/{job['id']}", headers=auth("plain")).status_code == 200
    assert httpx.get(f"{url}/v1/jobs/nope", headers=auth("plain")).status_code == 404


def test_an_idempotency_key_gives_the_same_job_per_owner(url: str) -> None:
    key = uuid.uuid4().hex
    first = post(url, GENERATE, "plain", **{"Idempotency-Key": key})
    again = post(url, GENERATE, "plain", **{"Idempotency-Key": key})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    other = post(url, {**GENERATE, "inputs": {**GENERATE["inputs"], "seed": 5}}, "plain", **{"Idempotency-Key": key})
    assert other.status_code == 409
    theirs = post(url, GENERATE, "narrow", **{"Idempotency-Key": key})
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]


def test_webhooks_need_a_secret_and_a_public_target(url: str) -> None:
    for target in (
        "http://127.0.0.1:9/hook",
        "http://169.254.169.254/latest",
        "http://[::1]:9/",
        "http://[fd00:ec2::254]/",
        "http://10.1.2.3/",
        "http://localhost:9/",
    ):
        r = post(url, {**GENERATE, "webhook_url": target}, "hooked")
        assert r.status_code == 400 and r.json()["field"] == "webhook_url", (target, r.text)
    no_secret = post(url, {**GENERATE, "webhook_url": "https://example.com/hook"}, "plain")
    assert no_secret.status_code == 400 and "webhook_secret" in no_secret.json()["message"]


def test_the_openapi_document_of_v1_is_served(url: str) -> None:
    doc = httpx.get(f"{url}/v1/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel"} <= set(doc["paths"])
    assert all(path.startswith("/v1/") for path in doc["paths"])
    assert "requestBody" in doc["paths"]["/v1/jobs"]["post"]


# -- restarts and expiry ---------------------------------------------------------------------
@pytest.mark.serial  # its kill must land within the job's one second: other workers delayed it past
def test_a_restarted_frontend_loses_no_job(tmp_path: Path) -> None:
    env = {"SPLITSPACE_JOBS_PATH": str(tmp_path / "jobs.sqlite3"), "SPLITSPACE_LEASE_S": "3"}
    d = Deployment(tmp_path, model="sleep:1000", quotas=JOB_QUOTAS, frontend_env=env)
    d.start()
    try:
        assert d.frontend is not None
        url = d.frontend.url
        # a clean restart (SIGTERM): the running job goes back in line, the queued wait on
        ids = [post(url, GENERATE, "plain").json()["id"] for _ in range(4)]
        wait_job(url, ids[0], auth("plain"), states=("running", "succeeded"))
        d.frontend.stop()
        url = d.start_frontend().url
        assert [wait_job(url, i, auth("plain"))["status"] for i in ids] == ["succeeded"] * 4
        # a frontend killed while a job ran: that job failed (with the reason), the others go on
        ids = [post(url, GENERATE, "plain").json()["id"] for _ in range(3)]
        wait_job(url, ids[0], auth("plain"), states=("running",))
        d.frontend.proc.send_signal(signal.SIGKILL)
        d.frontend.proc.wait()
        url = d.start_frontend().url
        ends = [wait_job(url, i, auth("plain")) for i in ids]
        assert ends[0]["status"] == "failed" and ends[0]["error"]["title"] == "Job interrupted", ends[0]
        assert [e["status"] for e in ends[1:]] == ["succeeded"] * 2
        # results are kept for SPLITSPACE_JOB_TTL_S, then gone
        d.frontend.stop()
        d.frontend_env["SPLITSPACE_JOB_TTL_S"] = "1"
        url = d.start_frontend().url
        done = wait_job(url, post(url, GENERATE, "plain").json()["id"], auth("plain"))
        assert done["status"] == "succeeded" and done["expires_at"] - done["finished_at"] == pytest.approx(1, abs=0.01)
        assert wait_for(lambda: httpx.get(done["links"]["self"], headers=auth("plain")).status_code == 404, 10)
        assert httpx.get(done["outputs"][0]["url"], headers=auth("plain")).status_code == 404
        assert httpx.get(f"{url}/v1/jobs/{ids[1]}", headers=auth("plain")).status_code == 200, "older: kept 24 h"
    finally:
        d.stop()


# -- Redis: any frontend answers for any job ----------------------------------------------------
def test_with_redis_any_frontend_answers_and_cancels(tmp_path: Path, redis_server: Any) -> None:
    env = {"SPLITSPACE_REDIS_URL": f"{redis_server.url}", "SPLITSPACE_JOBS_PATH": str(tmp_path / "unused.sqlite3")}
    d = Deployment(tmp_path, model="sleep:1500", quotas=JOB_QUOTAS, frontend_env=env)
    d.start()
    assert d.frontend is not None
    second = start_tier(
        "frontend",
        free_port(),
        {**d.common_env(), "SPLITSPACE_BACKEND_URL": d.backend_urls(), **env},
        tmp_path / "frontend2.log",
    )
    try:
        a, b = d.frontend.url, second.url
        first = post(a, GENERATE, "narrow").json()
        queued = post(a, GENERATE, "narrow").json()
        assert post(b, GENERATE, "narrow").status_code == 429, "one cap across frontends"
        assert httpx.get(f"{b}/v1/jobs/{queued['id']}", headers=auth("narrow")).json()["status"] == "queued"
        listed = [j["id"] for j in httpx.get(f"{b}/v1/jobs", headers=auth("narrow")).json()["data"]]
        assert listed[:2] == [queued["id"], first["id"]]
        cancelled = httpx.post(f"{b}/v1/jobs/{queued['id']}/cancel", headers=auth("narrow")).json()
        assert cancelled["status"] == "cancelled"
        assert httpx.get(f"{a}/v1/jobs/{queued['id']}", headers=auth("narrow")).json()["status"] == "cancelled"
        done = wait_job(b, first["id"], auth("narrow"))
        assert done["status"] == "succeeded"
        assert httpx.get(done["outputs"][0]["url"].replace(a, b), headers=auth("narrow")).content[:4] == b"\x89PNG"
        assert wait_for(lambda: post(b, GENERATE, "narrow").status_code == 202, 20), "places freed everywhere"
    finally:
        second.stop()
        d.stop()


# -- in-process: a waiting job is a row and a place, not a task ---------------------------------
class HeldTarget:
    """A target whose every run waits until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    def validate(self, endpoint: str, inputs: Any, data: Any) -> Call:
        return Call(endpoint, list(data or []))

    async def run(self, identity: Identity, call: Call) -> AsyncGenerator[JobUpdate, None]:
        yield Status("running")
        await self.release.wait()
        yield Finished(["done"], [])


def test_waiting_jobs_hold_no_task(tmp_path: Path) -> None:
    async def scenario() -> None:
        door = FairDoor(per_flow=1, total=1)
        store = SqliteJobStore(tmp_path / "jobs.sqlite3")
        target = HeldTarget()

        async def join(identity: Identity) -> Any:
            return door.join(identity.flow_id, 10_000)

        deliveries = Deliveries(store, "r1", lambda client: None, Sender(), workers=2)
        runner = JobRunner(
            store=store,
            targets=target,
            join=join,
            rejoin=lambda identity: door.join(identity.flow_id, 10_000),
            deliveries=deliveries,
            secret_of=lambda client: None,
        )
        await runner.start()
        before = len(asyncio.all_tasks())
        who = Identity("key:a", "key", "free", "10.0.0.1")
        ids = [(await runner.submit(who, "/hold", data=[i]))[0].id for i in range(300)]
        assert door.waiting == 299 and runner.running == 1
        assert len(asyncio.all_tasks()) == before + 1, "one task: the job let in"
        await runner.cancel("key:a", ids[5])
        assert door.waiting == 298
        target.release.set()
        job = await runner.get("key:a", ids[0])
        while job.status != "succeeded":
            await asyncio.sleep(0.01)
            job = await runner.get("key:a", ids[0])
        await runner.aclose()

    asyncio.run(scenario())


def test_a_developer_function_runs_as_a_job_through_transport_call(tmp_path: Path) -> None:
    """``FunctionTarget``: inputs by name with the function's defaults, checked by the Gradio
    path's validation (named as in ``inputs``, the message by the label), ``Transport.call``, files kept."""
    from splitspace.cpu_frontend.hop.backends import BackendPool
    from splitspace.cpu_frontend.hop.mock_transport import MockTransport
    from splitspace.cpu_frontend.jobs.targets import FunctionTarget
    from splitspace.session.token import IdentityTokens
    from splitspace.shared.app.loader import gpu_endpoints, load_app
    from splitspace.shared.contract.calls import CallInfo, CallResult, CarriedFile, Partial
    from splitspace.shared.contract.errors import ValidationFailed, to_wire

    seen: list[Call] = []

    def handler(call: Call, headers: Any) -> Any:
        seen.append(call)
        yield Status("queued", 2, 1.0)
        yield Partial(["SO"])
        text = " ".join([str(call.data[0]).upper()] * int(call.data[1]))
        png = CarriedFile("x.png", "image/png", b"PNG!")
        yield CallResult([text, png], CallInfo("shout", 0.0, 0.1, 0.1, "key:a"))

    pool = BackendPool([MockTransport(call_handler=handler)])
    endpoints = gpu_endpoints(load_app("examples/shout.py"))
    gpu_seconds: list[float] = []
    target = FunctionTarget(
        endpoints,
        pool,
        IdentityTokens(["s" * 32]),
        max_file_bytes=1000,
        cache_dir=str(tmp_path / "cache"),
        on_gpu_s=gpu_seconds.append,
    )
    call = target.validate("shout", {"text": "so"}, None)
    assert call == Call("shout", ["so", 2])
    for inputs, field, message in (
        ({}, "text", "is required"),
        ({"text": "so", "times": 9}, "times", "Times: must be at most 5"),
        ({"text": "x" * 201}, "text", "Text: at most 200 characters"),
        ({"text": "so", "times": 1.5}, "times", "Times: must be in steps of 1 from 1"),
    ):
        with pytest.raises(ValidationFailed) as refused:
            target.validate("shout", inputs, None)
        wire = to_wire(refused.value)  # (as a 400 says it)
        assert (wire["field"], wire["message"]) == (field, message)

    async def scenario() -> list[Any]:
        updates = [u async for u in target.run(Identity("key:a", "key", "free", "1.2.3.4"), call)]
        return updates

    updates = asyncio.run(scenario())
    assert isinstance(updates[0], Status) and isinstance(updates[-1], Finished)
    assert updates[-1].outputs[0] == "SO SO" and updates[-1].files[0].data == b"PNG!"
    assert updates[-1].outputs[1]["$file"] == 0 and seen == [call]
    assert gpu_seconds == [0.1], "the call's GPU seconds feed the door's ETA, as on the Gradio path"


def test_the_builtin_generate_is_a_function_as_any_apps(tmp_path: Path) -> None:
    """With no ``SPLITSPACE_APP`` a job of ``/generate`` is a call of the built-in app's GPU
    function: its inputs are the names clients always gave, checked by the app path's rules
    (the sliders' ranges, then the app's own ``validator=``), null steps: the model's preset."""
    from splitspace.builtin import APP
    from splitspace.cpu_frontend.hop.backends import BackendPool
    from splitspace.cpu_frontend.hop.mock_transport import MockTransport
    from splitspace.cpu_frontend.jobs.targets import FunctionTarget
    from splitspace.session.token import IdentityTokens
    from splitspace.shared.app.loader import gpu_endpoints, load_app
    from splitspace.shared.contract.errors import ValidationFailed, to_wire

    pool = BackendPool([MockTransport(call_handler=lambda c, h: iter(()))])
    target = FunctionTarget(
        gpu_endpoints(load_app(APP)), pool, IdentityTokens(["s" * 32]), max_file_bytes=1000, cache_dir=str(tmp_path)
    )
    assert list(target.functions) == ["generate"]
    inputs = {"prompt": "a fox", "negative_prompt": "", "width": 64, "height": 128, "steps": None}
    call = target.validate("generate", {**inputs, "guidance_scale": None, "seed": 7}, None)
    assert call == Call("generate", ["a fox", "", 64, 128, None, None, 7])
    for given, field, message in (
        ({}, "prompt", "is required"),
        ({"prompt": "   "}, "prompt", "Prompt: must be 1 to"),
        ({"prompt": "x", "width": 72.5}, "width", "Width: must be in steps of 8"),
        ({"prompt": "x", "seed": -5}, "seed", "Seed (-1 = random): must be -1 (random)"),
    ):
        with pytest.raises(ValidationFailed) as refused:
            target.validate("generate", given, None)
        wire = to_wire(refused.value)
        assert wire["field"] == field and str(wire["message"]).startswith(message), wire


def test_a_functions_file_inputs_are_given_inline_and_checked_by_the_gradio_rules(tmp_path: Path) -> None:
    """A file input as ``{"b64", "name"}`` or a ``data:`` URL is carried as the hop carries
    it; the component's type and the size limit refuse it as on the Gradio path; a path is refused."""
    import io

    from PIL import Image

    from splitspace.cpu_frontend.hop.backends import BackendPool
    from splitspace.cpu_frontend.hop.mock_transport import MockTransport
    from splitspace.cpu_frontend.jobs.targets import FunctionTarget
    from splitspace.session.token import IdentityTokens
    from splitspace.shared.app.loader import gpu_endpoints, load_app
    from splitspace.shared.contract.calls import CarriedFile
    from splitspace.shared.contract.errors import ValidationFailed, to_wire

    buf = io.BytesIO()
    Image.new("RGB", (4, 2), (200, 10, 10)).save(buf, "PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    pool = BackendPool([MockTransport(call_handler=lambda c, h: iter(()))])
    cache = tmp_path / "cache"
    target = FunctionTarget(
        gpu_endpoints(load_app("examples/mirror.py")),
        pool,
        IdentityTokens(["s" * 32]),
        max_file_bytes=len(buf.getvalue()) + 10,
        cache_dir=str(cache),
    )
    forms = ({"b64": png, "name": "red.png"}, f"data:image/png;base64,{png}", {"b64": png, "mime_type": "image/png"})
    for given in forms:
        call = target.validate("mirror", {"picture": given, "upside_down": False}, None)
        carried = call.data[0]
        assert isinstance(carried, CarriedFile)
        assert (carried.data, carried.mime_type, call.data[1]) == (buf.getvalue(), "image/png", False)
    assert list(cache.iterdir()) == []  # what was landed for the check is gone
    text = base64.b64encode(b"hello").decode()
    big = base64.b64encode(buf.getvalue() + b"\0" * 11).decode()
    for given, message in (
        ({"b64": text, "name": "notes.txt"}, "Picture: notes.txt is not one of the accepted file types (image)"),
        ({"b64": big, "name": "big.png"}, f"Picture: big.png is {len(buf.getvalue()) + 11} bytes, over the limit"),
        ({"b64": "%%%", "name": "x.png"}, "the file's bytes are not base64"),
        ({"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, "names a file by its path"),
        ("data:image/png,abc", "is a data: URL that is not base64"),
    ):
        with pytest.raises(ValidationFailed) as refused:
            target.validate("mirror", {"picture": given}, None)
        wire = to_wire(refused.value)
        assert wire["field"] == "picture" and str(wire["message"]).startswith(message), wire
