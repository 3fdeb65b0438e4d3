"""The operators' dashboard: a Gradio page at ``/admin/ui`` on the GPU tier.

Why this module exists: operators had a CLI, an admin API and Prometheus, and nothing
to look at. This page shows the queue by tier and each client's GPU time against its
weighted fair share over the last ten minutes, the client table of ``splitspace quota
list`` with a form for overrides and resets, the model with a switch, and the usage
store in force.

It adds no second copy of the admin logic: every read and change of clients and the
model is a call to the admin API itself (``/admin/...``), made in-process through
``httpx.ASGITransport`` with the admin token, exactly as the CLI makes it over the
network. The plots read a small ring of samples, taken every few seconds by a thread
from the same scheduler reads the admin API and ``/metrics`` use
(``FairScheduler.clients`` and ``depth_by_tier``, under the runner's lock).

It exists only when the admin API does (an admin token is set), and sits behind the
same token through Gradio's login (``auth=``, compared with ``hmac.compare_digest``):
user name ``admin``, password the token. The token never travels in a URL. Its logins
end (``operator_sessions.OperatorSessions`` replaces Gradio's token dict), and only its own
page may post to it (``operator_guard.py``).
"""

from __future__ import annotations

import dataclasses
import hmac
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote

import gradio as gr
import httpx
import pandas as pd
from fastapi import FastAPI
from gradio.routes import App
from starlette.routing import Mount

from splitspace.gpu_backend.ops.operator_sessions import OperatorSessions
from splitspace.shared.contract.admin_api import ClientStanding, ClientStats, ModelChange, ModelInfo
from splitspace.shared.contract.headers import ADMIN_HEADER
from splitspace.shared.contract.quotas import OverrideValues, Tier

if TYPE_CHECKING:
    from splitspace.gpu_backend.app import GpuTier
    from splitspace.gpu_backend.stores.resilient_store import ResilientStore
    from splitspace.gpu_backend.stores.usage import UsageLedger

__all__ = [
    "DASHBOARD_PATH",
    "AdminCalls",
    "AdminCallFailed",
    "Sample",
    "Samples",
    "depth_rows",
    "gpu_rows",
    "share_rows",
    "store_name",
    "override_values",
    "build_dashboard",
    "mount_dashboard",
]

DASHBOARD_PATH = "/admin/ui"
SAMPLE_EVERY_S = 2.0
KEEP_S = 600.0
REFRESH_S = 3.0
ADMIN_USER = "admin"
IN_PROCESS = "dashboard"
"""The address the dashboard's own admin calls come from (no socket has it)."""
OVERRIDE_FIELDS = ("tier", *(f.name for f in dataclasses.fields(Tier)))
"""What an override may set: a tier, or any of a tier's limits (shared/contract/quotas.py)."""
_INT_FIELDS = {f.name for f in dataclasses.fields(Tier) if str(f.type).split("|")[0].strip() == "int"}
"""Limits the quota file wants as whole numbers (max_running, max_queued, requests_per_minute)."""
TIME_AXIS: dict[str, Any] = {"x_title": "time (your clock, 24 h)", "x_axis_format": "%H:%M:%S"}
"""The plots' time axis: 24-hour clock time in the browser's own zone (Vega-Lite's default
label for minutes is 12-hour, "%I:%M", without am/pm: 14:09 read 02:09; seconds, because
ticks come every few seconds in a short window)."""
CLIENT_COLUMNS = ["client", "tier", "queued", "running", "used GPU-s", "remaining GPU-s", "resets in s", "overrides"]
SHARE_COLUMNS = ["client", "weight", "GPU-s, last 10 min", "weighted fair share", "got / fair"]


# -- the admin API, in-process -------------------------------------------------------------
class AdminCallFailed(Exception):
    """The admin API refused a call; the message is its ``detail`` (names the field)."""


