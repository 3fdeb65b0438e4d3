"""Webhooks of jobs: signed the Standard Webhooks way (checked with the openai SDK), retried with
the same id, sent only to public targets; in-process, the SSRF check and the backoff schedule."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from standardwebhooks import Webhook

from splitspace.cpu_frontend.jobs.safe_target import SafeResolver, TargetRefused, address_problem, check_url
from splitspace.cpu_frontend.jobs.webhooks import Sender, backoff_s, schedule, signed_headers
from tests.job_support import GENERATE, JOB_QUOTAS, SECRET, Receiver, auth, body_json, receiver, wait_job
from tests.support import Deployment, in_threads, wait_for

LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]


# -- in-process -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.9.9.9",
        "::1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "169.254.1.1",
        "fd00:ec2::254",
        "fe80::1",
        "100.64.0.1",
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "2002:7f00:1::",
        "64:ff9b::a9fe:a9fe",
        "240.0.0.1",
        "100.100.100.200",
    ],
)
def test_private_and_metadata_addresses_are_refused(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "93.184.216.34"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is None


def test_the_allow_list_opens_its_networks_only() -> None:
    assert address_problem(ipaddress.ip_address("127.0.0.1"), LOOPBACK) is None
    assert address_problem(ipaddress.ip_address("::1"), LOOPBACK) is not None
    assert address_problem(ipaddress.ip_address("169.254.169.254"), LOOPBACK) is not None


def test_urls_are_checked_on_what_they_resolve_to() -> None:
    async def scenario() -> None:
        for url in (
            "http://localhost:8080/x",
            "http://127.0.0.1/",
            "http://2130706433/",
            "http://127.1/",
            "http://[::ffff:7f00:1]/",
            "ftp://example.com/",
            "http:///nohost",
            "http://exa mple.com/",
        ):
            with pytest.raises(ValueError):
                await check_url(url)
        await check_url("http://127.0.0.1:9/hook", LOOPBACK)
        await check_url("https://8.8.8.8/hook")
        with pytest.raises(TargetRefused):  # at the connection, too: the resolver refuses, no address is tried
            await SafeResolver().resolve("localhost", 80)
        assert (await SafeResolver(LOOPBACK).resolve("127.0.0.1", 80))[0]["host"] == "127.0.0.1"

    asyncio.run(scenario())


def test_the_sender_refuses_literal_private_addresses_itself() -> None:
    async def scenario() -> None:
        sender = Sender()
        status, error = await sender.send("http://127.0.0.1:9/", {}, "{}")
        assert status is None and error is not None and "loopback" in error
        await sender.aclose()

    asyncio.run(scenario())


def test_the_backoff_grows_to_hours() -> None:
    waits = schedule(5.0, 12)
    assert waits[:4] == [5.0, 15.0, 45.0, 135.0]
    assert max(waits) == 3600.0 and 4 * 3600 < sum(waits) < 8 * 3600, "retried for hours"
    for failed in range(1, 12):
        base = backoff_s(failed, 5.0, rand=lambda: 0.0)
        assert base <= backoff_s(failed, 5.0) <= base * 1.1


def test_signatures_are_standard_webhooks() -> None:
    body = '{"type":"job.completed"}'
    client = openai.OpenAI(api_key="unused", webhook_secret=SECRET)
    headers = signed_headers(SECRET, "msg_1", time.time(), body)
    assert headers["webhook-signature"].startswith("v1,")
    client.webhooks.verify_signature(body, headers)
    Webhook(SECRET).verify(body, headers)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.verify_signature(body.replace("completed", "failed"), headers)
    with pytest.raises(openai.InvalidWebhookSignatureError):  # too old: the SDK checks the time too
        client.webhooks.verify_signature(body, signed_headers(SECRET, "msg_1", time.time() - 3600, body))


# -- through the real tiers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hooks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Both tiers (100 ms images); webhooks may reach loopback; retries 0.2 s apart."""
    work = tmp_path_factory.mktemp("hooks")
    env = {
        "SPLITSPACE_JOBS_PATH": str(work / "jobs.sqlite3"),
        "SPLITSPACE_WEBHOOK_ALLOW": "127.0.0.0/8",
        "SPLITSPACE_WEBHOOK_BACKOFF_S": "0.2",
        "SPLITSPACE_WEBHOOK_ATTEMPTS": "4",
    }
    d = Deployment(work, model="sleep:100", quotas=JOB_QUOTAS, frontend_env=env)
    d.start()
    yield d
    d.stop()


