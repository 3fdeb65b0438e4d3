"""The operators' dashboard at ``/admin/ui`` and the Grafana dashboard in ``docs/``.

The page is driven in headless Chromium (Debian's, as in ``test_browser.py``) against real
tiers: its login refuses a wrong token, it shows a client's GPU time against its fair share
after a run, and an override set with its form is what ``splitspace quota show`` reports.
The pure parts (GPU time per client from windowed usage, fair shares, the override form,
the store's name) are checked on their own, and every metric the Grafana JSON queries must
exist in a real GPU tier's ``/metrics``.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from splitspace.gpu_backend.ops.dashboard import (
    TIME_AXIS,
    Sample,
    Samples,
    depth_rows,
    gpu_by_client,
    gpu_rows,
    override_values,
    share_rows,
    store_name,
)
from tests.clients import call_rest, gen_args, splitspace_cli
from tests.conftest import QUOTAS, key
from tests.support import REPO, Deployment, wait_for

GRAFANA = REPO / "docs" / "grafana-dashboard.json"
SCREENSHOTS = REPO / "docs" / "screenshots"
TIMEOUT_MS = 30_000


# -- the pure parts -------------------------------------------------------------------------
def sample(
    t: float, used: dict[str, float], resets: dict[str, float] | None = None, weight: dict[str, float] | None = None
) -> Sample:
    return Sample(t, {}, used, resets or {c: 3600.0 - t for c in used}, weight or {c: 1.0 for c in used})


def test_gpu_by_client_counts_window_growth_new_windows_and_settlements() -> None:
    samples = [
        sample(0, {"key:a": 10.0}),  # already used before the view starts: not counted
        sample(5, {"key:a": 12.0, "session:s": 1.5}),  # +2; a newcomer: its whole window
        sample(10, {"key:a": 11.8, "session:s": 1.5}),  # a reservation settled 0.2 below estimate
        # key:a's window ended and a new one opened (resets_in went up): 0.7 is all new
        sample(15, {"key:a": 0.7, "session:s": 1.5}, resets={"key:a": 3599.0, "session:s": 3585.0}),
    ]
    series = gpu_by_client(samples)
    assert [t for t, _ in series] == [5, 10, 15]
    assert series[0][1] == {"key:a": 2.0, "session:s": 1.5}
    assert series[1][1]["key:a"] == pytest.approx(1.8)
    assert series[2][1] == pytest.approx({"key:a": 2.5, "session:s": 1.5})


def test_share_rows_split_the_total_by_weight_among_clients_that_used_any() -> None:
    w = {"key:free": 2.0, "key:pro": 4.0, "key:idle": 1.0}
    samples = [
        sample(0, {"key:free": 0.0, "key:pro": 0.0, "key:idle": 0.0}, weight=w),
        sample(5, {"key:free": 6.0, "key:pro": 3.0, "key:idle": 0.0}, weight=w),
    ]
    rows = {r[0]: r for r in share_rows(samples)}
    assert set(rows) == {"key:free", "key:pro"}  # an idle client has no claim on a share
    assert rows["key:free"][1:] == [2.0, 6.0, 3.0, 2.0]  # weight, used, fair (9 * 2/6), got/fair
    assert rows["key:pro"][1:] == [4.0, 3.0, 6.0, 0.5]
    assert share_rows([]) == []


def test_samples_keep_a_window_and_add_the_present() -> None:
    clock = [0.0]
    reads = {"n": 0}

    def read() -> tuple[dict[str, tuple[int, int]], list[dict[str, Any]]]:
        reads["n"] += 1
        return {"free": (2, 1)}, [{"client": "key:a", "used": clock[0], "resets_in_s": 60.0, "limits": {"weight": 2.0}}]

    s = Samples(read, clock=lambda: clock[0], every_s=5, keep_s=20)
    for t in range(0, 40, 5):
        clock[0] = float(t)
        s.record()
    clock[0] = 41.0
    window = s.window()
    assert [x.t for x in window] == [25.0, 30.0, 35.0, 41.0]  # the last 20 s, and now
    assert window[-1].depth == {"free": (2, 1)} and window[-1].weight == {"key:a": 2.0}


def test_override_values_read_the_form_and_name_a_bad_field() -> None:
    form = {"tier": " pro ", "max_queued": "3", "weight": "2.5", "gpu_seconds": "", "window_s": None}
    assert override_values(form) == {"tier": "pro", "max_queued": 3, "weight": 2.5}
    assert isinstance(override_values({"max_running": "2.0"})["max_running"], int)
    with pytest.raises(ValueError, match="max_queued"):
        override_values({"max_queued": "many"})


def test_store_name_says_which_store_is_in_force(tmp_path: Path) -> None:
    from splitspace.gpu_backend.stores.usage import MemoryUsageStore
    from splitspace.gpu_backend.stores.write_behind import SqliteUsageStore, WriteBehindStore

    store = WriteBehindStore(SqliteUsageStore(tmp_path / "state.sqlite3"))
    try:
        assert store_name(store) == "SQLite (write-behind)"  # words, not "WriteBehindStore over ..." (issue 21)
    finally:
        store.close()
    assert store_name(MemoryUsageStore()) == "memory (lost at restart)"

    class RedisStore:  # the shape of gpu_backend/stores/redis_store.py's (no server needed to name it)
        pass

    from splitspace.gpu_backend.stores.resilient_store import ResilientStore

    assert store_name(ResilientStore(RedisStore(), mode="closed")) == "Redis (refuses while it is down)"
    assert store_name(ResilientStore(RedisStore(), mode="local")) == "Redis (this process's memory while it is down)"


def test_plot_times_are_instants_whatever_the_servers_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plots send each sample as its instant (epoch ms), which the browser shows in its own
    zone: the second release sent the server's local clock time as if it were UTC."""
    import time

    import gradio as gr

    t = 1_780_000_000.0
    samples = [sample(t, {"key:a": 1.0}), sample(t + 2, {"key:a": 2.0})]
    monkeypatch.setenv("TZ", "Asia/Tokyo")  # a server nine hours from UTC
    time.tzset()
    try:
        for rows, y in ((depth_rows(samples), "jobs"), (gpu_rows(samples), "GPU-s")):
            sent = gr.LinePlot(x="time", y=y, **TIME_AXIS).postprocess(rows)
            assert {row[0] for row in sent.data} <= {t * 1000, (t + 2) * 1000}, y
    finally:
        monkeypatch.undo()
        time.tzset()
    assert TIME_AXIS["x_axis_format"] == "%H:%M:%S"  # 24-hour clock (Vega-Lite's default is "%I:%M", no am/pm)


