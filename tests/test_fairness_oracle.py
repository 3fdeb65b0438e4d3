"""The oracle that judges the scheduler is itself checked on hand-computed cases."""

import math

import pytest

from splitspace.gpu_backend.admission.fair_share import weighted_max_min

INF = math.inf


def approx(d: dict[str, float]) -> dict[str, object]:
    return {k: pytest.approx(v) for k, v in d.items()}


def test_equal_weights_all_backlogged_split_evenly() -> None:
    got = weighted_max_min({"a": INF, "b": INF, "c": INF}, {"a": 1, "b": 1, "c": 1}, 1.0)
    assert got == approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})


def test_weights_one_to_three() -> None:
    assert weighted_max_min({"a": INF, "b": INF}, {"a": 1, "b": 3}, 1.0) == approx({"a": 0.25, "b": 0.75})


def test_light_client_gets_its_demand_and_the_rest_is_shared() -> None:
    got = weighted_max_min({"light": 0.1, "h1": INF, "h2": INF}, {"light": 1, "h1": 1, "h2": 1}, 1.0)
    assert got == approx({"light": 0.1, "h1": 0.45, "h2": 0.45})


def test_light_client_with_weighted_heavies() -> None:
    got = weighted_max_min({"light": 0.1, "h1": INF, "h3": INF}, {"light": 1, "h1": 1, "h3": 3}, 1.0)
    assert got == approx({"light": 0.1, "h1": 0.225, "h3": 0.675})


def test_cascade_of_satisfied_clients() -> None:
    # Level 1/4 each: a (0.1) is sated; then 0.9/3 = 0.3 each: b (0.2) is sated; then 0.7/2.
    got = weighted_max_min({"a": 0.1, "b": 0.2, "c": INF, "d": 0.5}, {"a": 1, "b": 1, "c": 1, "d": 1}, 1.0)
    assert got == approx({"a": 0.1, "b": 0.2, "c": 0.35, "d": 0.35})


def test_weight_does_not_give_more_than_demand() -> None:
    got = weighted_max_min({"a": 0.2, "b": INF}, {"a": 10, "b": 1}, 1.0)
    assert got == approx({"a": 0.2, "b": 0.8})


def test_total_demand_below_capacity_everyone_sated() -> None:
    got = weighted_max_min({"a": 0.2, "b": 0.3}, {"a": 1, "b": 2}, 2.0)
    assert got == approx({"a": 0.2, "b": 0.3})


def test_capacity_above_one_and_zero_demand() -> None:
    got = weighted_max_min({"a": INF, "b": INF, "idle": 0.0}, {"a": 1, "b": 1, "idle": 5}, 3.0)
    assert got == approx({"a": 1.5, "b": 1.5, "idle": 0.0})


def test_zero_capacity() -> None:
    assert weighted_max_min({"a": INF}, {"a": 1}, 0.0) == {"a": 0.0}


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        weighted_max_min({"a": 1.0}, {"a": 0}, 1.0)
    with pytest.raises(ValueError):
        weighted_max_min({"a": -1.0}, {"a": 1}, 1.0)
