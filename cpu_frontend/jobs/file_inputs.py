"""A job's file inputs as Gradio's own payloads, so that one validation checks jobs and Gradio calls.

Why it exists: a Gradio API call uploads its files first (``/gradio_api/upload``) and names
them by path; a job has no upload step, its files come inside its JSON body. This module
writes each of them into a folder of this tier's cache as Gradio's ``FileData``, the form
the Gradio path hands ``cpu_frontend.api.validation.validate_call``, so that the same
component rules (file types, ``max_file_bytes``, the event's ``validator=``) check both;
the caller then carries them over the hop as bytes (``shared.app.files.inline_files``).

A file input is given as ``{"b64": "<base64>", "name"?: "x.png", "mime_type"?: "image/png"}``
or as a ``data:`` URL (``"data:image/png;base64,..."``); the older
``{"file": {"name", "mime_type", "b64"}}`` is read too. A file named by a path (Gradio's
``FileData``) is refused: it would name a file on this machine.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradio_client import utils as client_utils

from splitspace.cpu_frontend.api.validation import takes_files
from splitspace.shared.contract.errors import ValidationFailed

FILE_FORM = 'a file is given as {"b64": "<base64>", "name": "x.png"} or a data: URL'
_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*);base64,", re.IGNORECASE)
_B64_KEYS = frozenset({"b64", "name", "mime_type"})


def is_job_file(value: Any) -> bool:
    """One of the forms a job gives a file in (the module docstring)."""
    if isinstance(value, str):
        return value[:5].lower() == "data:"
    if not isinstance(value, dict):
        return False
    if set(value) == {"file"} and isinstance(value["file"], dict):
        value = value["file"]
    return "b64" in value and set(value) <= _B64_KEYS


def land_files(component: Any, value: Any, folder: Path, field: str) -> Any:
    """``value`` with each file it gives written into ``folder`` and referred to by a
    ``FileData``; ValidationFailed naming ``field`` for a file that cannot be read, or one
    named by a path. Inputs of components that take no files are returned as they are."""
    if not takes_files(component):
        if _names_path(value, _file_data):  # (what inline_files would read)
            raise ValidationFailed(field, f"names a file by its path; {FILE_FORM}")
        return value
    if _names_path(value, client_utils.is_file_obj):
        raise ValidationFailed(field, f"names a file by its path; {FILE_FORM}")
    return client_utils.traverse(value, lambda doc: _land(doc, folder, field), is_job_file)


def _land(value: Any, folder: Path, field: str) -> dict[str, Any]:
    if isinstance(value, str):
        m = _DATA_URL.match(value)
        if m is None:
            raise ValidationFailed(field, f"is a data: URL that is not base64 (data:<type>;base64,...); {FILE_FORM}")
        mime, b64 = m.group(1), value[m.end() :]
        name = "file" + ((mimetypes.guess_extension(mime) or "") if mime else "")
    else:
        doc = value["file"] if "file" in value else value
        b64, name, mime = doc.get("b64"), doc.get("name"), doc.get("mime_type")
        if not isinstance(b64, str) or not isinstance(name, str | None) or not isinstance(mime, str | None):
            raise ValidationFailed(field, f"b64, name and mime_type must be strings; {FILE_FORM}")
        name = Path(name or "file").name.strip(".") or "file"
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationFailed(field, "the file's bytes are not base64") from None
    own = folder / str(len(list(folder.iterdir())))  # one folder per file: two may share a name
    own.mkdir()
    path = own / name[:200]
    path.write_bytes(data)
    return {
        "path": str(path),
        "orig_name": name,
        "mime_type": mime or mimetypes.guess_type(name)[0],
        "size": len(data),
        "meta": {"_type": "gradio.FileData"},
    }


def _file_data(value: Any) -> bool:
    """A Gradio ``FileData`` (as ``client_utils.is_file_obj_with_meta``, for any ``meta``)."""
    meta = value.get("meta") if isinstance(value, dict) else None
    return client_utils.is_file_obj(value) and isinstance(meta, dict) and meta.get("_type") == "gradio.FileData"


def _names_path(value: Any, is_file: Callable[[Any], bool]) -> bool:
    if is_file(value):
        return True
    if isinstance(value, dict):
        return any(_names_path(v, is_file) for v in value.values())
    if isinstance(value, list):
        return any(_names_path(v, is_file) for v in value)
    return False
