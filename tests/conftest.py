"""Shared deployments of the real tiers (processes on loopback) for the integration tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings

from splitspace.deploy.processes import launch_with, pick_ports_with
from tests.sharing import SharedDeployments, cluster, conftest_fixtures, share_groups
from tests.support import TIER, Deployment, free_port, keys_toml, tiers_toml
from tests.warm_start import WarmStarter

if TYPE_CHECKING:
    from splitspace.deploy.redis_local import LocalRedis

# Property tests check what holds, not how fast: no per-example deadline (on a loaded 2-core
# machine one example once took 338 ms against Hypothesis' default 200 ms).
settings.register_profile("splitspace", deadline=None)
settings.load_profile("splitspace")

# One torch thread per process: the tests run several tiers on 2 cores, and torch's own
# thread pool per tier made the tiny model about 15x slower there. (Tiers inherit this.)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Every tier a test starts listens on a port of this worker's own (tests/support.py), and is
# forked from a process that has imported the tiers already (tests/warm_start.py), unless
# SPLITSPACE_TEST_FORK=0: then each is a new interpreter, as splitspace dev starts them.
pick_ports_with(free_port)
WARM = WarmStarter() if os.environ.get("SPLITSPACE_TEST_FORK", "1") != "0" else None
launch_with(WARM)

# API keys the tests use, as an operator would define them.
KEYS = {
    "alpha": ("alpha-key-0001", "free"),
    "beta": ("beta-key-0002", "pro"),
    "tight": ("tight-key-0003", "tight"),
    "other": ("other-key-0004", "free"),
    "metered": ("metered-key-0005", "metered"),
    "chatty": ("chatty-key-0006", "chatty"),
}


def key(name: str) -> str:
    return KEYS[name][0]


QUOTAS = tiers_toml(
    anonymous={**TIER, "gpu_seconds": 600, "address_gpu_seconds": 900, "requests_per_minute": 1000},
    tight={**TIER, "max_queued": 1, "gpu_seconds": 600},
    metered={**TIER, "max_queued": 4, "gpu_seconds": 0.5, "window_s": 120},
    chatty={**TIER, "max_queued": 10, "gpu_seconds": 600, "requests_per_minute": 2},
) + keys_toml({name: tier for name, (_, tier) in KEYS.items()}, key)


SHARED = SharedDeployments()
"""This test process' ``tiny`` and ``direct`` (see the hooks at the end)."""
CONFTEST_BASEID = "tests"
"""How pytest names where this file's fixtures are defined."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    """Both tiers with the tiny diffusers model and the quota file above
    (shared by the modules that use it: tests/sharing.py)."""
    return SHARED.get("tiny", lambda: Deployment(tmp_path_factory.mktemp("tiny"), model="tiny", quotas=QUOTAS))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


# -- Redis (issue 12): a real redis-server, never skipped ----------------------------------
@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    """One ``redis-server`` on a free port for the session (tests keep apart by key prefix)."""
    from tests.redis_server import start_redis

    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[LocalRedis]:
    """A ``redis-server`` of this test alone, which it may stop and start again."""
    from tests.redis_server import start_redis

    server = start_redis(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def direct(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    """Both tiers (``sleep:1``) reached directly, as on the open internet: no trusted proxy,
    both logging at INFO (so that each log line a bad request causes shows). For the tests
    of the public face: malformed calls, logs, addresses. (Shared, as ``tiny``.)"""
    info = {"SPLITSPACE_LOG_LEVEL": "info"}
    return SHARED.get(
        "direct",
        lambda: Deployment(
            tmp_path_factory.mktemp("direct"),
            model="sleep:1",
            quotas=QUOTAS,
            trusted_proxies=0,
            backend_env=dict(info),
            frontend_env=dict(info),
        ),
    )


# -- share groups (tests/sharing.py) ----------------------------------------------------------
@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    groups = share_groups(items)
    for item, group in groups.items():
        item.add_marker(pytest.mark.xdist_group(group))
    cluster(items, groups)


@pytest.hookimpl(trylast=True)  # after the test's own fixtures are torn down
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    SHARED.keep_only([] if nextitem is None else conftest_fixtures(nextitem, CONFTEST_BASEID))


def pytest_sessionfinish(session: pytest.Session) -> None:
    SHARED.keep_only([])
    if WARM is not None:
        WARM.close()