@pytest.fixture
def rec() -> Iterator[Receiver]:
    with receiver() as r:
        yield r


def submit(d: Deployment, url: str, **extra: object) -> dict:
    assert d.frontend is not None
    r = httpx.post(
        f"{d.frontend.url}/v1/jobs", json={**GENERATE, "webhook_url": url, **extra}, headers=auth("hooked"), timeout=10
    )
    assert r.status_code == 202, r.text
    return r.json()


def test_a_webhook_is_signed_and_the_openai_sdk_verifies_it(hooks: Deployment, rec: Receiver) -> None:
    job = submit(hooks, f"{rec.url}/ok", webhook_events=["started", "completed"])
    got = rec.wait(2, "/ok")
    client = openai.OpenAI(api_key="unused", webhook_secret=SECRET)
    events = []
    for r in got:
        event = client.webhooks.unwrap(r.body, r.headers)  # raises unless the signature is right
        events.append(event)
        assert json.loads(r.body)["data"]["id"] == job["id"]
    got.sort(key=lambda r: body_json(r)["type"] != "job.started")  # (messages are not ordered)
    assert [body_json(r)["type"] for r in got] == ["job.started", "job.completed"]
    completed = body_json(got[1])["data"]
    assert completed["status"] == "succeeded" and completed["outputs"][0]["url"].endswith("/files/0")
    tampered = got[1].body.replace(b"succeeded", b"failed\x20\x20\x20")
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(tampered, got[1].headers)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(got[1].body, {**got[1].headers, "webhook-id": "msg_other"})
    Webhook(SECRET).verify(got[1].body, got[1].headers)  # and the reference library agrees
    assert len({r.headers["webhook-id"] for r in got}) == 2, "one id per message"


def test_a_failing_receiver_gets_the_same_message_again(hooks: Deployment, rec: Receiver) -> None:
    assert hooks.frontend is not None
    rec.fail["/flaky"] = 2
    job = submit(hooks, f"{rec.url}/flaky")
    got = rec.wait(3, "/flaky")
    assert len({r.headers["webhook-id"] for r in got}) == 1 and len({r.body for r in got}) == 1
    gaps = [b.at - a.at for a, b in zip(got, got[1:], strict=False)]
    assert gaps[1] > gaps[0] * 2, f"exponential: {gaps}"

    def attempts() -> list[dict]:
        doc = httpx.get(f"{hooks.frontend.url}/v1/jobs/{job['id']}", headers=auth("hooked")).json()  # type: ignore[union-attr]
        return doc["webhook_attempts"]

    wait_for(lambda: len(attempts()) == 3, 10)
    seen = attempts()
    assert [(a["attempt"], a["ok"], a["status_code"]) for a in seen] == [
        (1, False, 500),
        (2, False, 500),
        (3, True, 200),
    ]
    assert seen[0]["next_attempt_at"] is not None and seen[2]["next_attempt_at"] is None


def test_a_cancelled_job_announces_it(hooks: Deployment, rec: Receiver) -> None:
    assert hooks.frontend is not None
    # ahead of it: 3 s of images (submitted at once: one by one, a loaded machine let them
    # finish before the last was in)
    in_threads(30, lambda i: submit(hooks, f"{rec.url}/busy"))
    last = submit(hooks, f"{rec.url}/cancel")
    r = httpx.post(f"{hooks.frontend.url}/v1/jobs/{last['id']}/cancel", headers=auth("hooked"))
    assert r.json()["status"] == "cancelled"
    (got,) = rec.wait(1, "/cancel")
    assert body_json(got)["type"] == "job.cancelled" and body_json(got)["data"]["id"] == last["id"]


def test_a_hanging_receiver_delays_no_job(hooks: Deployment, rec: Receiver) -> None:
    assert hooks.frontend is not None
    rec.hang.add("/hang")
    submit(hooks, f"{rec.url}/hang")
    rec.wait(1, "/hang")
    job = submit(hooks, f"{rec.url}/fine")
    done = wait_job(hooks.frontend.url, job["id"], auth("hooked"), timeout_s=10)
    assert done["status"] == "succeeded"
    assert rec.wait(1, "/fine", timeout_s=5), "another receiver hears at once"
