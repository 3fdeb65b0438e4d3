"""A real ``redis-server`` for the tests (the fixtures in conftest.py use this).

Never a skip: a machine without Redis fails the tests that need it, saying which Debian
package to install (``scripts/test`` installs it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from splitspace.deploy.redis_local import LocalRedis, RedisNotInstalled
from tests.support import free_port


def start_redis(workdir: Path, port: int | None = None) -> LocalRedis:
    try:
        return LocalRedis(port=free_port() if port is None else port, workdir=workdir).start()
    except RedisNotInstalled as exc:
        pytest.fail(f"{exc}; the store tests need a real Redis (scripts/test installs it)", pytrace=False)
