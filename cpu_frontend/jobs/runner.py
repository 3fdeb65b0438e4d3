"""The job runner: jobs wait as rows and places at the door, and run as tasks only once let in.

Why it exists: a batch client wants to submit thousands of calls and hear of each when it
ends, without a connection (or a Gradio event, or a coroutine) per waiting call. A job
goes in exactly as a Gradio API call does (the caller's identity, its in-flight cap, its
line at the fair door: ``FrontendCore.join_door``), but nobody reads it:

- **Waiting** is a row in the store and a :class:`~splitspace.cpu_frontend.door.door.Place`
  in its client's line, with a callback on the place's ``turn`` (a future): no task, no
  connection. The place counts against the client's ``max_running + max_queued`` like any
  call's, so a client's jobs and its Gradio calls share one cap, one line, one fair share.
- **Let in**, the callback starts the job's one task, which runs it through its target
  (``targets.py``) and writes each change of state; ``Place.leave`` when it ends lets the
  next one in.
- **Cancelled**, a waiting job leaves its line at once; a running one's task is cancelled,
  which closes its stream to the GPU tier (the GPU tier drops the job).
- **Restarts.** Leases (``store.py``): a frontend that stops cleanly puts its running jobs
  back in the queue (their GPU work was dropped with the stream) and gives its lease back;
  whichever frontend adopts them (the same one restarted, or another on the same Redis)
  lines the queued ones up at its door again, and fails those that were running when
  their frontend died ("Job interrupted": nobody can say how far they got).

Webhooks are announced on the job's path only as a stored message (``webhooks.py``
sends them in workers of their own).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from splitspace.cpu_frontend.door.door import Place, eta_s
from splitspace.cpu_frontend.jobs.records import (
    DEFAULT_EVENTS,
    EVENT_OF_STATUS,
    EVENTS,
    Job,
    JobStatus,
    Webhook,
    new_id,
)
from splitspace.cpu_frontend.jobs.safe_target import Networks, check_url
from splitspace.cpu_frontend.jobs.store import JobStore
from splitspace.cpu_frontend.jobs.targets import Finished, JobTarget
from splitspace.cpu_frontend.jobs.views import job_view
from splitspace.cpu_frontend.jobs.webhooks import Deliveries, event_body
from splitspace.session.identity import Identity
from splitspace.shared.contract.calls import Call, canonical_json, payloads_from_json, payloads_to_json
from splitspace.shared.contract.errors import SplitspaceError, ValidationFailed
from splitspace.shared.contract.hop import Status
from splitspace.shared.contract.schema import echo

log = logging.getLogger("splitspace.jobs")

NOT_FOUND = "Not found"
CONFLICT = "Conflict"
INTERRUPTED = {
    "title": "Job interrupted",
    "message": "the frontend running this job stopped before it finished; submit it again",
}
MAX_IDEMPOTENCY_KEY_CHARS = 255


class JobNotFound(SplitspaceError):
    title = NOT_FOUND


class JobConflict(SplitspaceError):
    title = CONFLICT


class JobRunner:
    def __init__(
        self,
        *,
        store: JobStore,
        targets: JobTarget,
        join: Callable[[Identity], Awaitable[Place]],
        rejoin: Callable[[Identity], Place],
        deliveries: Deliveries,
        secret_of: Callable[[str], str | None],
        seconds_per_job: Callable[[], float] = lambda: 1.0,
        refresh: Callable[[Identity], Identity] = lambda identity: identity,
        webhook_allow: Networks = (),
        ttl_s: float = 86400.0,
        lease_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.targets = targets
        self.join = join
        self.rejoin = rejoin
        """Line a resumed job up at the door (accepted before: no cap refuses it)."""
        self.deliveries = deliveries
        self.secret_of = secret_of
        self.seconds_per_job = seconds_per_job
        self.refresh = refresh
        self.webhook_allow = list(webhook_allow)
        self.ttl_s = ttl_s
        self.lease_s = lease_s
        self._clock = clock
        self.runner_id = deliveries.runner
        self._places: dict[str, Place] = {}
        """Every job of this frontend at the door: waiting in line, or inside (running)."""
        self._tasks: dict[str, asyncio.Task[None]] = {}
        """Only the jobs let in."""
        self._news: dict[str, Status] = {}
        """The GPU tier's last word on each running job (its place there, or running)."""
        self._noted: dict[str, int] = {}
        self._maintainer: asyncio.Task[None] | None = None
        self._closing = False

    @staticmethod
    def new_runner_id() -> str:
        return uuid.uuid4().hex

    # -- questions --------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._places) - len(self._tasks)

    @property
    def running(self) -> int:
        return len(self._tasks)

    def live(self, job: Job) -> Job:
        """The job with this frontend's fresher word on its place (if it is here)."""
        place = self._places.get(job.id)
        if place is None or job.ended:
            return job
        news = self._news.get(job.id)
        if not place.inside:
            position = place.position()
            return job.copy(position=position, eta_s=eta_s(position, self.seconds_per_job()))
        if news is None:
            return job.copy(position=1, eta_s=eta_s(1, self.seconds_per_job()))
        return job.copy(position=news.position if news.state == "queued" else 0, eta_s=news.eta_s)

    async def get(self, owner: str, job_id: str) -> Job:
        job = await self.store.get(job_id)
        if job is None or job.owner != owner:  # someone else's job is as absent as a missing one
            raise JobNotFound(f"no job {echo(job_id)} (never, another client's, or expired)")
        return self.live(job)

    async def page(self, owner: str, limit: int, before: str | None) -> list[Job]:
        return [self.live(job) for job in await self.store.page(owner, limit, before)]

    # -- submitting -------------------------------------------------------------------------
    async def submit(
        self,
        identity: Identity,
        endpoint: str,
        *,
        inputs: Mapping[str, Any] | None = None,
        data: list[Any] | None = None,
        webhook_url: str | None = None,
        webhook_events: list[str] | None = None,
        idempotency_key: str | None = None,
        base_url: str = "",
    ) -> tuple[Job, bool]:
        """Accept a job (its row written before this returns); (job, replayed): replayed when
        the owner's Idempotency-Key had already made it. Raises ValidationFailed (naming the
        input), Throttled (the client's cap), ServiceUnavailable, JobConflict."""
        # off the loop: a developer's function's inputs may be files to write, a validator= to run
        call = await asyncio.to_thread(self.targets.validate, endpoint.lstrip("/"), inputs, data)
        hook = await self._webhook(identity, webhook_url, webhook_events)
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS:
            raise ValidationFailed("Idempotency-Key", f"must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters")
        fingerprint = hashlib.sha256(
            canonical_json(
                {
                    "endpoint": call.endpoint,
                    "data": call.data,
                    "webhook": None if hook is None else [hook.url, list(hook.events)],
                }
            )
        ).hexdigest()
        owner = identity.client_id
        if idempotency_key is not None:
            existing = await self.store.by_idempotency_key(owner, idempotency_key)
            if existing is not None:
                return self._replayed(existing, fingerprint), True
        place = await self.join(identity)
        now = self._clock()
        job = Job(
            new_id("job_", now),
            owner,
            identity,
            call.endpoint,
            payloads_to_json(call.data),  # (kept as JSON: its files as base64)
            now,
            webhook=hook,
            idempotency_key=idempotency_key,
            fingerprint=fingerprint,
            base_url=base_url,
        )
        try:
            stored = await self.store.create(job, self.runner_id)
        except BaseException:
            place.leave()
            raise
        if stored.id != job.id:  # the same key won a race meanwhile
            place.leave()
            return self._replayed(stored, fingerprint), True
        self._attach(job.id, place)
        return self.live(job), False

    def _replayed(self, job: Job, fingerprint: str) -> Job:
        if job.fingerprint != fingerprint:
            raise JobConflict("this Idempotency-Key was used for another request; use a new key for a new job")
        return self.live(job)

    async def _webhook(self, identity: Identity, url: str | None, events: list[str] | None) -> Webhook | None:
        if url is None:
            if events:
                raise ValidationFailed("webhook_events", "needs a webhook_url")
            return None
        chosen = tuple(dict.fromkeys(events if events is not None else DEFAULT_EVENTS))
        for event in chosen:
            if event not in EVENTS:
                raise ValidationFailed("webhook_events", f"{echo(event)} is not an event (events: {', '.join(EVENTS)})")
        if not chosen:
            raise ValidationFailed("webhook_events", f"must name at least one of {', '.join(EVENTS)}")
        if self.secret_of(identity.client_id) is None:
            raise ValidationFailed(
                "webhook_url",
                "webhooks are signed with the caller's API key's webhook_secret (quota file); this caller has none",
            )
        try:
            await check_url(url, self.webhook_allow)
        except ValueError as exc:
            raise ValidationFailed("webhook_url", str(exc)) from None
        return Webhook(url, chosen)

    # -- moving through the door --------------------------------------------------------------
    def _attach(self, job_id: str, place: Place) -> None:
        self._places[job_id] = place
        if place.inside:
            self._start(job_id)
        else:  # a callback, not a task: a waiting job costs its place and its row
            place.turn.add_done_callback(functools.partial(self._on_turn, job_id))

    def _on_turn(self, job_id: str, turn: asyncio.Future[None]) -> None:
        if not turn.cancelled():
            self._start(job_id)

    def _start(self, job_id: str) -> None:
        if self._closing:
            return
        task = asyncio.create_task(self._run(job_id), name=f"job {job_id}")
        self._tasks[job_id] = task
        # (a callback, not a finally: a task cancelled before its first step never runs its body)
        task.add_done_callback(functools.partial(self._ran, job_id))

    def _ran(self, job_id: str, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:  # the store failed at its end
            log.error("job %s could not be ended: %r (it ends as interrupted when adopted)", job_id, task.exception())
        place = self._places.pop(job_id, None)
        if place is not None:
            place.leave()
        self._tasks.pop(job_id, None)
        self._news.pop(job_id, None)

    async def _run(self, job_id: str) -> None:
        job: Job | None = None
        began = self._clock()
        try:
            job = await self.store.get(job_id)
            if job is None or job.ended:  # cancelled (or expired) while it waited
                return
            updates = self.targets.run(self.refresh(job.identity), Call(job.endpoint, payloads_from_json(job.data)))
            async with contextlib.aclosing(updates):
                async for update in updates:
                    if isinstance(update, Finished):
                        if job.status == "queued":  # too quick for a "running" word: started, then ended
                            await self._announce(job.copy(status="running", started_at=began), "started")
                        await self.store.put_files(job.id, update.files, self.ttl_s)
                        await self._end(
                            job.copy(started_at=job.started_at or began), "succeeded", outputs=update.outputs
                        )
                        return
                    self._news[job_id] = update
                    if update.state == "running" and job.status == "queued":
                        job = job.copy(status="running", started_at=self._clock(), position=None, eta_s=None)
                        if not await self.store.save(job):
                            return  # ended meanwhile (cancelled on another frontend)
                        await self._announce(job, "started")
        except asyncio.CancelledError:
            if self._closing and job is not None and not job.ended:  # back in the queue, for whoever adopts it
                with contextlib.suppress(Exception):
                    await self.store.save(job.copy(status="queued", started_at=None))
            raise
        except SplitspaceError as exc:
            if job is not None:
                await self._end(job, "failed", error={"title": exc.title, "message": exc.message})
        except Exception as exc:
            log.exception("job %s failed inside the frontend", job_id)
            if job is not None:
                await self._end(
                    job, "failed", error={"title": "Error", "message": f"{type(exc).__name__} in the frontend"}
                )

    async def _end(
        self, job: Job, status: JobStatus, *, outputs: list[Any] | None = None, error: dict[str, Any] | None = None
    ) -> Job | None:
        """End the job (if nobody has); announce it. None: it had already ended."""
        now = self._clock()
        ended = job.copy(
            status=status,
            finished_at=now,
            expires_at=now + self.ttl_s,
            outputs=outputs,
            error=error,
            position=None,
            eta_s=None,
        )
        if not await self.store.save(ended):
            return None
        await self._announce(ended, EVENT_OF_STATUS[status])
        return ended

    async def _announce(self, job: Job, event: str) -> None:
        if job.webhook is None or event not in job.webhook.events:
            return
        body = event_body(event, job_view(job, job.base_url), self._clock())
        try:
            await self.deliveries.add(job.id, job.owner, job.webhook.url, event, body)
        except Exception as exc:
            log.error("job %s: its %s webhook could not be stored (%s)", job.id, event, type(exc).__name__)

    # -- cancelling -------------------------------------------------------------------------
    async def cancel(self, owner: str, job_id: str) -> Job:
        job = await self.get(owner, job_id)
        if job.status == "cancelled":
            return job
        if job.ended:
            raise JobConflict(f"the job has already {job.status}; only a queued or running job can be cancelled")
        ended = await self._end(job, "cancelled")
        if ended is None:  # it ended meanwhile
            return await self.cancel(owner, job_id)
        if not self.drop(job_id) and self.store.shared:
            await self.store.announce_cancel(job_id)
        return ended

    def _dropped(self, job_id: str) -> None:
        self.drop(job_id)

    def drop(self, job_id: str) -> bool:
        """Stop holding a job that ended elsewhere: leave its line, or cancel its run (which
        closes its stream to the GPU tier). False: it is not here."""
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()
            return True
        place = self._places.pop(job_id, None)
        if place is None:
            return False
        place.leave()
        return True

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        await self.store.start(on_cancel=self._dropped)
        await self.deliveries.start()
        await self.maintain()
        self._maintainer = asyncio.create_task(self._maintain_loop())

    async def _maintain_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self.maintain()
            except Exception as exc:
                log.warning("jobs: housekeeping failed (%s: %s)", type(exc).__name__, str(exc)[:200])

    async def maintain(self) -> None:
        """Renew this frontend's lease; adopt orphans (resume the queued, fail the running);
        delete what expired; publish the places of jobs waiting here (for other frontends)."""
        await self.store.renew(self.runner_id, self.lease_s)
        jobs, deliveries = await self.store.adopt(self.runner_id)
        for job in jobs:
            if job.status == "queued":
                self._attach(job.id, self.rejoin(self.refresh(job.identity)))
            else:
                await self._end(job, "failed", error=dict(INTERRUPTED))
        if jobs:
            log.info("jobs: adopted %d job(s) of a stopped frontend", len(jobs))
        for delivery in deliveries:
            self.deliveries.take(delivery)
        await self.store.purge(self._clock())
        if self.store.shared:
            await self._note_positions()

    async def _note_positions(self) -> None:
        changed: dict[str, tuple[int, float]] = {}
        for job_id, place in self._places.items():
            if not place.inside:
                position = place.position()
                if self._noted.get(job_id) != position:
                    changed[job_id] = (position, eta_s(position, self.seconds_per_job()))
        self._noted = {k: v for k, v in self._noted.items() if k in self._places}
        self._noted.update({k: v[0] for k, v in changed.items()})
        await self.store.note_positions(changed)

    async def aclose(self) -> None:
        """Stop: running jobs go back to the queue, this frontend's lease is given back (its
        jobs and webhooks are then adopted at once, by whichever frontend renews next)."""
        self._closing = True
        if self._maintainer is not None:
            self._maintainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintainer
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for place in list(self._places.values()):
            place.leave()
        self._places.clear()
        await self.deliveries.aclose()
        with contextlib.suppress(Exception):
            await self.store.retire(self.runner_id)
        await self.store.aclose()
