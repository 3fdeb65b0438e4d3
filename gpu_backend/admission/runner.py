"""The glue between Gradio handlers, the fair scheduler and the GPU.

The scheduler core is pure; this module runs it. Handlers (on the event loop)
submit jobs and wait on a future, streaming status (position, ETA) meanwhile.
A job carries a typed :class:`~gpu_backend.workload.work.Work` (a call of one of the
app's ``@splitspace.gpu`` functions, the built-in app's included): admission, fair
order, batching, charging and cancellation are one path for every call; only running
a batch and making its answer are the workload's.
The GPU side is a dedicated worker thread per capacity slot that takes its
next batch straight from the scheduler the moment the previous one ends, so
the GPU never waits on a busy event loop: dispatch stays work-conserving even
while the loop is ingesting a burst of requests. A lock guards the scheduler,
which both sides touch; it is held only for bookkeeping, never during a batch.

A waiting handler that goes away (the caller disconnected or cancelled) has
its job removed from the queue at once; a batch already on the GPU finishes
and its slot is freed only when the model returns, so two jobs never overlap.

A job whose work streams (a developer's generator) runs alone on its GPU thread
(``Workload.run_stream``): each yield, postprocessed there, is handed to the waiting
handler with ``loop.call_soon_threadsafe`` into the job's bounded buffer
(:class:`_Partials`) and sent as a :class:`~shared.contract.calls.Partial`; its last
yield is its answer. If the caller reads more slowly than the generator yields, only
the newest yields are kept (each yield replaces the outputs of the one before, so the
caller misses intermediate states, never the latest). A caller who leaves mid-stream
sets the job's stop: the GPU thread closes the generator at its next yield, the
client is charged the time it used, and the GPU goes to the next job. While a stream
runs its flow is charged the time it has used every ``ACCRUE_EVERY_S``
(``FairScheduler.accrue``), so a long stream counts against its client's share (and
its standing) as it goes, not only at its end.

With Redis (``GpuRunner.gate``, :mod:`gpu_backend.stores.global_limits`), a GPU thread takes
each job's global running slot after the pick and before the batch runs, and gives it
back after, both outside the lock; a job whose slot is refused goes back to its queue
(``FairScheduler.requeue``) and does not run. A caller who leaves while its job's slot is
being checked (dispatched, not yet started: up to a store timeout while Redis hangs) is
not forgotten: the job does not run, and whatever its dispatch charged (its flow's
service, here and in the store, its running slot, its reservation) is taken back.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import inspect
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NotRequired, TypedDict, TypeVar

from splitspace.gpu_backend.admission.scheduler import ClientRef, FairScheduler, Job, Outcome
from splitspace.gpu_backend.workload.batching import BatchOutcome, split_batch_time, zerogpu_batch_key
from splitspace.gpu_backend.workload.work import Answer, StreamStopped, Timing, Work
from splitspace.session.identity import Identity
from splitspace.shared.config import status_pace
from splitspace.shared.contract.calls import Partial
from splitspace.shared.contract.errors import QUEUE_FULL, QUOTA_EXCEEDED, RATE_LIMITED, Throttled
from splitspace.shared.contract.hop import Status

if TYPE_CHECKING:
    from splitspace.gpu_backend.stores.global_limits import GlobalLimits

log = logging.getLogger("splitspace.gpu")

_TITLES = {
    Outcome.QUEUE_FULL: QUEUE_FULL,
    Outcome.QUOTA_EXCEEDED: QUOTA_EXCEEDED,
    Outcome.RATE_LIMITED: RATE_LIMITED,
}

T = TypeVar("T")

RunEventKind = Literal["admitted", "refused", "cancelled", "started", "stopped", "finished"]
"""What happened to a request: admitted or refused at the door, cancelled (its caller left
before it ran), started on the GPU, then finished (or stopped: a stream whose caller left)."""


class RunEvent(TypedDict):
    """What the runner reports with each :data:`RunEventKind` (to the metrics, ``ops/metrics.py``)."""

    tier: str
    reason: NotRequired[str]
    """``refused``: the limit that refused it (``queue_full``, ``quota_exceeded``, ``rate_limited``...)."""
    wait_s: NotRequired[float]
    """``started``: seconds from admission to the GPU."""
    gpu_s: NotRequired[float]
    """``finished`` and ``stopped``: the GPU-seconds charged."""


OnEvent = Callable[[RunEventKind, RunEvent], None]
"""``GpuRunner``'s ``on_event``."""

