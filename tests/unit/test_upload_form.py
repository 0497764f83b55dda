"""Unit tests of the streaming multipart reader (common.http.request_body)."""

from __future__ import annotations

import io

import flask
import pytest
from common.errors import (
    BadRequest,
    ClientDisconnected,
    FieldAfterFile,
    InvalidField,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from common.http.request_body import MAX_JSON_DEPTH, RequestBody, read_fields, read_upload
from werkzeug.test import EnvironBuilder

BOUNDARY = "----boundary42"


def multipart(*parts: tuple[str, str | None, bytes]) -> bytes:
    out = b""
    for name, filename, body in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += (
            f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + body + b"\r\n"
        )
    return out + f"--{BOUNDARY}--\r\n".encode()


class Trickle(io.RawIOBase):
    """A body that arrives a few bytes at a time, like a slow network."""

    def __init__(self, data: bytes, step: int = 5) -> None:
        self.data, self.step, self.pos = data, step, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self.data[self.pos : self.pos + min(self.step, size if size > 0 else self.step)]
        self.pos += len(chunk)
        return chunk


def read(
    data: bytes | io.RawIOBase, limit: int = 10**9
) -> tuple[dict[str, str], str | None, bytes]:
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    upload = read_upload(RequestBody(stream, limit), "multipart/form-data", BOUNDARY)  # type: ignore[arg-type]
    return upload.fields, upload.filename, b"".join(upload.chunks)


def test_fields_then_file() -> None:
    audio = bytes(range(256)) * 1000
    body = multipart(("user", None, b"u-1"), ("token", None, b"t-1"), ("file", "take.wav", audio))
    fields, filename, data = read(body)
    assert fields == {"user": "u-1", "token": "t-1"}
    assert filename == "take.wav"
    assert data == audio


def test_a_trickling_body_gives_the_same_bytes() -> None:
    audio = b"\r\n--" + b"x" * 5000 + b"\r\n-"  # boundary-like bytes inside the file
    body = multipart(("user", None, b"u"), ("file", "a.wav", audio))
    assert read(Trickle(body, step=3))[2] == audio


def test_fields_are_read_before_the_file_is_consumed() -> None:
    body = multipart(("user", None, b"u"), ("token", None, b"t"), ("file", "a.wav", b"x" * 100_000))
    stream = io.BytesIO(body)
    upload = read_upload(RequestBody(stream, 10**9), "multipart/form-data", BOUNDARY)
    assert upload.fields == {"user": "u", "token": "t"}
    assert stream.tell() < len(body)  # the file part is still unread


def test_a_field_after_the_file_is_a_422_naming_it() -> None:
    body = multipart(
        ("user", None, b"u-1"), ("file", "a.wav", b"abc"), ("bitrate_kbps", None, b"8")
    )
    stream = io.BytesIO(body)
    upload = read_upload(RequestBody(stream, 10**9), "multipart/form-data", BOUNDARY)
    assert next(upload.chunks) == b"abc"  # the file is handed on as it arrives
    with pytest.raises(FieldAfterFile) as caught:
        next(upload.chunks)
    problem = caught.value.to_problem()
    assert caught.value.status == 422 and problem["field"] == "bitrate_kbps"
    assert "before the file" in problem["detail"]


def test_missing_file_part() -> None:
    with pytest.raises(InvalidField, match="'file'"):
        read(multipart(("user", None, b"u")))


def test_limit_applies_to_chunked_bodies() -> None:
    body = multipart(("file", "a.wav", b"x" * 200_000))
    with pytest.raises(PayloadTooLarge):
        read(body, limit=100_000)


def test_oversized_field() -> None:
    with pytest.raises(InvalidField, match="too long"):
        read(multipart(("user", None, b"u" * 10_000), ("file", "a.wav", b"x")))


def test_garbage_is_a_bad_request() -> None:
    with pytest.raises(BadRequest):
        read(b"this is not multipart at all")


def test_a_preamble_without_boundary_is_bounded() -> None:
    with pytest.raises(BadRequest):
        read(b"x" * (3 * 1024 * 1024))


def test_other_media_types_are_415() -> None:
    with pytest.raises(UnsupportedMediaType):
        read_upload(RequestBody(io.BytesIO(b"{}"), 100), "application/json", None)


def test_raw_wav_body_is_passed_through() -> None:
    upload = read_upload(RequestBody(io.BytesIO(b"RIFF...."), 100), "audio/wav", None)
    assert upload.fields == {} and b"".join(upload.chunks) == b"RIFF...."


def test_a_broken_connection_is_a_disconnect() -> None:
    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            raise OSError("connection reset")

    with pytest.raises(ClientDisconnected):
        read(Broken())


def test_the_number_of_fields_is_bounded() -> None:
    parts = [(f"f{i}", None, b"") for i in range(1000)]
    with pytest.raises(InvalidField, match="more than 32 fields"):
        read(multipart(*parts, ("file", "a.wav", b"x")))


def json_request(body: bytes) -> flask.Request:
    return flask.Request(
        EnvironBuilder(method="POST", data=body, content_type="application/json").get_environ()
    )


def test_json_nested_deeper_than_the_limit_is_a_400_not_a_recursion_error() -> None:
    deep = b'{"name":' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(BadRequest, match=f"deeper than {MAX_JSON_DEPTH} levels"):
        read_fields(json_request(deep))
    at_limit = b'{"name":' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    assert read_fields(json_request(at_limit))["name"] is not None
    brackets_in_strings = b'{"name": "' + b"[{" * 100 + b'\\" ]"}'
    assert read_fields(json_request(brackets_in_strings))["name"].startswith("[{")
