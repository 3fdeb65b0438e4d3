"""Cross-origin browser access: only the origins in ``SPLITSPACE_CORS_ORIGINS``, with credentials.

Gradio on its own reflects any ``Origin`` with credentials allowed; the frontend's own
``CORSMiddleware`` replaces that policy (Gradio steps aside when the mounting app has one).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support import Deployment

GOOD = "http://good.example"
EVIL = "http://evil.example"
# Requests name a public host: for a localhost Host, Gradio's own CORS layer already refuses
# non-localhost origins, which would hide a missing policy of ours.
PUBLIC = {"Host": "splitspace.example"}


@pytest.fixture(scope="module")
def allowing_good(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A frontend alone (CORS needs no GPU tier) that allows GOOD."""
    d = Deployment(tmp_path_factory.mktemp("cors"), frontend_env={"SPLITSPACE_CORS_ORIGINS": GOOD})
    d.workdir.mkdir(parents=True, exist_ok=True)
    d.start_frontend()
    yield d.frontend.url
    d.stop()


def preflight(url: str, origin: str, method: str = "POST", path: str = "/gradio_api/call/generate") -> httpx.Response:
    return httpx.options(
        url + path,
        headers={
            **PUBLIC,
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "content-type,authorization",
        },
    )


def call(url: str, origin: str) -> httpx.Response:
    return httpx.post(url + "/gradio_api/call/quota", json={"data": []}, headers={**PUBLIC, "Origin": origin})


def acao(r: httpx.Response) -> str | None:
    return r.headers.get("access-control-allow-origin")


def test_default_allows_no_cross_origin(tiny: Deployment) -> None:
    url = tiny.frontend.url
    for origin in (EVIL, GOOD, "null", "http://localhost:3000"):
        assert acao(preflight(url, origin)) is None
        # (Starlette adds Access-Control-Allow-Credentials to every response; without
        # Access-Control-Allow-Origin a browser still refuses the page any access.)
        assert acao(call(url, origin)) is None
        assert acao(httpx.get(url + "/gradio_api/info", headers={**PUBLIC, "Origin": origin})) is None


def test_default_still_serves_same_origin(tiny: Deployment) -> None:
    assert call(tiny.frontend.url, tiny.frontend.url).status_code == 200  # the UI's own requests


def test_configured_origin_is_allowed_with_credentials(allowing_good: str) -> None:
    pf = preflight(allowing_good, GOOD)
    assert pf.status_code == 200
    assert acao(pf) == GOOD
    assert pf.headers.get("access-control-allow-credentials") == "true"
    assert "POST" in pf.headers.get("access-control-allow-methods", "")
    assert "authorization" in pf.headers.get("access-control-allow-headers", "").lower()

    r = call(allowing_good, GOOD)
    assert r.status_code == 200
    assert acao(r) == GOOD and r.headers.get("access-control-allow-credentials") == "true"
    assert "origin" in r.headers.get("vary", "").lower()

    info = httpx.get(allowing_good + "/gradio_api/info", headers={**PUBLIC, "Origin": GOOD})
    assert acao(info) == GOOD


def test_other_origins_stay_refused_when_one_is_configured(allowing_good: str) -> None:
    for origin in (EVIL, "http://good.example.evil.example", "https://good.example", "null", "http://localhost:3000"):
        pf = preflight(allowing_good, origin)
        assert acao(pf) is None, origin
        assert acao(call(allowing_good, origin)) is None, origin