class AdminCalls:
    """The admin API's own endpoints, called in-process with the admin token (what
    ``deploy/admin_client.py`` does over the network)."""

    def __init__(self, app: FastAPI, token: str) -> None:
        self._http = httpx.AsyncClient(
            # its own caller address: the guess throttle (operator_guard.py) never counts it as loopback's
            transport=httpx.ASGITransport(app=app, client=(IN_PROCESS, 0)),
            base_url="http://gpu-tier",
            headers={ADMIN_HEADER: token},
            timeout=None,
        )

    async def _call(self, method: str, path: str, json: OverrideValues | dict[str, str] | None = None) -> object:
        """The decoded JSON of the API's answer (its shape: ``shared/contract/admin_api.py``)."""
        r = await self._http.request(method, f"/admin{path}", json=json)
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise AdminCallFailed(f"HTTP {r.status_code}: {detail}")
        return r.json()

    async def clients(self) -> list[ClientStanding]:
        return cast(list[ClientStanding], await self._call("GET", "/clients"))

    async def show(self, client: str) -> ClientStanding:
        return cast(ClientStanding, await self._call("GET", f"/clients/{quote(client, safe=':')}"))

    async def set(self, client: str, values: OverrideValues) -> ClientStanding:
        return cast(ClientStanding, await self._call("PUT", f"/clients/{quote(client, safe=':')}", json=values))

    async def clear(self, client: str) -> ClientStanding:
        return cast(ClientStanding, await self._call("DELETE", f"/clients/{quote(client, safe=':')}"))

    async def reset(self, client: str) -> ClientStanding:
        return cast(ClientStanding, await self._call("POST", f"/reset/{quote(client, safe=':')}"))

    async def model(self) -> ModelInfo:
        return cast(ModelInfo, await self._call("GET", "/model"))

    async def set_model(self, spec: str) -> ModelChange:
        return cast(ModelChange, await self._call("PUT", "/model", json={"model": spec}))


# -- samples for the plots -------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """The scheduler at one moment: depth by tier, and each client's charged GPU time."""

    t: float
    depth: dict[str, tuple[int, int]]
    """tier -> (queued, running)"""
    used: dict[str, float]
    """client -> GPU-seconds charged in its live window"""
    resets_in: dict[str, float]
    weight: dict[str, float]

    @classmethod
    def of(cls, t: float, depth: dict[str, tuple[int, int]], clients: list[ClientStats]) -> Sample:
        return cls(
            t=t,
            depth=dict(depth),
            used={c["client"]: float(c["used"]) for c in clients},
            resets_in={c["client"]: float(c["resets_in_s"]) for c in clients},
            weight={c["client"]: float(c["limits"]["weight"]) for c in clients},
        )


