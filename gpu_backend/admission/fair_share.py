"""Weighted max-min fair shares, computed independently: the yardstick the scheduler is held to.

Why this module exists: the tests (``tests/test_scheduler.py``) and the fairness benchmark
(``bench/fairness.py``) both measure what the scheduler gives each client against what the
definition of fairness says it should get; this is that definition, in the installed package
so that both import it. Nothing in the tiers imports it.

Deliberately shares no code or idea with ``splitspace.gpu_backend.admission.scheduler`` beyond the definition
of fairness: the capacity is "water-filled" over the clients. Every unsatisfied client's
level rises in proportion to its weight; a client whose demand is met drops out and
leaves the rest to the others. The result is the unique weighted max-min fair
allocation: no client can get more without taking from one that has less per weight.
"""

from __future__ import annotations

import math

_EPS = 1e-12


def weighted_max_min(demands: dict[str, float], weights: dict[str, float], capacity: float) -> dict[str, float]:
    """Each client's weighted max-min fair share of ``capacity``.

    ``demands`` may be ``math.inf`` (always backlogged). Weights must be positive.
    """
    if capacity < 0 or any(d < 0 for d in demands.values()):
        raise ValueError("capacity and demands must not be negative")
    if any(weights[name] <= 0 for name in demands):
        raise ValueError("weights must be positive")
    alloc = {name: 0.0 for name in demands}
    active = {name for name, d in demands.items() if d > 0}
    left = float(capacity)
    while active and left > _EPS:
        per_weight = left / sum(weights[name] for name in active)
        sated = {name for name in active if demands[name] - alloc[name] <= per_weight * weights[name] + _EPS}
        if not sated:
            for name in active:
                alloc[name] += per_weight * weights[name]
            break
        for name in sated:
            left -= demands[name] - alloc[name]
            alloc[name] = demands[name]
        active -= sated
    assert all(math.isfinite(v) for v in alloc.values())
    return alloc