RunnerUpdate = Status | Partial | Answer
"""What following a ticket yields: statuses (and a stream's partial outputs), then the job's answer."""

PARTIALS_KEPT = 64
"""A streaming job's yields waiting for its handler, at most; past that only the newest is kept."""
ACCRUE_EVERY_S = 0.5
"""A running stream's flow is charged the time it has used at its first yield after this long."""


def client_ref(identity: Identity) -> ClientRef:
    return ClientRef(client_id=identity.client_id, kind=identity.kind, tier=identity.tier, address=identity.address)


@dataclass
class _Waiter:
    work: Work[Any]
    """What the job runs, decided at admission (its inputs preprocessed, its estimate)."""
    submitted: float
    context: contextvars.Context
    future: asyncio.Future[Answer]
    loop: asyncio.AbstractEventLoop
    started: float | None = None
    label: str = ""
    """What the job ran on (its function's name; set on the GPU thread)."""
    past_gate: bool = False
    """With a gate: its running slot was decided and it runs (set under the lock); a drop
    before that is kept in ``GpuRunner._left``."""
    partials: _Partials | None = None
    """A streaming job's yields not sent yet (on the loop); None for work that does not stream."""
    stop: threading.Event = field(default_factory=threading.Event)
    """Set when the caller leaves while the job runs: a stream stops at its next yield."""


class _Partials:
    """A streaming job's yields that its handler has not sent yet (used on the event loop only).

    Bounded by ``PARTIALS_KEPT``: a caller slower than its generator makes the buffer
    collapse to the newest yield, which replaces all before it anyway (Gradio's streaming:
    each yield replaces the outputs)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.items: deque[list[Any]] = deque()
        self.collapsed = 0
        """Yields dropped because a newer one replaced them before they were sent."""
        self._loop = loop
        self._wake: asyncio.Future[None] | None = None

    def put(self, data: list[Any]) -> None:
        if len(self.items) >= PARTIALS_KEPT:
            self.collapsed += len(self.items)
            self.items.clear()
        self.items.append(data)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def arrival(self) -> asyncio.Future[None]:
        """A future done when a yield is waiting (at once if one is)."""
        self._wake = self._loop.create_future()
        if self.items:
            self._wake.set_result(None)
        return self._wake


class _Sink:
    """A streaming job's side on its GPU thread (``work.StreamSink``)."""

    def __init__(self, runner: GpuRunner, job: Job, waiter: _Waiter) -> None:
        assert waiter.partials is not None
        self._runner, self._job, self._waiter, self._partials = runner, job, waiter, waiter.partials
        self._started = self._accrued = time.perf_counter()

    def emit(self, data: list[Any]) -> None:
        self._waiter.loop.call_soon_threadsafe(self._partials.put, data)

    def stopped(self) -> bool:
        return self._waiter.stop.is_set()

    def progress(self) -> None:
        now = time.perf_counter()
        if now - self._accrued >= ACCRUE_EVERY_S:
            self._accrued = now
            self._runner.accrue(self._job, now - self._started)


@dataclass
class Ticket:
    """An admitted request: what :meth:`GpuRunner.follow` and :meth:`GpuRunner.drop` need."""

    job_id: str
    tier: str
    cap: int
    waiter: _Waiter


