"""Files across the hop: carried as their bytes, never as a path on the other tier.

A payload's ``FileData`` (Gradio's file reference: a path in this tier's cache) is
replaced by a :class:`~shared.contract.calls.CarriedFile` (its name, type and bytes)
before it crosses (:func:`inline_files`), and written into the receiving tier's Gradio
cache as a ``FileData`` again when it arrives (:func:`outline_files`); on the wire its
bytes follow the JSON unencoded (``shared/contract/frames.py``). Gradio's own helper walks
the payload, so nested values (a Gallery, a Chatbot message with an image) work as a
top-level file does. A file over ``max_bytes`` is refused with :class:`FileTooLarge`,
which names the limit.

A landed file's folder in the cache is named by its sha256, which the file carries (the
sending tier hashed it once, the frame's reader checked it): no second hash of its bytes
(Gradio's ``save_bytes_to_cache`` would hash them again), and a file already landed is
not written again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from gradio import processing_utils
from gradio_client import utils as client_utils

from splitspace.shared.contract.calls import FILE_KEY, CarriedFile

DEFAULT_MAX_FILE_BYTES = 50 * 1024 * 1024


class FileTooLarge(ValueError):
    """A file over the limit an operator set (``SPLITSPACE_MAX_FILE_BYTES``)."""


class BadFile(ValueError):
    """A file reference that came without its bytes."""


def content_hash(data: bytes) -> str:
    """The name Gradio's cache gives a folder for ``data`` (its seeded sha256: a path
    nobody guesses without the bytes)."""
    return str(processing_utils.hash_bytes(data))


def inline_files(payload: Any, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Any:
    """``payload`` with each FileData replaced by its bytes (read from its path). The paths
    must be this tier's own: Gradio has moved an input into its cache and checked it, or a
    component's postprocess wrote an output there; never call this on a payload as a
    client sent it."""

    def carry(file: dict[str, Any]) -> CarriedFile:
        path = Path(str(file.get("path") or ""))
        size = path.stat().st_size
        if size > max_bytes:
            raise FileTooLarge(f"a file of {size} bytes is over the limit of {max_bytes} bytes")
        data = path.read_bytes()
        if len(data) > max_bytes:  # (it grew since)
            raise FileTooLarge(f"a file of {len(data)} bytes is over the limit of {max_bytes} bytes")
        name = file.get("orig_name") or path.name
        return CarriedFile(name, file.get("mime_type") or mimetypes.guess_type(name)[0], data)

    return client_utils.traverse(payload, carry, client_utils.is_file_obj_with_meta)


def outline_files(payload: Any, cache_dir: str, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Any:
    """``payload`` with each carried file written to ``cache_dir`` and referred to by a
    FileData (the form a component's ``preprocess`` and Gradio's outputs take)."""

    def land(value: Any) -> dict[str, Any]:
        if not isinstance(value, CarriedFile):
            raise BadFile("a file carried without its bytes")
        if len(value.data) > max_bytes:
            raise FileTooLarge(f"a file of {len(value.data)} bytes is over the limit of {max_bytes} bytes")
        name = Path(value.name).name or "file"
        return {
            "path": land_bytes(value, name, cache_dir),
            "orig_name": name,
            "mime_type": value.mime_type or mimetypes.guess_type(name)[0],
            "size": len(value.data),
            "meta": {"_type": "gradio.FileData"},
        }

    return client_utils.traverse(payload, land, is_carried_file)


def land_bytes(file: CarriedFile, name: str, cache_dir: str) -> str:
    """The file's path in ``cache_dir/<sha256>/<name>``, written unless it is there already
    (then touched: Gradio's ``delete_cache`` ages files by their ctime). Written under a
    temporary name and renamed, so a concurrent call never reads half a file."""
    if not Path(name).suffix:  # as Gradio's save_bytes_to_cache: a recording's type from its header
        name += processing_utils.detect_audio_format(file.data)
    folder = Path(cache_dir) / file.sha256
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (client_utils.strip_invalid_filename_characters(name) or "file")
    try:
        if path.stat().st_size == len(file.data):
            os.utime(path)
            return str(path.resolve())
    except OSError:
        pass
    fd, staging = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(file.data)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return str(path.resolve())


def use_own_cache(tier: str) -> None:
    """Make this process' Gradio cache a folder of its tier's own (``$TMPDIR/splitspace-<tier>``)
    unless ``GRADIO_TEMP_DIR`` names one: each tier deletes what it wrote there after a while
    (``expire_files_every``), which must never reach another app's files in Gradio's shared
    default (``$TMPDIR/gradio``). Called before the app is built (Gradio reads it per call)."""
    os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(tempfile.gettempdir()) / f"splitspace-{tier}"))


def is_carried_file(value: Any) -> bool:
    """A file carried as its bytes, or a reference to one that came without them."""
    return isinstance(value, CarriedFile) or (isinstance(value, dict) and set(value) == {FILE_KEY})


def carries_files(payload: Any) -> bool:
    """Whether a carried file is anywhere in ``payload`` (a stream's text chunks have none,
    and need no trip to a thread to be landed)."""
    if is_carried_file(payload):
        return True
    if isinstance(payload, dict):
        return any(carries_files(v) for v in payload.values())
    if isinstance(payload, list | tuple):
        return any(carries_files(v) for v in payload)
    return False


log = logging.getLogger("splitspace.files")


def expire_files(folder: str, pattern: str, age_s: float, now: float | None = None) -> int:
    """Delete the files in ``folder`` matching ``pattern`` (a cache's ``*/<name>``: one file a
    folder) last written or touched more than ``age_s`` ago, and their folders once empty;
    how many. A cache that nobody cleans grows with every file ever seen."""
    cutoff = (time.time() if now is None else now) - age_s
    gone = 0
    for path in Path(folder).glob(pattern):
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                gone += 1
                with contextlib.suppress(OSError):  # (not empty: another file, or one being written)
                    path.parent.rmdir()
        except OSError:  # deleted meanwhile
            continue
    return gone


async def expire_files_every(folder: str, pattern: str, age_s: float, every_s: float = 60.0) -> None:
    """:func:`expire_files` now and then (from a tier's lifespan), off the event loop."""
    while True:
        await asyncio.sleep(min(every_s, age_s / 2))
        try:
            await asyncio.to_thread(expire_files, folder, pattern, age_s)
        except Exception:  # housekeeping must not stop for good
            log.exception("expiring files in %s failed; trying again later", folder)
