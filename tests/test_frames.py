"""The hop's framing (``shared/contract/frames.py``): a JSON line, then its files' bytes.

In-process: what one tier writes the other reads back exactly, however the bytes arrive
in chunks; a frame that lies about its files (size, digest, a missing blob, over the
limit) is refused with BadFrame, never read as something else; a line without files is
plain JSON, so status lines and a JSON body without files are frames."""

from __future__ import annotations

import hashlib
import json

import pytest

from splitspace.shared.contract import frames
from splitspace.shared.contract.calls import FILE_KEY, Call, CallInfo, CallResult, CarriedFile, payloads_to_json
from splitspace.shared.contract.calls import payloads_from_json as from_json

PNG = bytes(range(256)) * 40 + b"\n\n{]\n"  # newlines and brackets in the bytes: never read as JSON
PICTURE = CarriedFile("in.png", "image/png", PNG)


def split(stream: bytes, chunk: int) -> list[frames.RawFrame]:
    splitter = frames.FrameSplitter()
    got = [f for i in range(0, len(stream), chunk) for f in splitter.feed(stream[i : i + chunk])]
    last = splitter.end()
    return got + ([last] if last is not None else [])


@pytest.mark.parametrize("chunk", [1, 7, 4096, 10**6])
def test_a_stream_of_frames_reads_back_as_written_whatever_the_chunks(chunk: int) -> None:
    info = CallInfo("mirror", 0.0, 0.1, 0.1, "key:a")
    docs = [
        {"status": "queued", "position": 1, "eta_s": 0.5, "cap": None},
        {"status": "partial", "data": [[PICTURE, {"nested": [PICTURE]}], "text"]},
        CallResult([PICTURE, CarriedFile("b.txt", None, b"")], info).to_wire(),
    ]
    stream = b"".join(frames.encode(d) for d in docs)
    assert stream.count(PNG) == 2  # a file twice in one frame is sent once
    assert [frames.decode(f) for f in split(stream, chunk)] == docs


def test_the_json_line_holds_references_and_a_calls_digest_binds_the_bytes() -> None:
    body = frames.encode(Call("mirror", [PICTURE, True]).to_wire())
    line = json.loads(body.split(b"\n", 1)[0])
    ref = line["data"][0][FILE_KEY]
    assert ref == {"name": "in.png", "mime_type": "image/png", "size": len(PNG), "sha256": PICTURE.sha256, "blob": 0}
    assert ref["sha256"] == hashlib.sha256(PNG).hexdigest()
    other = CarriedFile("in.png", "image/png", PNG[:-1] + b"!")
    assert Call("mirror", [PICTURE, True]).digest() != Call("mirror", [other, True]).digest()
    assert Call.from_wire(frames.decode(frames.split_body(body))) == Call("mirror", [PICTURE, True])


def test_a_json_body_without_files_is_a_frame() -> None:
    body = json.dumps({"endpoint": "shout", "data": ["hi", 2]}).encode()
    assert frames.decode(frames.split_body(body)) == {"endpoint": "shout", "data": ["hi", 2]}


def tampered(edit: str) -> bytes:
    body = frames.encode(Call("mirror", [PICTURE]).to_wire())
    line, blob = body.split(b"\n", 1)
    doc = json.loads(line)
    ref = doc["data"][0][FILE_KEY]
    if edit == "bytes":
        blob = b"X" + blob[1:]
    elif edit == "digest":
        ref["sha256"] = "0" * 64
    elif edit == "no blob":
        del ref["blob"]
        blob = b""
    elif edit == "trailing bytes":
        del ref["blob"]
    elif edit == "blob index":
        ref["blob"] = 1
    elif edit == "short":
        blob = blob[:-1]
    return json.dumps(doc).encode() + b"\n" + blob


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        ("bytes", "do not match their sha256"),
        ("digest", "do not match their sha256"),
        ("no blob", "without its bytes"),
        ("trailing bytes", "exactly one frame"),
        ("blob index", "numbered 0 to n-1"),
        ("short", "ended inside a frame"),
    ],
)
def test_a_frame_that_lies_about_its_files_is_refused(edit: str, says: str) -> None:
    with pytest.raises(frames.BadFrame, match=says):
        frames.decode(frames.split_body(tampered(edit)))


def test_a_file_over_the_limit_is_refused_before_its_bytes_are_read() -> None:
    body = frames.encode(Call("mirror", [PICTURE]).to_wire())
    splitter = frames.FrameSplitter(max_file_bytes=len(PNG) - 1)
    with pytest.raises(frames.BadFrame, match=f"over the limit of {len(PNG) - 1} bytes"):
        splitter.feed(body[: body.index(b"\n") + 1])  # the line alone says how large its file is
    with pytest.raises(frames.BadFrame, match="over the limit"):
        frames.decode(frames.split_body(body), max_file_bytes=len(PNG) - 1)


def test_a_jobs_record_keeps_its_files_as_base64_json_and_reads_them_back() -> None:
    data = [PICTURE, {"gallery": [PICTURE]}, 3]
    kept = json.loads(json.dumps(payloads_to_json(data)))
    assert kept[0][FILE_KEY]["b64"] and from_json(kept) == data
    with pytest.raises(ValueError, match="not base64"):
        from_json([{FILE_KEY: {"name": "x", "b64": "not base64!"}}])


def test_a_landed_file_is_named_by_its_sha256_kept_in_its_folder_and_written_once(tmp_path) -> None:
    from splitspace.shared.app.files import FileTooLarge, inline_files, outline_files

    landed = outline_files([PICTURE, {"x": CarriedFile("../../etc/passwd", None, b"hi")}], str(tmp_path))
    path = tmp_path / PICTURE.sha256 / "in.png"
    assert landed[0]["path"] == str(path.resolve()) and path.read_bytes() == PNG
    assert landed[1]["x"]["path"].startswith(str(tmp_path.resolve())) and landed[1]["x"]["orig_name"] == "passwd"
    before = path.stat().st_ino
    assert outline_files([PICTURE], str(tmp_path))[0]["path"] == landed[0]["path"] and path.stat().st_ino == before
    assert inline_files(landed) == [PICTURE, {"x": CarriedFile("passwd", None, b"hi")}]  # back as they came
    with pytest.raises(FileTooLarge, match=f"over the limit of {len(PNG) - 1} bytes"):
        outline_files([PICTURE], str(tmp_path), max_bytes=len(PNG) - 1)
