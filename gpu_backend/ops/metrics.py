"""Prometheus metrics of the GPU tier, served at ``/metrics``.

Counters and the wait histogram are fed by the runner's events; queue depth
and running jobs per tier are read from the scheduler at scrape time, so they
are never stale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from splitspace.gpu_backend.admission.runner import RunEvent, RunEventKind

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _DepthCollector:
    def __init__(self, depth_by_tier: Callable[[], dict[str, tuple[int, int]]]) -> None:
        self._depth = depth_by_tier

    def collect(self):  # type: ignore[no-untyped-def]
        queued = GaugeMetricFamily("splitspace_queued", "Requests waiting, by tier", labels=["tier"])
        running = GaugeMetricFamily("splitspace_running", "Requests on the GPU, by tier", labels=["tier"])
        for tier, (q, r) in sorted(self._depth().items()):
            queued.add_metric([tier], q)
            running.add_metric([tier], r)
        yield queued
        yield running


class GpuMetrics:
    def __init__(self, depth_by_tier: Callable[[], dict[str, tuple[int, int]]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_DepthCollector(depth_by_tier))
        self.wait = Histogram(
            "splitspace_wait_seconds",
            "Time from admission to the GPU",
            ["tier"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.gpu_seconds = Counter("splitspace_gpu_seconds", "GPU time used, by tier", ["tier"], registry=self.registry)
        self.refusals = Counter(
            "splitspace_refusals", "Requests refused, by reason", ["reason"], registry=self.registry
        )
        self.calls = Counter(
            "splitspace_calls", "Calls that reached the GPU tier's call route, before any check", registry=self.registry
        )
        self.function_calls = Counter(
            "splitspace_function_calls",
            "Calls of the app's GPU functions that reached the GPU tier, by function",
            ["endpoint"],
            registry=self.registry,
        )
        self.requests = Counter("splitspace_requests", "Requests by outcome", ["outcome"], registry=self.registry)

    def on_event(self, kind: RunEventKind, data: RunEvent) -> None:
        """The runner's ``on_event``: counts each request's outcome, its wait and GPU time."""
        if kind == "started":
            self.wait.labels(data["tier"]).observe(data["wait_s"])
        elif kind in ("finished", "stopped"):  # stopped: a stream whose caller left, charged what it used
            self.gpu_seconds.labels(data["tier"]).inc(data["gpu_s"])
            self.requests.labels(kind).inc()
        elif kind == "refused":
            self.refusals.labels(data["reason"]).inc()
            self.requests.labels("refused").inc()
        elif kind in ("admitted", "cancelled"):
            self.requests.labels(kind).inc()

    def refuse(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
