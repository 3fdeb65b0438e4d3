"""The asyncio glue between Gradio handlers, the fair scheduler and the GPU thread.

The scheduler core is pure; this module owns the event loop side: it submits
each request, pumps ``dispatch`` whenever the state changes (work-conserving),
runs each dispatched batch on a dedicated GPU thread, settles measured GPU
time, and streams status (position, ETA) to the waiting handler. Everything
here runs on the event loop thread except the batch itself, so the scheduler
needs no lock.

A waiting handler that goes away (the caller disconnected or cancelled) has
its job removed from the queue at once; a batch already on the GPU finishes
and its slot is freed only when the thread returns, so two jobs never overlap.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import functools
import io
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from session.identity import Identity
from shared.errors import QUEUE_FULL, QUOTA_EXCEEDED, RATE_LIMITED, Throttled
from shared.schema import MAX_SEED, GenerateRequest

from .cost import CostModel
from .scheduler import ClientRef, FairScheduler, Job, Outcome

log = logging.getLogger("splitspace.gpu")

_TITLES = {
    Outcome.QUEUE_FULL: QUEUE_FULL,
    Outcome.QUOTA_EXCEEDED: QUOTA_EXCEEDED,
    Outcome.RATE_LIMITED: RATE_LIMITED,
}

BatchFn = Callable[[list[GenerateRequest], list[int]], list[Any]]


def client_ref(identity: Identity) -> ClientRef:
    return ClientRef(
        client_id=identity.client_id, kind=identity.kind, tier=identity.tier, address=identity.address
    )


def encode_png(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class _Waiter:
    request: GenerateRequest
    seed: int
    steps: int
    guidance: float
    submitted: float
    context: contextvars.Context
    future: asyncio.Future[dict[str, Any]]
    started: float | None = None
    abandoned: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class GpuRunner:
    def __init__(
        self,
        scheduler: FairScheduler,
        cost: CostModel,
        *,
        run_batch: BatchFn,
        resolve: Callable[[GenerateRequest, int], tuple[int, float]],
        model_name: Callable[[], str],
        max_batch: int = 1,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.cost = cost
        self.max_batch = max_batch
        self._run_batch_fn = run_batch
        self._resolve = resolve
        self._model_name = model_name
        self._clock = clock
        self._on_event = on_event or (lambda kind, data: None)
        self._waiters: dict[str, _Waiter] = {}
        self._pool = ThreadPoolExecutor(max_workers=scheduler.capacity, thread_name_prefix="gpu")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- the handler side ---------------------------------------------------------------
    async def generate(
        self, identity: Identity, request: GenerateRequest
    ) -> AsyncIterator[dict[str, Any]]:
        """Admit, wait for a fair turn (yielding status), run, and yield the final result.

        Raises Throttled when a limit refuses the request. Closing the generator
        while it waits removes the job from the queue.
        """
        seed = request.seed if request.seed >= 0 else secrets.randbelow(MAX_SEED + 1)
        steps, guidance = self._resolve(request, seed)
        estimate = self.cost.estimate(steps, request.width, request.height)
        job_id = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        waiter = _Waiter(
            request=request, seed=seed, steps=steps, guidance=guidance,
            submitted=self._clock(), context=contextvars.copy_context(),
            future=loop.create_future(),
        )
        batch_key = (request.width, request.height, steps, guidance)
        admission = self.scheduler.submit(job_id, client_ref(identity), estimate, batch_key)
        if not admission.ok:
            self._on_event("refused", {"tier": identity.tier, "reason": admission.outcome.name.lower()})
            raise Throttled(_TITLES.get(admission.outcome, QUEUE_FULL), admission.reason, admission.retry_after_s)
        self._waiters[job_id] = waiter
        self._on_event("admitted", {"tier": identity.tier})
        self._pump()
        try:
            last: tuple[int, float] | None = None
            last_sent = 0.0
            while not waiter.future.done():
                place = self.scheduler.position(job_id)
                now = self._clock()
                if place is not None:
                    pos, eta = place
                    shown = (pos, round(eta, 1))
                    if shown != last or now - last_sent >= 1.0:
                        last, last_sent = shown, now
                        yield {"status": "queued", "position": pos, "eta_s": round(eta, 1)}
                    interval = 0.25 if pos <= 10 else 1.0
                else:
                    if last != (0, 0.0):
                        last, last_sent = (0, 0.0), now
                        yield {"status": "running", "position": 0, "eta_s": 0.0}
                    interval = 1.0
                await asyncio.wait([waiter.future], timeout=interval)
            yield waiter.future.result()
        finally:
            if not waiter.future.done():
                waiter.abandoned = True
                if self.scheduler.cancel(job_id):
                    self._waiters.pop(job_id, None)
                    self._on_event("cancelled", {"tier": identity.tier})
                    self._pump()

    # -- the GPU side -------------------------------------------------------------------
    def _pump(self) -> None:
        """Start every batch the scheduler will dispatch now (work-conserving)."""
        while True:
            jobs = self.scheduler.dispatch(self.max_batch)
            if not jobs:
                return
            asyncio.get_running_loop().create_task(self._run(jobs))

    def _execute(self, requests: list[GenerateRequest], seeds: list[int]) -> tuple[list[str], float]:
        t0 = time.perf_counter()
        images = self._run_batch_fn(requests, seeds)
        gpu_s = time.perf_counter() - t0
        return [encode_png(img) for img in images], gpu_s

    async def _run(self, jobs: list[Job]) -> None:
        waiters = [self._waiters[j.job_id] for j in jobs]
        now = self._clock()
        for job, w in zip(jobs, waiters):
            w.started = now
            self._on_event("started", {"tier": job.client.tier, "wait_s": now - w.submitted})
        requests = [w.request for w in waiters]
        seeds = [w.seed for w in waiters]
        loop = asyncio.get_running_loop()
        call = functools.partial(waiters[0].context.run, self._execute, requests, seeds)
        try:
            images, gpu_s = await loop.run_in_executor(self._pool, call)
        except BaseException as exc:  # the model failed: every job of the batch gets the error
            gpu_s = self._clock() - now
            self._settle(jobs, gpu_s)
            for w in waiters:
                if not w.future.done():
                    w.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
                    w.future.exception()  # mark retrieved: an abandoned waiter must not warn
            log.warning("batch of %d failed: %s", len(jobs), type(exc).__name__)
            self._pump()
            return
        first = requests[0]
        self.cost.observe(waiters[0].steps, first.width, first.height, len(jobs), gpu_s)
        shares = self._settle(jobs, gpu_s)
        done = self._clock()
        for job, w, png, share in zip(jobs, waiters, images, shares):
            self._on_event("finished", {"tier": job.client.tier, "gpu_s": share})
            if not w.future.done():
                w.future.set_result(self._result(job, w, png, share, done))
        self._pump()

    def _settle(self, jobs: list[Job], gpu_s: float) -> list[float]:
        """Charge each job its share of the measured time, in proportion to its estimate."""
        total = sum(j.cost for j in jobs) or 1.0
        shares = [gpu_s * j.cost / total for j in jobs]
        for job, share in zip(jobs, shares):
            self.scheduler.finish(job.job_id, share)
            self._waiters.pop(job.job_id, None)
        return shares

    def _result(self, job: Job, w: _Waiter, png: str, gpu_s: float, done: float) -> dict[str, Any]:
        started = w.started if w.started is not None else done
        info = {
            "seed": w.seed,
            "width": w.request.width,
            "height": w.request.height,
            "steps": w.steps,
            "guidance_scale": w.guidance,
            "model": self._model_name(),
            "queue_s": round(started - w.submitted, 4),
            "gpu_s": round(gpu_s, 4),
            "total_s": round(done - w.submitted, 4),
            "client": job.client.client_id,
        }
        return {"status": "done", "image_png_b64": png, "info": info}

