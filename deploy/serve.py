"""Serve one tier's app factory with uvicorn (both tiers run the same way).

``--reload`` needs an import string and a factory, so each tier exposes
``create_app()`` (settings from the environment) and this module runs it.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


KEEP_ALIVE_S = 65
"""Idle keep-alive connections live this long: longer than clients keep theirs (httpx 5 s,
aiohttp 15 s, browsers up to 60 s), so that a client never reuses a connection the tier is
closing at that moment (uvicorn's default, 5 s, equals httpx's: under a crowd, requests
were lost to that race)."""


def serve(factory: str, host: str, port: int, *, reload: bool = False) -> None:
    import uvicorn

    uvicorn.run(
        factory, factory=True, host=host, port=port, log_level="warning",
        timeout_graceful_shutdown=2, reload=reload, timeout_keep_alive=KEEP_ALIVE_S,
        reload_dirs=[str(REPO_ROOT)] if reload else None,
        reload_includes=["*.py"] if reload else None,
    )