def test_no_dashboard_without_an_admin_token(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from splitspace.gpu_backend.app import build_app
    from splitspace.shared.config.settings import Settings

    app = build_app(Settings(secret="s" * 32, model="sleep:1", state_path=tmp_path / "state.sqlite3"))
    client = TestClient(app)
    assert client.get("/admin/ui/").status_code == 404
    assert client.get("/admin/clients").status_code == 404


# -- the page, in a browser, against real tiers ----------------------------------------------
@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("dashboard"), model="sleep:300", quotas=QUOTAS)
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    playwright_sync = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    from tests.test_browser import CHROMIUM_ARGS, chromium_path

    if chromium_path() is None:
        pytest.skip("no chromium on PATH (apt-get install chromium, or set SPLITSPACE_CHROMIUM)")
    with playwright_sync.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield b
        b.close()


def log_in(browser: Any, dep: Deployment, password: str) -> Any:
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
    ctx.set_default_timeout(TIMEOUT_MS)
    page = ctx.new_page()
    page.goto(f"{dep.backend.url}/admin/ui/")
    page.get_by_label("username").fill("admin")
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()
    return page


@pytest.fixture(scope="module")
def operator(browser: Any, dep: Deployment) -> Iterator[Any]:
    """One logged-in dashboard page for the module."""
    page = log_in(browser, dep, dep.admin_token)
    page.get_by_text("splitspace · operators").wait_for()
    yield page
    page.context.close()


