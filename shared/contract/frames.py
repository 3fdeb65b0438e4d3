"""The hop's framing: a JSON document, then the bytes of the files it carries, unencoded.

Why it exists: a file used to cross as base64 inside the JSON, which cost both tiers a
third more bytes, an encode and a decode, and every pass over the JSON (the canonical
form the identity token is bound to, the parser, the guard's limits) ran over the whole
file. Measured with a 512x512 PNG (508 KB) on the project's 2-core machine, about 12 ms
of a call's time. Here a file's bytes never enter the JSON:

- a frame is one JSON object on one line (``\\n``-terminated; JSON escapes every newline
  inside a string), then its blobs, back to back;
- where a payload holds a file (:class:`~shared.contract.calls.CarriedFile`), the JSON
  holds its reference ``{"splitspace_file": {"name", "mime_type", "size", "sha256",
  "blob"}}``: ``blob`` is the index of its bytes after the line (blobs in index order),
  ``size`` their length, ``sha256`` their digest, which the reader checks. A call's
  digest (what its identity token is bound to) is over the references, so it binds the
  bytes too, at the cost of one hash of each file per tier;
- a line with no reference is plain NDJSON: a stream of frames without files (statuses,
  text) is an NDJSON stream, and a JSON body without files is a frame.

:func:`encode` writes a frame; :class:`FrameSplitter` cuts a byte stream into raw frames
(the line and its blobs, nothing parsed: cheap enough for the event loop), and
:func:`decode` parses one, checks its blobs and puts each file back in its place.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from splitspace.shared.contract.calls import FILE_KEY, CarriedFile

FRAME_TYPE = "application/x-splitspace-frames"
"""The content type of a body of frames (a call; the GPU tier's answer to one)."""


class BadFrame(ValueError):
    """A frame that cannot be read; the message says what is wrong with it (no input echoed)."""


INLINE_LINE_BYTES = 256 * 1024
INLINE_BLOB_BYTES = 1024 * 1024
"""A frame within both is decoded on the event loop (its JSON parsed, its files hashed: well
under a millisecond); a larger one in a thread (:meth:`RawFrame.small`)."""


@dataclass(frozen=True)
class RawFrame:
    """One frame as it arrived: its JSON line, and its blobs (each file's bytes)."""

    line: bytes
    blobs: tuple[bytes, ...] = ()

    @property
    def size(self) -> int:
        return len(self.line) + sum(len(b) for b in self.blobs)

    @property
    def small(self) -> bool:
        """Cheap enough to decode on an event loop."""
        return len(self.line) <= INLINE_LINE_BYTES and sum(len(b) for b in self.blobs) <= INLINE_BLOB_BYTES


def encode(doc: dict[str, Any]) -> bytes:
    """``doc`` as a frame: each CarriedFile in it (at any depth) as a reference, its bytes
    after the line (a file carried twice is sent once)."""
    blobs: list[bytes] = []
    index: dict[str, int] = {}

    def reference(value: Any) -> Any:
        if not isinstance(value, CarriedFile):
            raise TypeError(f"{type(value).__name__} cannot cross the hop")
        i = index.get(value.sha256)
        if i is None:
            i = index[value.sha256] = len(blobs)
            blobs.append(value.data)
        return {FILE_KEY: {**value.reference(), "blob": i}}

    line = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, default=reference).encode()
    return b"".join((line, b"\n", *blobs))


def decode(frame: RawFrame, *, max_file_bytes: int | None = None) -> Any:
    """The frame's document with each reference replaced by its CarriedFile; BadFrame when
    the line is not JSON, a reference is malformed or names a blob that is not there, a
    blob's digest is not the reference's, or a file is over ``max_file_bytes``."""
    refs: list[dict[str, Any]] = []

    def hook(obj: dict[str, Any]) -> Any:
        if FILE_KEY in obj and len(obj) == 1:
            ref = obj[FILE_KEY]
            if not isinstance(ref, dict) or "blob" not in ref:
                raise BadFrame("a file carried without its bytes")
            refs.append(ref)
            return _Ref(len(refs) - 1)
        return obj

    try:
        doc = json.loads(frame.line, object_hook=hook)
    except BadFrame:
        raise
    except (ValueError, RecursionError):
        raise BadFrame("its JSON line cannot be read") from None
    if not refs:
        return doc
    return _placed(doc, [_file(ref, frame.blobs, max_file_bytes) for ref in refs])


