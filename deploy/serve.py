"""Serve one tier's app factory with uvicorn (both tiers run the same way).

``--reload`` needs an import string and a factory, so each tier exposes
``create_app()`` (settings from the environment) and this module runs it,
with the server options of ``shared/http/server.py`` (no proxy headers believed by
uvicorn, keep-alive and header deadlines, capped logs).

With ``--reload`` the tier restarts when a ``*.py`` file of splitspace or of the
developer's app (``--app``) changes. The folders watched (:func:`watched_folders`) are
splitspace's packages, the app's folder and its packages, each watched on its own: an app's
folder is often a project's root, with a virtual environment or a model cache below it
that nobody edits and that would cost one watch per folder. uvicorn's own reloader watches
each folder it is given recursively, so :class:`FolderReload` is uvicorn's WatchFiles
reloader with ``recursive=False``. Imported only by the commands that serve.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from socket import socket

import uvicorn
from uvicorn.supervisors.watchfilesreload import WatchFilesReload
from watchfiles import watch

from splitspace.shared.http.server import uvicorn_options

REPO_ROOT = Path(__file__).resolve().parent.parent


def serve(
    factory: str,
    host: str,
    port: int,
    *,
    reload: bool = False,
    log_level: str = "warning",
    app_folder: Path | None = None,
) -> None:
    config = uvicorn.Config(
        factory,
        factory=True,
        host=host,
        port=port,
        reload=reload,
        reload_includes=["*.py"] if reload else None,
        **uvicorn_options(log_level),
    )
    server = uvicorn.Server(config)
    if not reload:
        server.run()
        return
    folders = watched_folders(REPO_ROOT, *([] if app_folder is None else [app_folder]))
    FolderReload(config, server.run, [config.bind_socket()], folders).run()


def watched_folders(*roots: Path) -> list[Path]:
    """Each root and the Python packages below it (folders with an ``__init__.py``, and
    theirs), never a folder that is not a package: a ``.venv``, ``data/`` or a model
    cache is never walked into."""
    found: dict[Path, None] = {}
    for root in roots:
        found[root.resolve()] = None
        for folder, subfolders, _ in os.walk(root.resolve()):
            subfolders[:] = [name for name in subfolders if _package(Path(folder) / name)]
            found.update({(Path(folder) / name).resolve(): None for name in subfolders})
    return list(found)


def _package(path: Path) -> bool:
    return not path.name.startswith(".") and path.name != "__pycache__" and (path / "__init__.py").is_file()


class FolderReload(WatchFilesReload):
    """uvicorn's WatchFiles reloader (its ``*.py`` filter, its restarts) on a list of
    folders, each watched alone."""

    def __init__(
        self,
        config: uvicorn.Config,
        target: Callable[[list[socket] | None], None],
        sockets: list[socket],
        folders: Iterable[Path],
    ) -> None:
        super().__init__(config, target, sockets)
        self.reload_dirs = list(folders)
        self.watcher = watch(
            *self.reload_dirs,
            watch_filter=None,
            stop_event=self.should_exit,
            yield_on_timeout=True,
            ignore_permission_denied=True,
            recursive=False,
        )