class Samples:
    """A ring of the last ``keep_s`` seconds of samples, one every ``every_s``, taken by a
    daemon thread (the reads take the runner's lock briefly, as ``/metrics`` does)."""

    def __init__(
        self,
        read: Callable[[], tuple[dict[str, tuple[int, int]], list[ClientStats]]],
        *,
        clock: Callable[[], float] = time.time,
        every_s: float = SAMPLE_EVERY_S,
        keep_s: float = KEEP_S,
    ) -> None:
        self._read = read
        self._clock = clock
        self.every_s = every_s
        self.keep_s = keep_s
        self._ring: deque[Sample] = deque(maxlen=int(keep_s / every_s) + 2)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self) -> Sample:
        depth, clients = self._read()
        return Sample.of(self._clock(), depth, clients)

    def record(self) -> Sample:
        sample = self.take()
        with self._lock:
            self._ring.append(sample)
        return sample

    def window(self, with_now: bool = True) -> list[Sample]:
        """The samples of the last ``keep_s`` seconds, oldest first (and one taken now)."""
        with self._lock:
            samples = list(self._ring)
        if with_now:
            samples.append(self.take())
        cutoff = samples[-1].t - self.keep_s if samples else 0.0
        return [s for s in samples if s.t >= cutoff]

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.record()
                except Exception:  # noqa: BLE001 - a failed sample is a gap in a plot, not a crash
                    pass
                self._stop.wait(self.every_s)

        self._thread = threading.Thread(target=loop, name="dashboard-samples", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


def _when(t: float) -> datetime:
    """A sample's time, with its zone: the plots send it as an instant (epoch ms), which the
    browser shows in its own local time. (A naive local datetime was read as UTC by pandas'
    JSON: the axis was off by the server's offset.)"""
    return datetime.fromtimestamp(t, tz=UTC)


_TIME = "datetime64[ms, UTC]"


def _frame(rows: list[dict[str, object]], types: dict[str, str]) -> pd.DataFrame:
    """A plot's rows with their column types even when there are none yet: a plot whose first
    value had no rows (so no types: "nominal" for all) stayed blank after rows came (the
    GPU-seconds plot did)."""
    return pd.DataFrame(rows, columns=list(types)).astype(types)


def depth_rows(samples: list[Sample]) -> pd.DataFrame:
    """Queued and running jobs over time: in all, and by tier (the tiers seen in the window)."""
    tiers = sorted({tier for s in samples for tier in s.depth})
    rows: list[dict[str, object]] = []
    for s in samples:
        when = _when(s.t)
        rows.append({"time": when, "series": "all queued", "jobs": sum(q for q, _ in s.depth.values())})
        rows.append({"time": when, "series": "all running", "jobs": sum(r for _, r in s.depth.values())})
        for tier in tiers:
            q, r = s.depth.get(tier, (0, 0))
            rows.append({"time": when, "series": f"{tier} queued", "jobs": q})
            rows.append({"time": when, "series": f"{tier} running", "jobs": r})
    return _frame(rows, {"time": _TIME, "series": "str", "jobs": "int64"})


def gpu_by_client(samples: list[Sample]) -> list[tuple[float, dict[str, float]]]:
    """Each client's GPU time charged since the first sample, at every sample.

    The store counts usage in fixed windows; between two samples a client's charge grows
    by the difference of its window's totals, or, when a new window opened (its
    ``resets_in`` went up, or it was not there before), by the new window's total.
    Differences may be negative (a reservation settled below its estimate); a total
    never goes below zero."""
    out: list[tuple[float, dict[str, float]]] = []
    total: dict[str, float] = {}
    for prev, cur in zip(samples, samples[1:], strict=False):
        for client, used in cur.used.items():
            before = prev.used.get(client)
            new_window = before is None or cur.resets_in.get(client, 0.0) > prev.resets_in.get(client, 0.0) + 1.0
            step = used if new_window else used - before  # type: ignore[operator]
            total[client] = max(0.0, total.get(client, 0.0) + step)
        out.append((cur.t, dict(total)))
    return out


def gpu_rows(samples: list[Sample]) -> pd.DataFrame:
    """GPU-seconds per client over the window, as lines (one per client)."""
    rows: list[dict[str, object]] = [
        {"time": _when(t), "client": client, "GPU-s": round(value, 3)}
        for t, totals in gpu_by_client(samples)
        for client, value in totals.items()
    ]
    return _frame(rows, {"time": _TIME, "client": "str", "GPU-s": "float64"})


def share_rows(samples: list[Sample]) -> list[list[str | float | None]]:
    """Each client's GPU time in the window against its weighted fair share: the total
    used, split in proportion to the weights of the clients that used any."""
    series = gpu_by_client(samples)
    totals = series[-1][1] if series else {}
    weights = samples[-1].weight if samples else {}
    active = {c: v for c, v in totals.items() if v > 0}
    weight_sum = sum(weights.get(c, 1.0) for c in active)
    grand = sum(active.values())
    rows: list[list[str | float | None]] = []
    for client, used in sorted(active.items(), key=lambda kv: -kv[1]):
        w = weights.get(client, 1.0)
        fair = grand * w / weight_sum if weight_sum else 0.0
        rows.append([client, w, round(used, 2), round(fair, 2), round(used / fair, 2) if fair else None])
    return rows


def store_name(store: UsageLedger | ResilientStore) -> str:
    """The usage store in force, in an operator's words: "SQLite (write-behind)", "Redis
    (refuses while it is down)", "memory (lost at restart)"; never a class name unless
    the store is of a kind this does not know."""
    primary = getattr(store, "primary", None)
    if primary is not None:  # ResilientStore: a shared store, and what happens while it is down
        while_down = {"closed": "refuses while it is down", "local": "this process's memory while it is down"}
        name = store_name(primary)
        mode = getattr(store, "mode", None)
        return f"{name} ({while_down[mode]})" if mode in while_down else name
    backing = getattr(store, "backing", None)
    if backing is not None:  # WriteBehindStore: memory first, the file soon after
        return f"{store_name(backing)} (write-behind)"
    kind = type(store).__name__
    for word, name in (("redis", "Redis"), ("sqlite", "SQLite"), ("memory", "memory (lost at restart)")):
        if word in kind.lower():
            return name
    return kind


def override_values(form: dict[str, object]) -> OverrideValues:
    """The form's filled-in fields as an override: empty ones left out, numbers read as
    whole numbers where the quota file wants integers; the admin API's own checks
    (``validate_overrides``) judge the rest. Raises ValueError naming a field that is
    not a number."""
    values: dict[str, str | float] = {}
    for name in OVERRIDE_FIELDS:
        text = str(form.get(name) or "").strip()
        if not text:
            continue
        if name == "tier":
            values[name] = text
            continue
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{name}: not a number: {text[:40]!r}") from None
        values[name] = int(number) if name in _INT_FIELDS and number.is_integer() else number
    return cast(OverrideValues, values)  # each a field of OVERRIDE_FIELDS, its value text or a number


def _client_table(clients: list[ClientStanding]) -> list[list[str | int | float]]:
    def overrides(o: OverrideValues | None) -> str:
        return ", ".join(f"{k}={v}" for k, v in (o or {}).items())

    return [
        [
            c["client"],
            c["tier"],
            c["queued"],
            c["running"],
            round(float(c["used"]), 2),
            round(float(c["remaining"]), 2),
            round(float(c["resets_in_s"])),
            overrides(c.get("overrides")),
        ]
        for c in clients
    ]


# -- the page ----------------------------------------------------------------------------------
def build_dashboard(calls: AdminCalls, samples: Samples, store: str) -> gr.Blocks:
    with gr.Blocks(title="splitspace · operators") as dash:
        with gr.Row():
            gr.Markdown("# splitspace · operators\nThe GPU tier's queue, clients and model, live.")
            # Gradio's logout, for this browser's session only (the token is forgotten at once)
            gr.Button(
                "Log out",
                link=f"{DASHBOARD_PATH}/logout?all_session=false",
                size="sm",
                scale=0,
                min_width=100,
                elem_id="dashboard-logout",
            )
        with gr.Row():
            model_box = gr.Textbox(label="Model in use", interactive=False, scale=2)
            gr.Textbox(store, label="Usage store", interactive=False, scale=2)
        with gr.Row():
            depth_plot = gr.LinePlot(
                x="time",
                y="jobs",
                color="series",
                title="Queued and running by tier, last 10 min",
                y_title="jobs",
                height=260,
                **TIME_AXIS,
            )
            gpu_plot = gr.LinePlot(
                x="time",
                y="GPU-s",
                color="client",
                title="GPU-seconds per client, last 10 min",
                y_title="GPU-s",
                height=260,
                elem_id="dashboard-gpu",
                **TIME_AXIS,
            )
        share_table = gr.Dataframe(
            headers=SHARE_COLUMNS,
            label="GPU time against weighted fair share, last 10 min",
            interactive=False,
            elem_id="dashboard-shares",
        )
        clients_table = gr.Dataframe(
            headers=CLIENT_COLUMNS,
            label="Clients (splitspace quota list); click a row to edit",
            interactive=False,
            elem_id="dashboard-clients",
        )
        with gr.Accordion("Override, clear or reset a client", open=True):
            client_box = gr.Textbox(label="Client id", placeholder="key:NAME, session:ID or addr:ADDRESS")
            with gr.Row():
                fields = {
                    name: gr.Textbox(label=name, placeholder="unchanged", min_width=110) for name in OVERRIDE_FIELDS
                }
            with gr.Row():
                set_btn = gr.Button("Set override", variant="primary")
                clear_btn = gr.Button("Clear override")
                reset_btn = gr.Button("Reset usage", variant="stop")
            result = gr.Markdown(elem_id="dashboard-result")
        with gr.Accordion("Switch model", open=False):
            with gr.Row():
                spec_box = gr.Textbox(label="Model spec", placeholder="tiny, sleep:MS, or a diffusers id or path")
                switch_btn = gr.Button("Switch model")
            switch_result = gr.Markdown()
        timer = gr.Timer(REFRESH_S)

        async def refresh() -> tuple[Any, ...]:
            window = samples.window()
            try:
                clients = _client_table(await calls.clients())
                model = (await calls.model())["model"]
            except AdminCallFailed as exc:
                clients, model = gr.skip(), f"unavailable ({exc})"
            depth = depth_rows(window)
            peak = int(depth["jobs"].max()) if len(depth) else 0
            gpu_s = gpu_rows(window)
            most = float(gpu_s["GPU-s"].max()) if len(gpu_s) else 0.0
            # Both from 0: a flat line drawn on the plot's own edge (its min or max) was not seen.
            # The clients as legend: Gradio redraws a plot's colours only when such a property
            # changes (a value alone keeps the first one's, so clients that came later had no line).
            seen = sorted(set(gpu_s["client"])) or None
            return (
                gr.LinePlot(depth, y_lim=[0, max(2, peak)]),
                gr.LinePlot(gpu_s, y_lim=[0, max(1.0, most * 1.2)], colors_in_legend=seen),
                share_rows(window),
                clients,
                model,
            )

        def pick(evt: gr.SelectData) -> Any:
            row = evt.row_value or []
            return row[0] if row else gr.skip()

        def change(action: str) -> Callable[..., Awaitable[str]]:
            async def run(client: str, *form: object) -> str:
                client = (client or "").strip()
                if not client:
                    return "**Client id:** give one (pick a row of the table)."
                try:
                    if action == "set":
                        try:
                            values = override_values(dict(zip(fields, form, strict=True)))
                        except ValueError as exc:
                            return f"**Refused:** {exc}"
                        if not values:
                            return "**Override:** fill in at least one field."
                        doc = await calls.set(client, values)
                    elif action == "clear":
                        doc = await calls.clear(client)
                    else:
                        doc = await calls.reset(client)
                except AdminCallFailed as exc:
                    return f"**Refused:** {exc}"
                overrides = ", ".join(f"{k}={v}" for k, v in doc["overrides"].items()) or "none"
                return (
                    f"**{doc['client']}** · tier {doc['tier']} · {float(doc['used']):.2f} GPU-s used · "
                    f"overrides: {overrides}"
                )

            return run

        async def switch(spec: str) -> tuple[str, Any]:
            try:
                doc = await calls.set_model((spec or "").strip())
            except AdminCallFailed as exc:
                return f"**Refused:** {exc}", gr.skip()
            return f"model: {doc['previous']} → {doc['model']}", doc["model"]

        private: dict[str, Any] = {"api_visibility": "private"}
        outputs = [depth_plot, gpu_plot, share_table, clients_table, model_box]
        timer.tick(refresh, None, outputs, show_progress="hidden", **private)
        dash.load(refresh, None, outputs, show_progress="hidden", **private)
        clients_table.select(pick, None, client_box, show_progress="hidden", **private)
        form = [client_box, *fields.values()]
        for btn, action in ((set_btn, "set"), (clear_btn, "clear"), (reset_btn, "reset")):
            btn.click(change(action), form, result, **private).then(refresh, None, outputs, **private)
        switch_btn.click(switch, spec_box, [switch_result, model_box], **private)
    return dash


def mount_dashboard(app: FastAPI, tier: GpuTier, token: str, sessions: OperatorSessions | None = None) -> FastAPI:
    """Mount the dashboard at ``/admin/ui`` behind a login with the admin token
    (call before the main mount at ``/``, which catches every path after it). Its logins
    are kept in ``sessions`` (``app.state.operator_sessions``): they end after a while."""
    from splitspace.gpu_backend.admission.scheduler import FairScheduler

    samples = Samples(lambda: tier.with_scheduler(lambda s: (FairScheduler.depth_by_tier(s), FairScheduler.clients(s))))
    samples.record()
    samples.start()
    app.state.dashboard_samples = samples
    dash = build_dashboard(AdminCalls(app, token), samples, store_name(tier.store))
    dash.queue(default_concurrency_limit=4)

    def login(username: str, password: str) -> bool:
        user_ok = hmac.compare_digest(username.encode(), ADMIN_USER.encode())
        return hmac.compare_digest(password.encode(), token.encode()) and user_ok

    app = gr.mount_gradio_app(
        app,
        dash,
        path=DASHBOARD_PATH,
        auth=login,
        ssr_mode=False,
        footer_links=[],
        auth_message="Operators only. User name: admin. Password: the GPU tier's admin token (SPLITSPACE_ADMIN_TOKEN).",
    )
    # Gradio keeps its login tokens in App.tokens, a dict nothing empties but a logout:
    # sessions that end replace it (tests/test_operator_guard.py fails if this stops applying).
    (gradio_app,) = [r.app for r in app.routes if isinstance(r, Mount) and r.path == DASHBOARD_PATH]
    if not isinstance(gradio_app, App) or not isinstance(gradio_app.tokens, dict):
        raise RuntimeError("gradio's App.tokens is no longer a dict: the dashboard's sessions would not end")
    # (a patch: Gradio types App.tokens as a dict; OperatorSessions is a mapping whose sessions end)
    gradio_app.tokens = app.state.operator_sessions = sessions or OperatorSessions()  # type: ignore[assignment]
    return app