class GpuRunner:
    def __init__(
        self,
        scheduler: FairScheduler,
        *,
        batch_wait_s: float = 0.0,
        on_zerogpu: bool = False,
        clock: Callable[[], float] = time.monotonic,
        on_event: OnEvent | None = None,
        gate: GlobalLimits | None = None,
    ) -> None:
        """``gate``: the global limits (Redis), or None."""
        self.scheduler = scheduler
        self.batch_wait_s = batch_wait_s
        """The batching window: a batch smaller than its ``max_batch`` waits this long for
        compatible requests to join it before it starts (0: only what already waits)."""
        self.on_zerogpu = on_zerogpu
        """On ZeroGPU one GPU call is charged to one visitor: batches hold one visitor's requests."""
        self._clock = clock
        self._on_event: OnEvent = on_event or (lambda kind, data: None)
        self.gate = gate
        """With global limits (Redis): a :class:`~gpu_backend.stores.global_limits.GlobalLimits`
        that takes each job's running slot before it runs and settles it after, outside
        the lock; None: nothing but the local scheduler."""
        self._waiters: dict[str, _Waiter] = {}
        self._left: set[str] = set()
        """Jobs dispatched whose caller left before the gate decided their start (lock held)."""
        self._finishing: set[asyncio.Task[None]] = set()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._ready: deque[list[Job]] = deque()
        self._stopping = False
        self._paused = False
        self._threads = [
            threading.Thread(target=self._gpu_loop, name=f"gpu-{i}", daemon=True) for i in range(scheduler.capacity)
        ]
        for t in self._threads:
            t.start()

    @contextlib.contextmanager
    def locked(self) -> Iterator[FairScheduler]:
        """The scheduler, for readers outside this module (admin API, metrics)."""
        with self._lock:
            yield self.scheduler

    def close(self) -> None:
        with self._work:
            self._stopping = True
            self._work.notify_all()
        for t in self._threads:
            t.join(timeout=30)

    # -- the handler side (event loop) ------------------------------------------------
    def admit(
        self, identity: Identity, work: Work[T], ip_token: str | None = None, job_id: str | None = None
    ) -> Ticket:
        """Queue ``work`` for a fair turn, or raise Throttled at once (on the event loop).

        The caller's context (e.g. Gradio's request, for ZeroGPU's ``x-ip-token``) is
        captured here: the GPU function runs in it. Every ticket must be followed
        (:meth:`follow`) or dropped (:meth:`drop`)."""
        job_id = job_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        waiter = _Waiter(
            work=work,
            submitted=self._clock(),
            context=contextvars.copy_context(),
            future=loop.create_future(),
            loop=loop,
            partials=_Partials(loop) if work.streams else None,
        )
        batch_key = (
            None
            if work.batch_key is None
            else zerogpu_batch_key(
                work.batch_key,
                client_id=identity.client_id,
                ip_token=ip_token,
                on_zerogpu=self.on_zerogpu,
            )
        )
        ref = client_ref(identity)
        with self._work:
            limits = self.scheduler.limits_for(ref)
            admission = self.scheduler.submit(job_id, ref, work.cost, batch_key)
            if admission.ok:
                self._waiters[job_id] = waiter
                self._dispatch_locked()
                if self.batch_wait_s > 0:
                    self._work.notify_all()  # a batch holding its window may take this one
        if not admission.ok:
            self._on_event("refused", {"tier": identity.tier, "reason": admission.outcome.name.lower()})
            raise Throttled(_TITLES.get(admission.outcome, QUEUE_FULL), admission.reason, admission.retry_after_s)
        self._on_event("admitted", {"tier": identity.tier})
        # The client's in-flight cap as the GPU tier sees it (operators may change it live);
        # the frontend learns it from here for its early refusals.
        # (With global limits the local scheduler's queue limit is relaxed: the cap is the global one.)
        if self.gate is not None:
            limits = self.gate.limits_for(ref)
        return Ticket(job_id, identity.tier, limits.max_running + limits.max_queued, waiter)

    async def follow(self, ticket: Ticket) -> AsyncGenerator[RunnerUpdate, None]:
        """Yield the ticket's status while it waits, a stream's partial outputs as they come,
        then its answer. Closing this generator (or cancelling the task that runs it) while
        the job waits drops the job; while it streams, stops it."""
        waiter, job_id, cap = ticket.waiter, ticket.job_id, ticket.cap
        partials = waiter.partials
        loop = waiter.loop
        try:
            # A disconnected caller is noticed at its next yield (the direct route also
            # watches for the disconnect itself). The pace: shared/config/status_pace.py; at least
            # every HEARTBEAT_S, which the frontend takes as a sign of life.
            await self._news(waiter, status_pace.FIRST_AFTER_S)
            told_running, last_sent = False, loop.time()
            while not waiter.future.done():
                if partials is not None and partials.items:
                    yield Partial(partials.items.popleft())
                    told_running, last_sent = True, loop.time()  # a yield says it runs
                    continue
                place = None
                if waiter.started is None:
                    with self._lock:
                        place = self.scheduler.position(job_id)
                if place is not None:
                    yield Status("queued", place[0], round(place[1], 1), cap)
                    interval = min(status_pace.interval_s(place[0]), status_pace.HEARTBEAT_S)
                    last_sent = loop.time()
                else:
                    quiet = loop.time() - last_sent
                    if not told_running or quiet >= status_pace.HEARTBEAT_S:
                        yield Status("running", 0, 0.0, cap)
                        told_running, quiet, last_sent = True, 0.0, loop.time()
                    interval = status_pace.HEARTBEAT_S - quiet
                await self._news(waiter, interval)
            yield dataclasses.replace(waiter.future.result(), cap=cap)
        finally:
            self.drop(ticket)

    @staticmethod
    async def _news(waiter: _Waiter, timeout_s: float) -> None:
        """Wait until the job is done, a stream's yield arrives, or ``timeout_s`` passes."""
        if waiter.future.done():
            return
        watch: list[asyncio.Future[Any]] = [waiter.future]
        if waiter.partials is not None:
            watch.append(waiter.partials.arrival())
        await asyncio.wait(watch, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)

    def drop(self, ticket: Ticket) -> None:
        """Remove the ticket's job from the queue if it still waits, or stop it at its next
        yield if it streams (idempotent)."""
        if ticket.waiter.future.done():
            return
        with self._work:
            cancelled = self.scheduler.cancel(ticket.job_id)
            if not cancelled:
                ticket.waiter.stop.set()
            if cancelled:
                self._waiters.pop(ticket.job_id, None)
                self._dispatch_locked()  # a freed place may make another job eligible
            elif self.gate is not None and not ticket.waiter.past_gate and ticket.job_id in self._waiters:
                self._left.add(ticket.job_id)  # dispatched, its start not decided: _take_slots
        if cancelled:
            if self.gate is not None:
                self.gate.dropped(ticket.job_id)
            ticket.waiter.future.cancel()
            self._on_event("cancelled", {"tier": ticket.tier})

    # -- the GPU side (worker threads) ------------------------------------------------
    def dispatch(self) -> None:
        """Start whatever can start now (after a change of limits: an operator's override)."""
        with self._work:
            self._dispatch_locked()

    def _dispatch_locked(self) -> None:
        """Move every batch the scheduler starts now to the GPU threads (lock held).

        Dispatching at once, not when a GPU thread wakes up, keeps the scheduler's
        counts exact: a job that can start is running, not queued."""
        while not self._paused and (jobs := self.scheduler.dispatch(self._max_batch_of)):
            self._ready.append(jobs)
            self._work.notify()

    def _max_batch_of(self, head: Job) -> int:
        """How many jobs may join ``head``'s batch: what its workload takes (lock held)."""
        waiter = self._waiters.get(head.job_id)
        return waiter.work.workload.max_batch() if waiter is not None else 1

    @property
    def paused(self) -> bool:
        """True while a :meth:`swap` holds dispatch (new work queues, none starts)."""
        return self._paused

    def swap(self, change: Callable[[], None], timeout_s: float = 600.0) -> None:
        """Run ``change`` (e.g. loading another model) with the GPU idle; blocking.

        New work keeps being admitted and queued, none is dispatched; batches
        already on the GPU finish first (on the old model). Then ``change`` runs,
        dispatch resumes and the queue drains in fair order."""
        with self._work:
            self._paused = True
            deadline = time.monotonic() + timeout_s
            while (self.scheduler.running_count or self._ready) and time.monotonic() < deadline:
                self._work.wait(timeout=0.1)
        try:
            change()
        finally:
            with self._work:
                self._paused = False
                self._dispatch_locked()

    def _gpu_loop(self) -> None:
        while True:
            with self._work:
                while not self._ready and not self._stopping:
                    self._work.wait()
                if not self._ready:
                    return
                jobs = self._ready.popleft()
                self._hold_window(jobs)
                waiters = [self._waiters[j.job_id] for j in jobs]
            self._run_batch(jobs, waiters)

    def _hold_window(self, jobs: list[Job]) -> None:
        """Let compatible requests that arrive within the batching window join ``jobs``
        (lock held; waiting releases it, so admissions go on)."""
        max_batch = self._max_batch_of(jobs[0])
        if self.batch_wait_s <= 0 or max_batch <= 1:
            return
        deadline = time.monotonic() + self.batch_wait_s
        while len(jobs) < max_batch and not self._stopping:
            jobs += self.scheduler.extend(jobs, max_batch)
            left = deadline - time.monotonic()
            if len(jobs) >= max_batch or left <= 0:
                break
            self._work.wait(left)

    def _take_slots(self, jobs: list[Job], waiters: list[_Waiter]) -> tuple[list[Job], list[_Waiter]]:
        """With a gate: the jobs of the batch whose global running slot was granted (store
        I/O, outside the lock). A refused job goes back to its queue, a job whose slot
        could not be checked (the store down, ``closed``) fails with that error, and a job
        whose caller left meanwhile (:meth:`drop`) does not run: refused, it is cancelled
        as if it had still been queued; granted, its dispatch is undone (here and in the
        store: ``GlobalLimits.finish`` with 0 s)."""
        gate = self.gate
        assert gate is not None  # (called only with one)
        run, refused, failed = gate.start(jobs)
        with self._work:
            left = {job.job_id for job in jobs} & self._left
            self._left -= left
            keep = {job.job_id for job in run} - left
            for job, w in zip(jobs, waiters, strict=True):
                w.past_gate = job.job_id in keep  # a requeued job passes the gate again
            if not refused and not failed and not left:
                return jobs, waiters
            for job in refused:
                self.scheduler.requeue(job.job_id)
                if job.job_id in left:
                    self.scheduler.cancel(job.job_id)
            for job_id in failed:
                self.scheduler.finish(job_id, 0.0)
            withdrawn = [job for job in run if job.job_id in left]
            for job in withdrawn:
                self.scheduler.finish(job.job_id, 0.0)  # gpu_s 0: its flow's charge taken back
            self._dispatch_locked()
            self._work.notify_all()
            lost = [(self._waiters.pop(job_id), error) for job_id, error in failed.items() if job_id in self._waiters]
            gone = [
                (job, self._waiters.pop(job.job_id))
                for job in jobs
                if job.job_id in left and job.job_id not in failed and job.job_id in self._waiters
            ]
        for w, error in lost:
            w.loop.call_soon_threadsafe(_fail, w.future, error)
        for job in refused:
            if job.job_id in left:
                gate.dropped(job.job_id)
        for job in withdrawn:
            gate.finish(job, 0.0)  # withdrawn: its reservation and charge taken back
        for job, w in gone:
            w.loop.call_soon_threadsafe(w.future.cancel)
            self._on_event("cancelled", {"tier": job.client.tier})
        return (
            [job for job in run if job.job_id in keep],
            [w for job, w in zip(jobs, waiters, strict=True) if job.job_id in keep],
        )

    def _run_batch(self, jobs: list[Job], waiters: list[_Waiter]) -> None:
        if self.gate is not None:
            jobs, waiters = self._take_slots(jobs, waiters)
            if not jobs:
                return
        workload = waiters[0].work.workload  # a batch key belongs to one workload: all are of one kind
        started = self._clock()
        label = workload.label()
        for job, w in zip(jobs, waiters, strict=True):
            w.started, w.label = started, label
            self._on_event("started", {"tier": job.client.tier, "wait_s": started - w.submitted})
        payloads = [w.work.payload for w in waiters]
        costs = [j.cost for j in jobs]
        t0 = time.perf_counter()
        try:  # in the head job's context, so ZeroGPU sees that caller's request (x-ip-token)
            if waiters[0].work.streams:  # alone: a streaming job's key is None
                output = waiters[0].context.run(workload.run_stream, payloads[0], _Sink(self, jobs[0], waiters[0]))
                spent = time.perf_counter() - t0
                outcome = BatchOutcome([output], [spent], spent, False)
            else:
                outcome = waiters[0].context.run(workload.run_batch, payloads, costs)
        except BaseException as exc:  # the GPU call itself failed (e.g. ZeroGPU refused it)
            spent = time.perf_counter() - t0
            outcome = BatchOutcome([exc] * len(jobs), split_batch_time(costs, spent), spent, False)
        if outcome.failed:
            log.warning("%d of a batch of %d failed", len(outcome.failed), len(jobs))
        if self.gate is not None:
            # The callers first, then the store's round trip: nobody waits for the settlement.
            # It still comes before this tier's next dispatch (this thread, below), which may
            # need the running slot; another tier's dispatch that comes sooner is refused and
            # retried (GlobalLimits.retry_s).
            self._deliver_all(jobs, waiters, outcome)
            for job, share in zip(jobs, outcome.charges_s, strict=False):
                self.gate.finish(job, share)
        with self._work:  # each job is charged its share (a failed batch: see batching.py)
            for job, share in zip(jobs, outcome.charges_s, strict=False):
                self.scheduler.finish(job.job_id, share)
                self._waiters.pop(job.job_id, None)
            self._dispatch_locked()
            self._work.notify_all()  # a swap may be waiting for the GPU to go idle
        if self.gate is None:
            self._deliver_all(jobs, waiters, outcome)

    def accrue(self, job: Job, used_s: float) -> None:
        """Charge a running job the GPU time it has used so far (a GPU thread, mid-stream)."""
        with self._lock:
            self.scheduler.accrue(job.job_id, used_s)

    def _deliver_all(self, jobs: list[Job], waiters: list[_Waiter], outcome: BatchOutcome) -> None:
        for job, w, result, share in zip(jobs, waiters, outcome.results, outcome.charges_s, strict=False):
            if w.partials is not None and (isinstance(result, StreamStopped) or w.stop.is_set()):
                # the caller left mid-stream: nobody waits for the answer
                self._on_event("stopped", {"tier": job.client.tier, "gpu_s": share})
                w.loop.call_soon_threadsafe(w.future.cancel)
                continue
            self._on_event("finished", {"tier": job.client.tier, "gpu_s": share})
            if isinstance(result, BaseException):
                w.loop.call_soon_threadsafe(_fail, w.future, result)
            else:
                w.loop.call_soon_threadsafe(self._deliver, job, w, result, share)

    def _deliver(self, job: Job, w: _Waiter, output: Any, gpu_s: float) -> None:
        """On the loop: the workload makes the answer (off the loop when that is work: an
        image to encode, outputs to postprocess), then the handler wakes."""
        if w.future.done():  # the caller went away while its job ran
            return
        timing = Timing(
            submitted=w.submitted,
            started=w.started if w.started is not None else self._clock(),
            gpu_s=gpu_s,
            client=job.client.client_id,
            label=w.label,
            clock=self._clock,
        )
        try:
            answer = w.work.workload.finish(w.work.payload, output, timing)
        except Exception as exc:
            _fail(w.future, exc)
            return
        if not inspect.isawaitable(answer):
            w.future.set_result(answer)
            return

        async def finish() -> None:
            try:
                done = await answer
            except Exception as exc:
                _fail(w.future, exc)
            else:
                if not w.future.done():
                    w.future.set_result(done)

        task = w.loop.create_task(finish())
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)


def _fail(future: asyncio.Future[T], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error if isinstance(error, Exception) else RuntimeError(str(error)))