def blob_sizes(line: bytes) -> list[int]:
    """The sizes of the blobs after ``line``, from its references (without parsing the
    rest: a line with none has none). BadFrame when they do not add up."""
    if FILE_KEY.encode() not in line:
        return []
    sizes: dict[int, int] = {}

    def hook(obj: dict[str, Any]) -> Any:
        ref = obj.get(FILE_KEY) if len(obj) == 1 else None
        if isinstance(ref, dict):
            blob, size = _count(ref.get("blob")), _count(ref.get("size"))
            if blob is not None and size is not None and sizes.setdefault(blob, size) != size:
                raise BadFrame("two references to one blob disagree on its size")
        return obj

    try:
        json.loads(line, object_hook=hook)
    except BadFrame:
        raise
    except (ValueError, RecursionError):
        raise BadFrame("its JSON line cannot be read") from None
    if sorted(sizes) != list(range(len(sizes))):
        raise BadFrame("its blobs are not numbered 0 to n-1")
    return [sizes[i] for i in range(len(sizes))]


class FrameSplitter:
    """Cuts a stream of frames into :class:`RawFrame` as its bytes arrive (``feed``); a line
    longer than ``max_line_bytes``, or a file over ``max_file_bytes``, raises BadFrame."""

    def __init__(self, *, max_line_bytes: int | None = None, max_file_bytes: int | None = None) -> None:
        self.max_line_bytes = max_line_bytes
        self.max_file_bytes = max_file_bytes
        self._buffer = bytearray()
        self._line: bytes | None = None
        self._sizes: list[int] = []

    def feed(self, chunk: bytes) -> list[RawFrame]:
        self._buffer += chunk
        frames: list[RawFrame] = []
        while True:
            if self._line is None:
                end = self._buffer.find(b"\n")
                if end < 0:
                    if self.max_line_bytes is not None and len(self._buffer) > self.max_line_bytes:
                        raise BadFrame(f"a JSON line longer than {self.max_line_bytes} bytes")
                    return frames
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                if not line.strip():
                    continue
                self._line, self._sizes = line, blob_sizes(line)
                if self.max_file_bytes is not None and any(s > self.max_file_bytes for s in self._sizes):
                    raise BadFrame(f"a file over the limit of {self.max_file_bytes} bytes")
            needed = sum(self._sizes)
            if len(self._buffer) < needed:
                return frames
            blobs, at = [], 0
            view = memoryview(self._buffer)
            for size in self._sizes:
                blobs.append(bytes(view[at : at + size]))
                at += size
            view.release()
            del self._buffer[:needed]
            frames.append(RawFrame(self._line, tuple(blobs)))
            self._line, self._sizes = None, []

    def end(self) -> RawFrame | None:
        """The stream ended: its last frame if it had no newline (a JSON body), else None;
        BadFrame when a frame was cut off."""
        if self._line is not None:
            raise BadFrame("the stream ended inside a frame's blobs")
        rest = bytes(self._buffer).strip()
        self._buffer.clear()
        if not rest:
            return None
        if blob_sizes(rest):
            raise BadFrame("the stream ended inside a frame's blobs")
        return RawFrame(rest)


def split_body(body: bytes, *, max_file_bytes: int | None = None) -> RawFrame:
    """A request body that is exactly one frame (a JSON body without files is one)."""
    splitter = FrameSplitter(max_file_bytes=max_file_bytes)
    frames = splitter.feed(body)
    last = splitter.end()
    if last is not None:
        frames.append(last)
    if len(frames) != 1:
        raise BadFrame("the body must be exactly one frame")
    return frames[0]


@dataclass(frozen=True)
class _Ref:
    """Where a reference stood in the document, until its file is put there."""

    n: int


def _count(value: Any) -> int | None:
    """``value`` if it is a count (an int, not a bool, at least 0), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _file(ref: dict[str, Any], blobs: tuple[bytes, ...], max_file_bytes: int | None) -> CarriedFile:
    blob, size, digest = _count(ref.get("blob")), _count(ref.get("size")), ref.get("sha256")
    if blob is None or size is None or not isinstance(digest, str) or blob >= len(blobs):
        raise BadFrame("a file reference without its blob, size and sha256")
    data = blobs[blob]
    if len(data) != size:
        raise BadFrame("a file's size is not its reference's")
    if max_file_bytes is not None and size > max_file_bytes:
        raise BadFrame(f"a file of {size} bytes is over the limit of {max_file_bytes} bytes")
    if hashlib.sha256(data).hexdigest() != digest:
        raise BadFrame("a file's bytes do not match their sha256")
    name, mime = ref.get("name"), ref.get("mime_type")
    return CarriedFile(
        name if isinstance(name, str) and name else "file", mime if isinstance(mime, str) else None, data, digest
    )


def _placed(value: Any, files: list[CarriedFile]) -> Any:
    if isinstance(value, _Ref):
        return files[value.n]
    if isinstance(value, list):
        return [_placed(v, files) for v in value]
    if isinstance(value, dict):
        return {k: _placed(v, files) for k, v in value.items()}
    return value
