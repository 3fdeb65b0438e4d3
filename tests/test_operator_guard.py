"""Operators only, from their own page: the GPU tier's dashboard and admin API (issue 21, item 2).

The second release, with any public ``Host``: Gradio's CORS layer echoed any ``Origin``
with credentials, the login cookie was ``SameSite=None`` and never expired, a cross-site
``queue/join`` of the dashboard's "Set override" event set ``max_queued=0`` on a client,
and 300 wrong passwords (or admin tokens) went by in 1.3 s. Each test below calls a real
GPU tier with httpx as a browser on another site (or a guesser) would; the session's
lifetime and the throttle's memory are logic, checked in-process with a clock the test moves.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from splitspace.gpu_backend.ops.operator_sessions import SESSION_S, GuessThrottle, OperatorSessions
from splitspace.shared.contract.headers import ADMIN_HEADER
from tests.support import Deployment, wait_for

HOST = "gpu.splitspace.example"
"""A public host name: for a localhost Host, Gradio's own CORS layer refuses foreign origins."""
OWN = f"http://{HOST}"
EVIL = "http://evil.example"
VICTIM = "addr:203.0.113.7"
"""A client the tier has no quota-file entry for (a `key:` must be in the quota file)."""


@pytest.fixture(scope="module")
def gpu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A GPU tier alone (the dashboard and the admin API need no frontend)."""
    d = Deployment(tmp_path_factory.mktemp("operator_guard"), model="sleep:1")
    d.workdir.mkdir(parents=True, exist_ok=True)
    d.start_backend()
    yield d
    d.stop()


def client(d: Deployment, address: str = "127.0.0.1") -> httpx.Client:
    """A browser (or a guesser) on ``address``, talking to the tier by its public name."""
    assert d.backend is not None
    return httpx.Client(
        base_url=d.backend.url, headers={"Host": HOST}, timeout=10, transport=httpx.HTTPTransport(local_address=address)
    )


def log_in(c: httpx.Client, password: str) -> httpx.Response:
    return c.post(
        "/admin/ui/login",
        data={"username": "admin", "password": password},
        headers={"Origin": OWN, "Sec-Fetch-Site": "same-origin"},
    )


def admin(d: Deployment, method: str, path: str, **kwargs: Any) -> httpx.Response:
    assert d.backend is not None
    return httpx.request(
        method, f"{d.backend.url}/admin{path}", headers={ADMIN_HEADER: d.admin_token}, timeout=10, **kwargs
    )


def overrides(d: Deployment, client_id: str) -> dict[str, Any]:
    r = admin(d, "GET", f"/clients/{client_id}")
    assert r.status_code == 200, r.text
    return r.json()["overrides"]


def set_override_event(c: httpx.Client) -> tuple[int, int]:
    """The "Set override" button's event (fn_index) and how many inputs it takes, from the
    page's own config, as the page's script finds them."""
    config = c.get("/admin/ui/config").json()
    button = next(
        comp["id"]
        for comp in config["components"]
        if comp["type"] == "button" and comp["props"].get("value") == "Set override"
    )
    index, dep = next((i, dep) for i, dep in enumerate(config["dependencies"]) if [button, "click"] in dep["targets"])
    return dep.get("id", index), len(dep["inputs"])


def join_set_override(c: httpx.Client, headers: dict[str, str], fn_index: int, n_inputs: int) -> httpx.Response:
    # the form: client id, then tier, weight, max_running, max_queued, ... (gpu_backend/ops/dashboard.py)
    data = [VICTIM, "", "", "", "0", *[""] * (n_inputs - 5)]
    return c.post(
        "/admin/ui/gradio_api/queue/join",
        headers=headers,
        json={"data": data, "fn_index": fn_index, "session_hash": "xsite", "event_data": None, "trigger_id": None},
    )


def test_no_cross_origin_reads_for_a_public_host(gpu: Deployment) -> None:
    with client(gpu) as c:
        assert log_in(c, gpu.admin_token).status_code == 200
        for path in ("/admin/ui/config", "/admin/ui/gradio_api/token", "/health"):
            r = c.get(path, headers={"Origin": EVIL})
            assert r.status_code == 200, path
            assert r.headers.get("access-control-allow-origin") is None, path
            assert r.headers.get("access-control-allow-credentials") is None, path
        pre = c.options(
            "/admin/ui/gradio_api/queue/join",
            headers={
                "Origin": EVIL,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert pre.headers.get("access-control-allow-origin") is None
        r = c.get("/admin/clients", headers={"Origin": EVIL, ADMIN_HEADER: gpu.admin_token})
        assert r.status_code == 200 and r.headers.get("access-control-allow-origin") is None


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"},  # a current browser
        {"Origin": EVIL},  # a browser too old for Sec-Fetch-Site
        {"Origin": "null"},  # a sandboxed frame, a data: page
        {"Origin": f"http://sub.{HOST}", "Sec-Fetch-Site": "same-site"},  # a sibling site is another origin
    ],
    ids=["fetch-metadata", "origin-only", "null-origin", "same-site"],
)
def test_a_cross_site_set_override_is_refused_and_changes_nothing(gpu: Deployment, headers: dict[str, str]) -> None:
    admin(gpu, "DELETE", f"/clients/{VICTIM}")
    with client(gpu) as c:
        assert log_in(c, gpu.admin_token).status_code == 200  # the operator's browser holds the cookie
        fn_index, n_inputs = set_override_event(c)
        r = join_set_override(c, headers, fn_index, n_inputs)
        assert r.status_code == 403, r.text
        assert r.json()["title"] == "Cross-site request refused"
        # Every other state-changing way in, the dashboard's and the admin API's, the same.
        for method, path in (
            ("POST", "/admin/ui/gradio_api/run/predict"),
            ("POST", "/admin/ui/gradio_api/call/run"),
            ("POST", "/admin/ui/login"),
            ("PUT", f"/admin/clients/{VICTIM}"),
            ("DELETE", f"/admin/clients/{VICTIM}"),
            ("POST", f"/admin/reset/{VICTIM}"),
            ("PUT", "/admin/model"),
        ):
            r = c.request(
                method,
                path,
                headers={**headers, ADMIN_HEADER: gpu.admin_token},
                json={"max_queued": 0, "data": [], "model": "sleep:2"},
            )
            assert r.status_code == 403, (method, path, r.status_code)
    assert overrides(gpu, VICTIM) == {}
    assert admin(gpu, "GET", "/model").json()["model"] == "sleep:1"


def test_the_same_event_from_the_dashboards_own_page_works(gpu: Deployment) -> None:
    """The control for the test above: the refused request is one that would have worked."""
    admin(gpu, "DELETE", f"/clients/{VICTIM}")
    with client(gpu) as c:
        assert log_in(c, gpu.admin_token).status_code == 200
        fn_index, n_inputs = set_override_event(c)
        for headers in ({"Origin": OWN, "Sec-Fetch-Site": "same-origin"}, {"Origin": OWN}, {}):
            admin(gpu, "DELETE", f"/clients/{VICTIM}")
            r = join_set_override(c, headers, fn_index, n_inputs)
            assert r.status_code == 200, r.text
            assert wait_for(lambda: overrides(gpu, VICTIM) == {"max_queued": 0}, 10), headers
    admin(gpu, "DELETE", f"/clients/{VICTIM}")


def test_the_login_cookie_is_strict_and_ends_at_logout(gpu: Deployment) -> None:
    with client(gpu, "127.0.0.9") as c:
        r = log_in(c, gpu.admin_token)
        assert r.status_code == 200
        cookies = [v for v in r.headers.get_list("set-cookie") if v.startswith("access-token")]
        assert len(cookies) == 2, cookies  # Gradio's Secure one and its plain-HTTP twin
        for cookie in cookies:
            attrs = {a.split("=")[0].strip().lower(): a.partition("=")[2].strip() for a in cookie.split(";")[1:]}
            assert attrs.get("samesite", "").lower() == "strict", cookie
            assert 0 < int(attrs["max-age"]) <= 12 * 3600, cookie
            assert "httponly" in attrs, cookie
        jar = dict(c.cookies)
        assert c.get("/admin/ui/config").status_code == 200
        c.get("/admin/ui/logout")
    with client(gpu, "127.0.0.9") as after:  # the old cookie, sent again after the logout
        after.cookies.update(jar)
        assert after.get("/admin/ui/config").status_code == 401


def test_admin_ui_answers_with_and_without_its_trailing_slash(gpu: Deployment) -> None:
    with client(gpu) as c:
        for path in ("/admin/ui", "/admin/ui/", "/admin/ui?x=1"):
            r = c.get(path, follow_redirects=True)
            assert r.status_code == 200, (path, r.status_code)
            assert r.url.path == "/admin/ui/" and "<html" in r.text.lower(), path


def test_guessing_the_dashboard_password_is_refused_per_address(gpu: Deployment) -> None:
    with client(gpu, "127.0.0.2") as guesser:
        wrong = [log_in(guesser, f"guess-{i}-{gpu.admin_token[::-1]}").status_code for i in range(5)]
        assert wrong == [400] * 5
        refused = log_in(guesser, "one-more-guess-of-sixteen")
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.json()["title"] == "Rate limited" and "Retry in" in refused.json()["message"]
        assert gpu.admin_token not in refused.text
        assert log_in(guesser, gpu.admin_token).status_code == 429  # refused before it is checked
    with client(gpu, "127.0.0.3") as operator:  # the right password from another address works
        assert log_in(operator, gpu.admin_token).status_code == 200
        assert operator.get("/admin/ui/config").status_code == 200


def test_guessing_the_admin_token_is_refused_per_address(gpu: Deployment) -> None:
    with client(gpu, "127.0.0.4") as guesser:
        wrong = [
            guesser.get("/admin/clients", headers={ADMIN_HEADER: f"guess-{i}-abcdefghijklmnop"}).status_code
            for i in range(5)
        ]
        assert wrong == [401] * 5
        refused = guesser.put(
            f"/admin/clients/{VICTIM}", json={"max_queued": 0}, headers={ADMIN_HEADER: gpu.admin_token}
        )
        assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 60
        # the dashboard's login shares the address's count
        assert log_in(guesser, gpu.admin_token).status_code == 429
    with client(gpu, "127.0.0.5") as operator:
        assert operator.get("/admin/clients", headers={ADMIN_HEADER: gpu.admin_token}).status_code == 200
    assert overrides(gpu, VICTIM) == {}


def test_a_signed_out_page_is_not_a_guess(gpu: Deployment) -> None:
    """The page's own requests after its session ended answer 401 without counting: an
    operator whose login expired is not locked out by the page's polling."""
    with client(gpu, "127.0.0.6") as c:
        assert [c.get("/admin/ui/config").status_code for _ in range(12)] == [401] * 12
        assert log_in(c, gpu.admin_token).status_code == 200


