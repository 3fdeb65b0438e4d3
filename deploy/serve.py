"""Serve one tier's app factory with uvicorn (both tiers run the same way).

``--reload`` needs an import string and a factory, so each tier exposes
``create_app()`` (settings from the environment) and this module runs it.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def serve(factory: str, host: str, port: int, *, reload: bool = False) -> None:
    import uvicorn

    uvicorn.run(
        factory, factory=True, host=host, port=port, log_level="warning",
        timeout_graceful_shutdown=2, reload=reload,
        reload_dirs=[str(REPO_ROOT)] if reload else None,
        reload_includes=["*.py"] if reload else None,
    )
