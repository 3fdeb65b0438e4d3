"""Files across the hop: carried as their bytes, never as a path on the other tier.

A payload's ``FileData`` (Gradio's file reference: a path in this tier's cache) is
replaced by ``{"splitspace_file": {"name", "mime_type", "b64"}}`` before it crosses
(:func:`inline_files`), and written into the receiving tier's Gradio cache as a
``FileData`` again when it arrives (:func:`outline_files`). Gradio's own helpers walk the
payload and write the cache, so nested values (a Gallery, a Chatbot message with an image)
work as a top-level file does. A file over ``max_bytes`` is refused with
:class:`FileTooLarge`, which names the limit.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
from pathlib import Path
from typing import Any

from gradio import processing_utils
from gradio_client import utils as client_utils

from splitspace.shared.contract.calls import FILE_KEY

DEFAULT_MAX_FILE_BYTES = 50 * 1024 * 1024


class FileTooLarge(ValueError):
    """A file over the limit an operator set (``SPLITSPACE_MAX_FILE_BYTES``)."""


class BadFile(ValueError):
    """A carried file that cannot be read back (not base64, no name)."""


def content_hash(data: bytes) -> str:
    """The name Gradio's cache gives a folder for ``data`` (its seeded sha256: a path
    nobody guesses without the bytes)."""
    return str(processing_utils.hash_bytes(data))


def inline_files(payload: Any, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Any:
    """``payload`` with each FileData replaced by its bytes (read from its path). The paths
    must be this tier's own: Gradio has moved an input into its cache and checked it, or a
    component's postprocess wrote an output there; never call this on a payload as a
    client sent it."""

    def carry(file: dict[str, Any]) -> dict[str, Any]:
        path = Path(str(file.get("path") or ""))
        size = path.stat().st_size
        if size > max_bytes:
            raise FileTooLarge(f"a file of {size} bytes is over the limit of {max_bytes} bytes")
        name = file.get("orig_name") or path.name
        mime = file.get("mime_type") or mimetypes.guess_type(name)[0]
        return {FILE_KEY: {"name": name, "mime_type": mime, "b64": base64.b64encode(path.read_bytes()).decode()}}

    return client_utils.traverse(payload, carry, client_utils.is_file_obj_with_meta)


def outline_files(payload: Any, cache_dir: str, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Any:
    """``payload`` with each carried file written to ``cache_dir`` and referred to by a
    FileData (the form a component's ``preprocess`` and Gradio's outputs take)."""

    def land(doc: dict[str, Any]) -> dict[str, Any]:
        carried = doc[FILE_KEY]
        if not isinstance(carried, dict) or not isinstance(carried.get("b64"), str):
            raise BadFile("a file carried without its bytes")
        if len(carried["b64"]) * 3 // 4 > max_bytes + 2:
            raise FileTooLarge(f"a file is over the limit of {max_bytes} bytes")
        try:
            data = base64.b64decode(carried["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise BadFile("a file's bytes are not base64") from None
        name = Path(str(carried.get("name") or "file")).name or "file"
        path = processing_utils.save_bytes_to_cache(data, name, cache_dir)
        mime = carried.get("mime_type") if isinstance(carried.get("mime_type"), str) else None
        return {
            "path": path,
            "orig_name": name,
            "mime_type": mime or mimetypes.guess_type(name)[0],
            "size": len(data),
            "meta": {"_type": "gradio.FileData"},
        }

    return client_utils.traverse(payload, land, is_carried_file)


def is_carried_file(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {FILE_KEY}


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