# -- logic, in-process, with a clock the test moves ------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_dashboard_session_ends_after_its_lifetime(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from splitspace.gpu_backend.app import build_app
    from splitspace.shared.config.settings import Settings

    token = "Zq8-w1xYp0Lm3nB7vC2kD9"
    app = build_app(Settings(secret="s" * 32, model="sleep:1", admin_token=token, state_path=tmp_path / "s.sqlite3"))
    clock = Clock()
    app.state.operator_sessions.clock = clock
    with TestClient(app) as c:
        assert c.post("/admin/ui/login", data={"username": "admin", "password": token}).status_code == 200
        assert c.get("/admin/ui/config").status_code == 200
        clock.now += SESSION_S - 1
        assert c.get("/admin/ui/config").status_code == 200
        clock.now += 2
        assert c.get("/admin/ui/config").status_code == 401  # the cookie is still sent; its session is over
        assert len(app.state.operator_sessions) == 0


def test_sessions_are_bounded_in_count() -> None:
    sessions = OperatorSessions(max_sessions=3, clock=Clock())
    for i in range(10):
        sessions[f"t{i}"] = "admin"
    assert list(sessions) == ["t7", "t8", "t9"] and sessions.get("t0") is None


def test_the_throttle_forgets_after_its_window_and_its_memory_is_bounded() -> None:
    clock = Clock()
    throttle = GuessThrottle(max_failures=5, window_s=60, max_addresses=1000, clock=clock)
    for _ in range(5):
        throttle.failed("198.51.100.7")
        clock.now += 1
    assert throttle.retry_after_whole_s("198.51.100.7") == 55  # until the first failure is 60 s old
    assert throttle.retry_after("198.51.100.8") == 0
    clock.now += 54
    assert throttle.retry_after_whole_s("198.51.100.7") == 1
    clock.now += 1
    assert throttle.retry_after("198.51.100.7") == 0
    for i in range(100_000):  # a crowd of addresses, one wrong guess each
        throttle.failed(f"addr-{i}")
    assert len(throttle) <= 1000
    clock.now += 61
    throttle.failed("203.0.113.1")
    assert len(throttle) == 1  # the stale ones are gone as soon as anyone fails again