def cli(dep: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    return splitspace_cli(
        *args, env={"SPLITSPACE_BACKEND_URL": dep.backend.url, "SPLITSPACE_ADMIN_TOKEN": dep.admin_token}
    )


def quota_show(dep: Deployment, client: str) -> dict[str, Any]:
    out = cli(dep, "quota", "show", client, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_dashboard_needs_the_admin_token(dep: Deployment, browser: Any) -> None:
    # Nothing of it answers without the login: not the page's config, not its queue.
    assert httpx.get(f"{dep.backend.url}/admin/ui/config", timeout=10).status_code == 401
    join = httpx.post(f"{dep.backend.url}/admin/ui/gradio_api/queue/join", json={}, timeout=10)
    assert join.status_code in (401, 403), join.status_code
    page = log_in(browser, dep, dep.admin_token[::-1])
    try:
        page.get_by_text("Incorrect Credentials").wait_for()
        assert page.get_by_text("splitspace · operators").count() == 0
        assert dep.admin_token not in page.url
    finally:
        page.context.close()


def run_clients(dep: Deployment, names: tuple[str, ...]) -> list[str]:
    """One generate call per name (API keys), all at once; their final events."""
    finals: list[str] = []

    def one(name: str) -> None:
        with httpx.Client(timeout=60) as c:
            final, _ = call_rest(
                c,
                dep.frontend.url,
                "generate",
                gen_args(prompt=f"for {name}"),
                {"Authorization": f"Bearer {key(name)}"},
            )
        finals.append(final)

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return finals


def test_dashboard_shows_a_clients_share_after_a_run(dep: Deployment, operator: Any) -> None:
    # Three clients of two tiers (free: weight 2, pro: weight 4) share the GPU.
    assert run_clients(dep, ("beta", "alpha", "other", "beta", "alpha", "other")) == ["complete"] * 6
    row = operator.locator("#dashboard-shares").get_by_role("row").filter(has_text="key:beta")
    row.wait_for(timeout=15_000)  # the next refresh (every few seconds)
    cells = [c.strip() for c in row.get_by_role("gridcell").all_inner_texts()]
    assert cells[0] == "key:beta" and float(cells[1]) == 4.0  # the pro tier's weight
    assert float(cells[2]) > 0 and float(cells[3]) > 0  # its GPU time, and its fair share

    # The page was open before these clients came: their GPU time is drawn all the same (a
    # line each, named in the legend; the second release kept the first, empty, colours).
    def plotted() -> bool:
        names = operator.locator("#dashboard-gpu g.role-legend-label text").all_text_contents()
        return "key:beta" in names and operator.locator("#dashboard-gpu g.mark-line path").count() >= 2

    assert wait_for(plotted, 15), operator.locator("#dashboard-gpu g.role-legend-label text").all_text_contents()
    # The client table is `splitspace quota list`; a row picks the client for the form.
    listed = json.loads(cli(dep, "quota", "list", "--json").stdout)
    clients = operator.locator("#dashboard-clients")
    for c in listed:
        clients.get_by_role("row").filter(has_text=c["client"]).first.wait_for()
    clients.get_by_role("gridcell").filter(has_text="key:beta").first.click()
    assert wait_for(lambda: operator.get_by_label("Client id").input_value() == "key:beta", 10)
    model = cli(dep, "model", "show").stdout.strip()
    assert wait_for(lambda: operator.get_by_label("Model in use").input_value() == model, 10)
    assert operator.get_by_label("Usage store").input_value().startswith("SQLite")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    operator.screenshot(path=str(SCREENSHOTS / "dashboard.png"), full_page=True)


def test_on_a_phone_the_tables_scroll_and_the_time_axis_reads_the_24_hour_clock(dep: Deployment, browser: Any) -> None:
    import datetime

    # a browser zone where it is now 15:00-15:59, so that a 12-hour axis ("03:..") cannot pass
    offset = (15 - datetime.datetime.now(datetime.UTC).hour + 12) % 24 - 12
    zone = "Etc/GMT" + (f"{-offset:+d}" if offset else "")
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True, timezone_id=zone)
    ctx.set_default_timeout(TIMEOUT_MS)
    page = ctx.new_page()
    try:
        page.goto(f"{dep.backend.url}/admin/ui")
        page.get_by_label("username").fill("admin")
        page.get_by_label("password").fill(dep.admin_token)
        page.get_by_role("button", name="Login").click()
        page.locator("#dashboard-clients th").last.wait_for()
        page.locator("g.role-axis-label text").first.wait_for()
        hours = page.evaluate("() => new Date().getHours()")

        def time_labels() -> list[str]:
            labels = page.locator("g.role-axis-label text").all_text_contents()
            return [x for x in labels if re.fullmatch(r"\d\d:\d\d:\d\d", x)]

        times = wait_for(time_labels, 15)  # the axis has clock times once a refresh drew the plot
        assert times, page.locator("g.role-axis-label text").all_text_contents()
        assert {x[:2] for x in times} <= {f"{hours:02d}", f"{(hours - 1) % 24:02d}"}, (hours, times)
        assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")  # no page overflow
        for table in ("#dashboard-clients", "#dashboard-shares"):
            # every column can be reached: the table scrolls sideways inside its box
            reach = page.evaluate(
                """(sel) => {
                const box = document.querySelector(sel).getBoundingClientRect();
                const view = document.querySelector(sel + ' .virtual-table-viewport');
                const style = getComputedStyle(view);
                view.scrollLeft = view.scrollWidth;
                const heads = [...document.querySelectorAll(sel + ' th')];
                const last = heads[heads.length - 1].getBoundingClientRect();
                return {scrolls: ['auto', 'scroll'].includes(style.overflowX),
                        lastInside: last.right <= box.right + 1 && last.left >= box.left - 1};
            }""",
                table,
            )
            assert reach == {"scrolls": True, "lastInside": True}, (table, reach)
        page.screenshot(path=str(SCREENSHOTS / "dashboard-phone.png"), full_page=True)
        page.get_by_text("Log out", exact=True).click()
        page.get_by_label("username").wait_for()  # the login form again: this session is over
        assert page.get_by_text("splitspace · operators").count() == 0
    finally:
        ctx.close()


def test_override_set_on_the_dashboard_is_what_the_cli_shows(dep: Deployment, operator: Any) -> None:
    client = "key:other"
    result = operator.locator("#dashboard-result")
    operator.get_by_label("Client id").fill(client)
    operator.get_by_label("max_queued", exact=True).fill("3")
    operator.get_by_label("weight", exact=True).fill("")
    operator.get_by_role("button", name="Set override").click()
    result.get_by_text(f"{client} · ").wait_for()
    assert "max_queued=3" in result.inner_text()
    shown = quota_show(dep, client)
    assert shown["overrides"] == {"max_queued": 3} and shown["limits"]["max_queued"] == 3

    operator.get_by_label("max_queued", exact=True).fill("-1")  # the admin API's own check refuses it
    operator.get_by_role("button", name="Set override").click()
    result.get_by_text(re.compile("Refused: HTTP 422: .*max_queued")).wait_for()
    assert quota_show(dep, client)["overrides"] == {"max_queued": 3}

    operator.get_by_role("button", name="Clear override").click()
    result.get_by_text("overrides: none").wait_for()
    assert quota_show(dep, client)["overrides"] == {}


def test_reset_usage_on_the_dashboard(dep: Deployment, operator: Any) -> None:
    with httpx.Client(timeout=60) as c:
        call_rest(c, dep.frontend.url, "generate", gen_args(), {"Authorization": f"Bearer {key('alpha')}"})
    assert quota_show(dep, "key:alpha")["used"] > 0
    operator.get_by_label("Client id").fill("key:alpha")
    operator.get_by_role("button", name="Reset usage").click()
    operator.locator("#dashboard-result").get_by_text("0.00 GPU-s used").wait_for()
    assert quota_show(dep, "key:alpha")["used"] == 0


def test_model_switch_on_the_dashboard(dep: Deployment, operator: Any) -> None:
    before = cli(dep, "model", "show").stdout.strip()
    after = "sleep:200" if before != "sleep:200" else "sleep:250"
    operator.get_by_text("Switch model").first.click()  # open its section
    try:
        operator.get_by_label("Model spec").fill(after)
        operator.get_by_role("button", name="Switch model", exact=True).click()
        operator.get_by_text(f"model: {before} → {after}").wait_for()
        assert cli(dep, "model", "show").stdout.strip() == after
        assert wait_for(lambda: operator.get_by_label("Model in use").input_value() == after, 10)
    finally:
        cli(dep, "model", "set", before)


# -- Grafana ----------------------------------------------------------------------------------
def grafana_metric_names() -> set[str]:
    doc = json.loads(GRAFANA.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", []) if "expr" in t]
    assert exprs, "the Grafana dashboard has no queries"
    return {m for e in exprs for m in re.findall(r"\bsplitspace_[a-z_]+\b", e)}


def exposed_names(text: str) -> set[str]:
    """Every series name a Prometheus server would store from this exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
        "summary": ("_count", "_sum", "_created"),
    }
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
        names |= {s.name for s in family.samples}
    return names


def test_every_metric_the_grafana_dashboard_queries_exists(dep: Deployment) -> None:
    with httpx.Client(timeout=60) as c:  # one run, so that the counters and histogram have samples
        call_rest(c, dep.frontend.url, "generate", gen_args(), {"Authorization": f"Bearer {key('beta')}"})
    r = httpx.get(f"{dep.backend.url}/metrics", timeout=10)
    assert r.status_code == 200
    exposed = exposed_names(r.text)
    queried = grafana_metric_names()
    assert queried, "no splitspace metric in the Grafana dashboard"
    missing = sorted(queried - exposed)
    assert not missing, f"queried but not exposed by /metrics: {missing}"
    doc = json.loads(GRAFANA.read_text())
    assert doc["title"] and doc["uid"] and doc.get("schemaVersion")
    assert all(p.get("datasource", {}).get("uid") == "${datasource}" for p in doc["panels"] if "targets" in p)


def test_grafana_metric_check_can_fail() -> None:
    """The check above finds a metric that /metrics does not have (it is not vacuous)."""
    text = '# HELP splitspace_queued q\n# TYPE splitspace_queued gauge\nsplitspace_queued{tier="free"} 1\n'
    assert "splitspace_queued" in exposed_names(text)
    assert "splitspace_gpu_seconds_total" not in exposed_names(text)
