"""The ASGI front of upload_record (common.platform.bridge), driven with fake ASGI messages."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from common.errors import RequestTimeout
from common.http.request_body import FIELDS_REGION_BYTES
from common.platform.bridge import BodyPace, Message, WsgiBridge

PACE = BodyPace(grace_seconds=0.3, min_bytes_per_second=1024 * 1024)


def _scope(**extra: Any) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/records",
        "raw_path": b"/records",
        "query_string": b"user=u1",
        "headers": [
            (b"content-type", b"audio/wav"),
            (b"content-length", b"10"),
            (b"x-a", b"1"),
            (b"x-a", b"2"),
        ],
        "server": ("127.0.0.1", 8080),
        "client": ("127.0.0.1", 5000),
        "scheme": "http",
        "http_version": "1.1",
    }
    scope.update(extra)
    return scope


FORM = _scope(headers=[(b"content-type", b"multipart/form-data; boundary=b")])
FIELDS = b'--b\r\nContent-Disposition: form-data; name="user"\r\n\r\nu1\r\n'
FILE_HEADERS = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'


def _run(
    app: Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]],
    chunks: list[bytes | float],
    scope: dict[str, Any] | None = None,
) -> tuple[list[Message], float]:
    """Serve one request whose body is ``chunks`` (a float: a pause of that many seconds)."""
    sent: list[Message] = []
    pending = list(chunks)

    async def receive() -> Message:
        while pending and isinstance(pending[0], float):
            await asyncio.sleep(pending.pop(0))  # type: ignore[arg-type]
        if not pending:
            await asyncio.sleep(3600)  # a client that never sends again
        chunk = pending.pop(0)
        more = any(isinstance(x, bytes) for x in pending)
        return {"type": "http.request", "body": chunk, "more_body": more}

    async def send(message: Message) -> None:
        sent.append(message)

    async def main() -> None:
        await WsgiBridge(app, 2, PACE)(scope or _scope(), receive, send)

    start = time.monotonic()
    asyncio.run(main())
    return sent, time.monotonic() - start


def _status_and_body(sent: list[Message]) -> tuple[int, bytes]:
    assert sent[0]["type"] == "http.response.start"
    body = b"".join(m["body"] for m in sent[1:])
    assert sent[-1]["more_body"] is False
    return sent[0]["status"], body


def test_the_app_sees_the_request_as_a_wsgi_server_would_give_it() -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        seen.update(environ)
        seen["body"] = environ["wsgi.input"].read(100) + environ["wsgi.input"].read(100)
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"made"]

    sent, _ = _run(app, [b"12345", b"67890"])
    assert _status_and_body(sent) == (201, b"made")
    assert sent[0]["headers"] == [(b"Content-Type", b"text/plain")]
    assert seen["body"] == b"1234567890"
    assert seen["PATH_INFO"] == "/records" and seen["QUERY_STRING"] == "user=u1"
    assert seen["CONTENT_TYPE"] == "audio/wav" and seen["CONTENT_LENGTH"] == "10"
    assert seen["HTTP_X_A"] == "1,2" and seen["REQUEST_METHOD"] == "POST"


def test_a_client_too_slow_for_its_fields_is_answered_408_without_the_app() -> None:
    called = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        called.append(True)
        return []

    sent, elapsed = _run(app, [b"--b\r\n", 0.1, b"C", 0.1, b"o", 10.0, b"late"], FORM)
    status, body = _status_and_body(sent)
    assert status == 408 and not called
    assert json.loads(body)["status"] == 408
    assert (b"content-type", b"application/problem+json") in sent[0]["headers"]
    assert PACE.grace_seconds <= elapsed < PACE.grace_seconds + 1.5


def _arrivals() -> tuple[list[float], Callable[..., Any]]:
    """An app that notes when it starts (seconds after the request) and reads the whole body."""
    started: list[float] = []
    origin = time.monotonic()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        started.append(time.monotonic() - origin)
        environ["wsgi.input"].read()
        start_response("201 Created", [])
        return [b""]

    return started, app


def test_a_raw_bodys_app_starts_at_its_first_chunk() -> None:
    """The credentials (headers) are checked while the audio still arrives."""
    started, app = _arrivals()
    sent, elapsed = _run(app, [b"RIFF", 0.25, b"x" * 1024])
    assert _status_and_body(sent)[0] == 201
    assert started[0] < 0.2 <= elapsed


def test_a_forms_app_starts_where_its_file_part_starts() -> None:
    """Not when FIELDS_REGION_BYTES have come: the fields are known once the file part begins."""
    started, app = _arrivals()
    chunks: list[bytes | float] = [FIELDS, 0.1, FILE_HEADERS + b"RIFF", 0.15, b"x\r\n--b--\r\n"]
    sent, elapsed = _run(app, chunks, FORM)
    assert _status_and_body(sent)[0] == 201
    assert 0.1 <= started[0] < 0.25 <= elapsed


def test_a_forms_app_starts_at_the_region_limit_without_a_file_part() -> None:
    started, app = _arrivals()
    field = b'--b\r\nContent-Disposition: form-data; name="pad"\r\n\r\n'
    sent, elapsed = _run(app, [field + b"p" * FIELDS_REGION_BYTES, 0.25, b"\r\n--b--\r\n"], FORM)
    assert _status_and_body(sent)[0] == 201
    assert started[0] < 0.2 <= elapsed


def test_a_stall_after_the_fields_ends_the_apps_read_at_the_deadline() -> None:
    """The app's read gives up on a timer, not when the next chunk comes."""
    raised: list[BaseException] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        stream = environ["wsgi.input"]
        try:
            while stream.read(64 * 1024):
                pass
        except RequestTimeout as exc:
            raised.append(exc)
        start_response("408 Request Timeout", [])
        return [b""]

    prefix = b"x" * FIELDS_REGION_BYTES
    sent, elapsed = _run(app, [prefix, b"more", 30.0, b"never"])
    assert _status_and_body(sent)[0] == 408
    assert len(raised) == 1
    assert elapsed < PACE.grace_seconds + 2.0


def test_a_streamed_answer_is_sent_chunk_by_chunk_and_closed() -> None:
    closed = []

    class Answer:
        def __iter__(self) -> Any:
            return iter([b"a", b"b", b"c"])

        def close(self) -> None:
            closed.append(True)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Answer:
        start_response("200 OK", [("Content-Length", "3")])
        return Answer()

    sent, _ = _run(app, [b""], _scope(method="GET", headers=[]))
    assert [m.get("body") for m in sent[1:]] == [b"a", b"b", b"c"]
    assert closed == [True]


@pytest.mark.parametrize("received", [0, 1024 * 1024])
def test_the_pace_extends_the_deadline_by_the_bytes_received(received: int) -> None:
    assert PACE.deadline(100.0, received) == pytest.approx(100.3 + received / (1024 * 1024))


def test_a_client_that_stops_reading_is_dropped_and_the_answer_closed() -> None:
    """A streamed download holds no thread while the client is slow, and ends when it stalls."""
    closed = []

    class Answer:
        def __iter__(self) -> Any:
            return iter([b"a"] * 100)

        def close(self) -> None:
            closed.append(True)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Answer:
        start_response("200 OK", [])
        return Answer()

    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if len(sent) >= 3:
            await asyncio.sleep(3600)  # the client's window is full and stays full
        sent.append(message)

    async def main() -> None:
        bridge = WsgiBridge(app, 1, PACE, stall_seconds=0.3)
        await bridge(_scope(method="GET", headers=[]), receive, send)

    start = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - start < 2.0
    assert len(sent) == 3 and closed == [True]
