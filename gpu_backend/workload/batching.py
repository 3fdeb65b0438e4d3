"""Batching across clients, the model's side: who gets which image, and who pays for what.

Why it exists: when the GPU tier runs several clients' requests in one pipeline
call, three things must still hold per request, and none of them belongs to
the fair scheduler (which only decides *which* jobs share a call):

- **isolation**: one bad request (a prompt that makes the model raise, an
  out-of-memory batch) must not fail the others. :func:`run_isolating_failures`
  runs the batch once and, if the call raises, runs each request alone, so each
  gets its own result or its own error (a batch function's workload,
  ``app_functions.py``, the built-in app's included).
- **charges**: each client is charged its share of the GPU time the call
  measured (:func:`split_batch_time`, in proportion to the cost estimates, summing
  exactly to the measured time); after a failed batch, the failed call's time is
  charged to the requests that also fail alone (the culprits), and only when
  none does (a transient failure) is it shared by all.
- **identity on ZeroGPU**: one ``@spaces.GPU`` call is charged to one visitor's
  ``x-ip-token`` (the head request's), so there a batch may hold only one
  visitor's requests: :func:`zerogpu_batch_key` makes that part of the
  scheduler's batch key.

Nothing here imports torch or knows what a batch computes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class BatchOutcome:
    """What one batch gave each of its requests, in request order.

    ``results[i]`` is the image or the exception of request ``i``; ``charges_s[i]``
    the GPU seconds to charge it. The charges sum exactly to ``total_s``, all the
    time spent on the batch (its call and any retries). ``isolated`` says the batch
    call failed and its requests were run one by one (so ``total_s`` is no
    measurement of a batch).
    """

    results: list[Any]
    charges_s: list[float]
    total_s: float
    isolated: bool

    @property
    def failed(self) -> list[int]:
        return [i for i, r in enumerate(self.results) if isinstance(r, BaseException)]


def split_batch_time(costs: Sequence[float], gpu_s: float) -> list[float]:
    """Shares of ``gpu_s`` in proportion to ``costs``, each 0 or more, summing exactly to it.

    Equal shares when every cost is 0. "Exactly": ``sum(shares) == gpu_s`` in
    floating point, so that charges add up to the measured time to the last bit.
    """
    if not costs:
        raise ValueError("`costs` is empty: give one cost per request")
    if not math.isfinite(gpu_s) or gpu_s < 0:
        raise ValueError(f"`gpu_s` must be a finite number of seconds, 0 or more, got {gpu_s!r}")
    for cost in costs:
        if not math.isfinite(cost) or cost < 0:
            raise ValueError(f"every cost must be finite and 0 or more, got {cost!r}")
    return _apportion(costs, gpu_s)


def run_isolating_failures(
    run_many: Callable[[list[T]], Sequence[Any]],
    run_one: Callable[[T], Any],
    items: list[T],
    *,
    costs: Sequence[float] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> BatchOutcome:
    """Run ``items`` as one batch (``run_many``: one result per item, in order); if that
    call raises, run each alone (``run_one``), so each item gets its own result or error.

    The calls of a ``@splitspace.gpu(batch=True)`` function batch this way (the built-in
    app's ``generate`` too). A single item runs through
    ``run_one``. ``costs`` (the items' estimates; None: equal) split the time of a
    successful batch. Only ``Exception`` is caught: an interrupt or a ``SystemExit`` still
    stops everything.
    """
    if not items:
        raise ValueError("`items` is empty: give at least one")
    costs = list(costs) if costs is not None else [1.0] * len(items)
    start = clock()
    try:
        if len(items) == 1:
            results = [run_one(items[0])]
        else:
            results = list(run_many(items))
        if len(results) != len(items):
            raise RuntimeError(f"the batch returned {len(results)} results for {len(items)} requests")
    except Exception as exc:  # noqa: BLE001 (each request's own error is what callers get)
        batch_error: Exception = exc
    else:
        total = clock() - start
        return BatchOutcome(results, split_batch_time(costs, total), total, isolated=False)

    batch_s = clock() - start
    if len(items) == 1:
        return BatchOutcome([batch_error], [batch_s], batch_s, isolated=False)
    alone: list[Any] = []
    alone_s: list[float] = []
    for item in items:
        t0 = clock()
        try:
            alone.append(run_one(item))
        except Exception as exc:  # noqa: BLE001
            alone.append(exc)
        alone_s.append(clock() - t0)
    total = batch_s + math.fsum(alone_s)
    culprits = [i for i, r in enumerate(alone) if isinstance(r, BaseException)]
    payers = culprits or list(range(len(items)))
    batch_shares = split_batch_time([costs[i] for i in payers], batch_s)
    charges = list(alone_s)
    for i, share in zip(payers, batch_shares, strict=True):
        charges[i] += share
    return BatchOutcome(alone, _apportion(charges, total), total, isolated=True)


def zerogpu_batch_key(batch_key: Hashable, *, client_id: str, ip_token: str | None, on_zerogpu: bool) -> Hashable:
    """The scheduler's batch key, narrowed on ZeroGPU to one visitor.

    ZeroGPU charges a ``@spaces.GPU`` call to the ``x-ip-token`` of the request it
    runs in (the batch's head), so requests batch together there only when they
    come from the same client *and* carry the same token: two visitors never
    share a call, and a visitor whose requests carry different tokens simply
    does not batch. Off ZeroGPU the key is ``batch_key`` unchanged.
    """
    if not on_zerogpu:
        return batch_key
    return (batch_key, client_id, ip_token)


def _apportion(weights: Sequence[float], total: float) -> list[float]:
    """``total`` split in proportion to ``weights`` (equal if all are 0), summing exactly to it.

    Every share is a whole number of quanta (``math.ulp(total)``): the largest-
    remainder method on exact fractions, so every partial sum is exact in
    floating point and ``sum`` gives ``total`` in any order. Each share is within
    one quantum (about 2e-16 of ``total``) of its exact proportion.
    """
    if total == 0:
        return [0.0] * len(weights)
    exact = [Fraction(w) for w in weights]
    whole = sum(exact) or None
    if whole is None:
        exact, whole = [Fraction(1)] * len(weights), Fraction(len(weights))
    quantum = math.ulp(total)
    units = int(Fraction(total) / Fraction(quantum))  # exact: the quantum is a power of 2
    quotas = [units * w / whole for w in exact]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: quotas[i] - counts[i], reverse=True)
    for i in by_remainder[: units - sum(counts)]:
        counts[i] += 1
    return [count * quantum for count in counts]
