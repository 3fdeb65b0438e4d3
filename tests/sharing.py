"""Which tests share a deployment, so that each deployment starts once and lives no longer than needed.

Why this module exists: starting a tier costs seconds of CPU (it imports Gradio and torch)
and an idle tier still costs about 4% of a core (Gradio polls its queue every millisecond).
The tests that share a deployment (a module- or session-scoped fixture: both tiers, a
browser page, a model built in this process) form one *share group*: with pytest-xdist
(``--dist loadgroup``) a group runs on one worker, its tests one after the other, and the
groups and the tests that share nothing are spread over the workers. Without xdist the
tests of a group still run one after the other, so that a deployment several modules use
(``tiny``, ``direct``) is started once and stopped as soon as its last test is done
(:class:`SharedDeployments`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import pytest

from splitspace.deploy.processes import Deployment

CHEAP = frozenset({"tmp_path_factory", "worker_id", "testrun_uid", "redis_server", "browser"})
"""Module- or session-scoped fixtures that cost next to nothing to set up again on another
worker (a ``redis-server`` starts in milliseconds, Chromium in one second): they tie no tests
together, so tests using them alone still spread over the workers."""


def shared_fixtures(item: pytest.Item) -> list[str]:
    """The costly fixtures ``item`` uses that live longer than one test, each named with
    where it is defined (two modules may each have a fixture of the same name)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return []
    found = []
    for name in item.fixturenames:  # type: ignore[attr-defined]
        defs = info.name2fixturedefs.get(name)
        if not defs or name in CHEAP:
            continue
        fixturedef = defs[-1]
        if fixturedef.scope != "function":
            found.append(f"{fixturedef.baseid}::{name}")
    return found


def share_groups(items: Sequence[pytest.Item]) -> dict[pytest.Item, str]:
    """Each item that shares a costly fixture with another, and the name of its group: the
    tests joined, directly or through others, by the fixtures they use (union-find)."""
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    uses = {item: shared_fixtures(item) for item in items}
    for fixtures in uses.values():
        for other in fixtures[1:]:
            parent[root(other)] = root(fixtures[0])
    members: dict[str, list[pytest.Item]] = {}
    for item, fixtures in uses.items():
        if fixtures:
            members.setdefault(root(fixtures[0]), []).append(item)
    groups = {}
    for group in members.values():
        if len(group) > 1:  # named after the fixture most of its tests use
            name = Counter(f for item in group for f in uses[item]).most_common(1)[0][0]
            groups.update({item: f"share:{name}" for item in group})
    return groups


def cluster(items: list[pytest.Item], groups: dict[pytest.Item, str]) -> None:
    """Reorder ``items`` in place so that each group's tests run one after the other, where
    its first test was; the rest keep their order."""
    by_group: dict[str, list[pytest.Item]] = {}
    for item in items:
        if item in groups:
            by_group.setdefault(groups[item], []).append(item)
    ordered: list[pytest.Item] = []
    for item in items:
        if item not in groups:
            ordered.append(item)
        elif by_group.get(groups[item]):
            ordered.extend(by_group.pop(groups[item]))
    items[:] = ordered


def conftest_fixtures(item: pytest.Item, baseid: str) -> list[str]:
    """The fixtures ``item`` uses that are defined by the conftest.py at ``baseid`` (not a
    module's own fixture of the same name)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return []
    return [name for name, defs in info.name2fixturedefs.items() if defs and defs[-1].baseid == baseid]


class SharedDeployments:
    """Deployments that tests of several modules use as they are (``tiny``, ``direct``): one
    of each per test process, started when a test first asks for it and stopped as soon as the
    next test does not need it (:func:`cluster` puts the tests that do one after the other)."""

    def __init__(self) -> None:
        self.running: dict[str, Deployment] = {}

    def get(self, name: str, make: Callable[[], Deployment]) -> Deployment:
        deployment = self.running.get(name)
        if deployment is None:
            deployment = self.running[name] = make().start()
        return deployment

    def keep_only(self, needed: Sequence[str]) -> None:
        for name in [n for n in self.running if n not in needed]:
            self.running.pop(name).stop()
