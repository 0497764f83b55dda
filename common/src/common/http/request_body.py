"""Reading an upload request body as a stream, never spooling it.

Two shapes (docs/api.md, ``POST /records``): ``multipart/form-data`` with small text fields
before a ``file`` part, whose audio is handed on as an iterator of chunks so that the caller
authenticates before a byte of it is read; or a raw ``audio/wav`` body, the user in the query
and the token in a Bearer header. werkzeug's own form parser would spool the file to a
temporary file (memory on Cloud Run), so its sans-IO decoder is used directly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import parse_qsl

from werkzeug.exceptions import ClientDisconnected as WerkzeugDisconnected
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData
from werkzeug.wrappers import Request

from common.domain.encoding import OPTION_FIELDS, TAG_FIELDS, InvalidOption
from common.errors import (
    BadRequest,
    ClientDisconnected,
    FieldAfterFile,
    InvalidField,
    PayloadTooLarge,
    UnsupportedMediaType,
)

READ_SIZE = 64 * 1024
# The form field that carries the WAV: in POST /records and in the presigned POST to the bucket.
FILE_FIELD = "file"
MAX_FIELD_BYTES = 4096
MAX_FIELDS_TOTAL = 64 * 1024
MAX_FIELDS = 32
# The form's fields, part headers included, must end within this many bytes of the body: the
# server reads them without holding a thread (common.platform.bridge), then the credentials
# are checked before more is read.
FIELDS_REGION_BYTES = 128 * 1024
# The decoder's buffer: bounds a preamble or part headers that never end.
MAX_DECODER_BUFFER = 1024 * 1024
# JSON bodies are flat objects; a deeper one is refused before the (recursive) parser sees it.
MAX_JSON_DEPTH = 32
_JSON_NESTING = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')
WAV_MEDIA_TYPES = frozenset({"audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"})


@dataclass(slots=True)
class Upload:
    fields: dict[str, str]
    filename: str | None
    chunks: Iterator[bytes] = field(repr=False)


class RequestBody:
    """The request body as chunks, with a hard byte limit and disconnects made explicit."""

    def __init__(self, stream: IO[bytes], max_bytes: int) -> None:
        self.stream = stream
        self.max_bytes = max_bytes
        self.received = 0

    def chunks(self) -> Iterator[bytes]:
        while True:
            try:
                chunk = self.stream.read(READ_SIZE)
            except (WerkzeugDisconnected, OSError) as exc:
                raise ClientDisconnected("The request body ended before it was complete.") from exc
            if not chunk:
                return
            self.received += len(chunk)
            if self.received > self.max_bytes:
                raise upload_too_large(self.max_bytes)
            yield chunk


def read_upload(body: RequestBody, mimetype: str, boundary: str | None) -> Upload:
    if mimetype == "multipart/form-data":
        if not boundary:
            raise BadRequest("The multipart/form-data body has no boundary parameter.")
        return _read_multipart(body, boundary)
    if mimetype in WAV_MEDIA_TYPES:
        return Upload(fields={}, filename=None, chunks=body.chunks())
    raise UnsupportedMediaType(
        "Send the WAV as multipart/form-data (fields 'user', 'token' and 'file') "
        "or as a raw audio/wav body."
    )


class FieldsRegion:
    """Where the part of a body read before the credentials are checked ends.

    A raw WAV body's credentials are in its headers: nothing of it is needed. A form's fields
    end where its ``file`` part starts (its part headers read), at the end of the body, or at
    :data:`FIELDS_REGION_BYTES`, whichever comes first. :meth:`feed` takes the body's chunks in
    order and answers whether the region is complete; the form is decoded only to find that
    place, and what the app later reads of it is decoded again by :func:`read_upload`.
    """

    def __init__(self, content_type: str | None) -> None:
        mimetype, options = parse_options_header(content_type)
        boundary = options.get("boundary")
        self.received = 0
        self.decoder = (
            MultipartDecoder(boundary.encode("latin-1"), max_form_memory_size=MAX_DECODER_BUFFER)
            if mimetype == "multipart/form-data" and boundary
            else None
        )

    def feed(self, chunk: bytes) -> bool:
        self.received += len(chunk)
        if self.decoder is None or self.received >= FIELDS_REGION_BYTES or not chunk:
            return True
        try:
            self.decoder.receive_data(chunk)
            while not isinstance(event := self.decoder.next_event(), NeedData):
                if isinstance(event, Epilogue) or (
                    isinstance(event, Field | File) and event.name == FILE_FIELD
                ):
                    return True
        except (RequestEntityTooLarge, ValueError, UnicodeError):
            return True  # malformed: the app reads it again and says why
        return False


class _Events:
    """Pulls decoder events, feeding it body chunks as it asks for them."""

    def __init__(self, source: Iterator[bytes], boundary: str) -> None:
        self.source = source
        self.decoder = MultipartDecoder(
            boundary.encode("latin-1"), max_form_memory_size=MAX_DECODER_BUFFER
        )

    def next(self) -> Field | File | Data | Epilogue:
        try:
            while True:
                event = self.decoder.next_event()
                if isinstance(event, NeedData):
                    self.decoder.receive_data(next(self.source, None))
                    continue
                if isinstance(event, Field | File | Data | Epilogue):
                    return event
        except RequestEntityTooLarge as exc:
            raise BadRequest("The multipart body is malformed (a part header never ends).") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"The multipart body is malformed: {exc}.") from exc


def _read_multipart(body: RequestBody, boundary: str) -> Upload:
    events = _Events(body.chunks(), boundary)
    fields: dict[str, str] = {}
    total = 0
    while True:
        event = events.next()
        if body.received > FIELDS_REGION_BYTES and not (
            isinstance(event, File | Field) and event.name == FILE_FIELD
        ):
            raise InvalidField(
                f"The form's 'file' part must start within the first {FIELDS_REGION_BYTES} "
                "bytes of the body."
            )
        if isinstance(event, Epilogue):
            raise InvalidField("The form has no 'file' part holding the WAV file.")
        if not isinstance(event, Field | File):
            continue
        if event.name == FILE_FIELD:
            filename = event.filename if isinstance(event, File) else None
            return Upload(fields=fields, filename=filename, chunks=_file_chunks(events))
        if len(fields) >= MAX_FIELDS:
            raise InvalidField(f"The form has more than {MAX_FIELDS} fields before 'file'.")
        value = bytearray()
        while True:
            data = events.next()
            if not isinstance(data, Data):
                raise BadRequest("The multipart body is malformed.")
            value += data.data
            total += len(data.data)
            if len(value) > MAX_FIELD_BYTES or total > MAX_FIELDS_TOTAL:
                raise InvalidField(f"Form field '{event.name}' is too long.")
            if not data.more_data:
                break
        try:
            fields[event.name] = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidField(f"Form field '{event.name}' is not valid UTF-8.") from exc


def _file_chunks(events: _Events) -> Iterator[bytes]:
    """The file part's bytes, then the end of the body: any part after the file is a 422."""
    while True:
        event = events.next()
        if not isinstance(event, Data):
            raise BadRequest("The multipart body is malformed.")
        if event.data:
            yield event.data
        if not event.more_data:
            break
    while not isinstance(event := events.next(), Epilogue):
        if isinstance(event, Field | File):
            raise FieldAfterFile(event.name)


