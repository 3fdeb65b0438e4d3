"""Who the GPU tier thinks each caller is: cookies, API keys, addresses."""

from __future__ import annotations

import httpx
import pytest
from gradio_client import Client

from tests.clients import call_rest, error_text, gen_args
from tests.conftest import key


def _set_cookie(resp: httpx.Response) -> str:
    values = [v for k, v in resp.headers.multi_items() if k == "set-cookie" and v.startswith("splitspace_session=")]
    assert values, "no splitspace_session cookie set"
    return values[0]


def test_cookie_attributes_on_plain_http(tiny):
    r = httpx.get(tiny.frontend.url + "/")
    cookie = _set_cookie(r)
    attrs = [a.strip().lower() for a in cookie.split(";")]
    assert "httponly" in attrs
    assert "samesite=lax" in attrs
    assert "secure" not in attrs
    value = cookie.split(";")[0].split("=", 1)[1]
    session_id = value.rsplit(".", 1)[0]
    assert len(session_id) >= 22  # 128 bits, urlsafe base64


def test_cookie_attributes_behind_https_proxy(tiny):
    r = httpx.get(tiny.frontend.url + "/", headers={"x-forwarded-proto": "https"})
    attrs = [a.strip().lower() for a in _set_cookie(r).split(";")]
    assert {"httponly", "secure", "samesite=none", "partitioned"} <= set(attrs)


def test_valid_cookie_is_not_reissued(tiny):
    with httpx.Client() as c:
        c.get(tiny.frontend.url + "/")
        r = c.get(tiny.frontend.url + "/")
        assert not [v for k, v in r.headers.multi_items() if k == "set-cookie" and "splitspace_session" in v]


def test_cookie_set_on_api_calls(tiny):
    r = httpx.post(f"{tiny.frontend.url}/gradio_api/call/quota", json={"data": []})
    assert r.status_code == 200
    _set_cookie(r)


def _client_id(c: httpx.Client, url: str, headers: dict[str, str] | None = None) -> str:
    final, events = call_rest(c, url, "generate", gen_args(), headers)
    assert final == "complete", events
    return events[-1][1][1]["client"]


def test_two_browsers_and_two_keys_are_four_clients(tiny):
    url = tiny.frontend.url
    ids = []
    for _ in range(2):  # two browsers: two cookie jars, each loads the page first
        with httpx.Client(timeout=60) as browser:
            browser.get(url + "/")
            first = _client_id(browser, url)
            assert first == _client_id(browser, url), "one browser must stay one client"
            ids.append(first)
    for name in ("alpha", "beta"):
        with httpx.Client(timeout=60) as machine:
            ids.append(_client_id(machine, url, {"authorization": f"Bearer {key(name)}"}))
    assert ids[0].startswith("session:") and ids[1].startswith("session:")
    assert ids[2:] == ["key:alpha", "key:beta"]
    assert len(set(ids)) == 4


def test_api_key_through_gradio_client(tiny):
    client = Client(tiny.frontend.url, verbose=False, headers={"Authorization": f"Bearer {key('beta')}"})
    q = client.predict(api_name="/quota")
    assert q["client"] == "key:beta" and q["tier"] == "pro"


def test_caller_with_neither_is_its_address(tiny):
    with httpx.Client(timeout=60) as c:  # a fresh client presents no cookie on its POST
        final, events = call_rest(c, tiny.frontend.url, "generate", gen_args(), {"x-forwarded-for": "203.0.113.9"})
    assert events[-1][1][1]["client"] == "addr:203.0.113.9"


def test_unknown_api_key_is_refused_not_anonymous(tiny):
    with httpx.Client(timeout=60) as c:
        final, events = call_rest(
            c, tiny.frontend.url, "generate", gen_args(), {"authorization": "Bearer not-a-real-key"}
        )
    assert final == "error"
    assert "unknown API key" in error_text(events)


def test_malformed_authorization_is_refused(tiny):
    with httpx.Client(timeout=60) as c:
        final, events = call_rest(c, tiny.frontend.url, "quota", [], {"authorization": "Basic abc"})
    assert final == "error"
    assert "Authorization" in error_text(events)


@pytest.mark.parametrize("forged", ["garbage", "a.b.c"])
def test_forged_cookie_is_not_a_session(tiny, forged):
    with httpx.Client(timeout=60, cookies={"splitspace_session": forged}) as c:
        final, events = call_rest(c, tiny.frontend.url, "quota", [], {"x-forwarded-for": "198.51.100.7"})
    assert final == "complete"
    assert events[-1][1][0]["client"] == "addr:198.51.100.7"
