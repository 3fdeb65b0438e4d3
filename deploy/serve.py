"""Serve one tier's app factory with uvicorn (both tiers run the same way).

``--reload`` needs an import string and a factory, so each tier exposes
``create_app()`` (settings from the environment) and this module runs it,
with the server options of ``shared/http/server.py`` (no proxy headers believed by
uvicorn, keep-alive and header deadlines, capped logs).
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def serve(factory: str, host: str, port: int, *, reload: bool = False, log_level: str = "warning") -> None:
    import uvicorn

    from splitspace.shared.http.server import uvicorn_options

    uvicorn.run(
        factory, factory=True, host=host, port=port, reload=reload,
        reload_dirs=[str(REPO_ROOT)] if reload else None,
        reload_includes=["*.py"] if reload else None,
        **uvicorn_options(log_level),
    )