def upload_too_large(limit: int) -> PayloadTooLarge:
    """The 413 of an upload body over the limit: it names the way for larger WAVs."""
    return PayloadTooLarge(
        f"The upload is larger than the limit of {limit} bytes. Send larger WAVs as a direct "
        "upload: POST /records/uploads (docs/direct-uploads.md)."
    )


def check_content_length(request: Request, limit: int) -> None:
    """Refuse a declared body over ``limit`` before reading any of it."""
    if request.content_length is not None and request.content_length > limit:
        raise upload_too_large(limit)


def read_fields(request: Request, max_bytes: int = 64 * 1024) -> dict[str, Any]:
    """A small JSON object or urlencoded form body as a dict (create_user's input)."""
    too_large = PayloadTooLarge(f"The request body is larger than {max_bytes} bytes.")
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large
    mimetype = request.mimetype
    raw = request.stream.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise too_large
    if mimetype == "application/x-www-form-urlencoded":
        try:
            return dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True))
        except UnicodeDecodeError as exc:
            raise BadRequest("The form body is not valid UTF-8.") from exc
    if mimetype not in ("application/json", "") and not mimetype.endswith("+json"):
        raise UnsupportedMediaType('Send a JSON body such as {"name": "Alice"}.')
    if _too_deep(raw):
        raise BadRequest(f"The JSON body is nested deeper than {MAX_JSON_DEPTH} levels.")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest("The request body is not valid JSON.") from exc
    if not isinstance(body, dict):
        raise InvalidField('The request body must be a JSON object such as {"name": "Alice"}.')
    return body


def _too_deep(raw: bytes) -> bool:
    """Whether arrays and objects nest deeper than MAX_JSON_DEPTH (strings skipped)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return False
    depth = 0
    for token in _JSON_NESTING.finditer(raw):
        mark = token.group()
        if mark in (b"[", b"{"):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        elif mark in (b"]", b"}"):
            depth -= 1
    return False


def encoding_fields(query: Mapping[str, str], form: Mapping[str, str]) -> dict[str, str]:
    """The encoding options and tags of an upload, from its query and its form fields.

    Either place will do; the same name in both with two values is a 422 naming it, rather
    than one of them silently ignored.
    """
    chosen: dict[str, str] = {}
    for name in (*OPTION_FIELDS, *TAG_FIELDS):
        values = {v for v in (query.get(name), form.get(name)) if v not in (None, "")}
        if len(values) > 1:
            raise InvalidOption(
                name, f"'{name}' is given twice, in the query and in the form, with two values."
            )
        if values:
            chosen[name] = values.pop()
    return chosen
