"""The ASGI front of upload_record (common.platform.bridge), driven with fake ASGI messages."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import flask
import pytest
from common.domain.conversion import REQUEST_STOP
from common.errors import RequestTimeout
from common.http.request_body import FIELDS_REGION_BYTES
from common.http.responses import BODY_DRAINED_BY_SERVER, drain_body
from common.platform import bridge
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


def _receiver(chunks: list[bytes | float], received: list[int] | None = None) -> Callable[[], Any]:
    """An ASGI receive giving ``chunks`` (a float: a pause of that many seconds), adding each
    chunk's size to ``received`` when given."""
    pending = list(chunks)

    async def receive() -> Message:
        while pending and isinstance(pending[0], float):
            await asyncio.sleep(pending.pop(0))  # type: ignore[arg-type]
        if not pending:
            await asyncio.sleep(3600)  # a client that never sends again
        chunk = pending.pop(0)
        if received is not None:
            received.append(len(chunk))  # type: ignore[arg-type]
        more = any(isinstance(x, bytes) for x in pending)
        return {"type": "http.request", "body": chunk, "more_body": more}

    return receive


def _sender(sent: list[Message]) -> Callable[[Message], Any]:
    async def send(message: Message) -> None:
        sent.append(message)

    return send


def _run(
    app: Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]],
    chunks: list[bytes | float],
    scope: dict[str, Any] | None = None,
    pace: BodyPace = PACE,
    received: list[int] | None = None,
) -> tuple[list[Message], float]:
    """Serve one request whose body is ``chunks`` (a float: a pause of that many seconds);
    ``received`` gets the size of each chunk the server takes."""
    sent: list[Message] = []

    async def main() -> None:
        bridge = WsgiBridge(app, 2, pace)
        await bridge(scope or _scope(), _receiver(chunks, received), _sender(sent))

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


@pytest.mark.parametrize("sizes", [[3, 7, 1, 100], [64, -1], [None], [5, 5, 5, 5, 5, 5]])
def test_reads_of_any_size_give_the_body_in_order_and_no_more_than_asked(
    sizes: list[int | None],
) -> None:
    """wsgi.input.read(n) across the chunks the loop hands over (some larger than n)."""
    seen: list[bytes] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        stream = environ["wsgi.input"]
        for size in sizes:
            seen.append(stream.read(size))
        while chunk := stream.read(4):
            seen.append(chunk)
        start_response("200 OK", [])
        return []

    body = bytes(range(48))
    sent, _ = _run(app, [body[:20], body[20:21], body[21:], b""], _scope())
    assert _status_and_body(sent)[0] == 200
    assert b"".join(seen) == body
    for size, got in zip(sizes, seen, strict=False):
        assert size is None or size < 0 or len(got) <= size


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


def test_a_body_that_bursts_then_trickles_ends_at_the_absolute_deadline() -> None:
    """Bytes sent early buy no time past ``max_seconds``, whatever the pace would allow."""
    pace = BodyPace(grace_seconds=0.3, min_bytes_per_second=1024, max_seconds=1.0)
    assert pace.deadline(100.0, 0) == pytest.approx(100.3)
    assert pace.deadline(100.0, 1024 * 1024) == pytest.approx(101.0)
    raised: list[BaseException] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        try:
            while environ["wsgi.input"].read(64 * 1024):
                pass
        except RequestTimeout as exc:
            raised.append(exc)
        start_response("408 Request Timeout", [])
        return [b""]

    trickle: list[bytes | float] = [b"x" * 512 * 1024]
    for _ in range(40):
        trickle += [0.1, b"x"]
    sent, elapsed = _run(app, trickle, pace=pace)
    assert _status_and_body(sent)[0] == 408
    assert len(raised) == 1 and "within 1 seconds" in str(raised[0])
    assert 1.0 <= elapsed < 1.8


def test_the_requests_stop_wakes_a_read_blocked_on_a_silent_body() -> None:
    """A conversion's deadline (or a shutdown) ends the read at once, not at the next byte."""
    seen: list[object] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        stop = REQUEST_STOP.get()
        assert stop is not None
        threading.Timer(0.2, stop.set, (RequestTimeout("the conversion's deadline"),)).start()
        started = time.monotonic()
        try:
            environ["wsgi.input"].read()
        except RequestTimeout as exc:
            seen.append((str(exc), round(time.monotonic() - started, 1)))
        seen.append(getattr(environ["wsgi.input"], BODY_DRAINED_BY_SERVER))
        start_response("408 Request Timeout", [])
        return [b""]

    sent, elapsed = _run(app, [b"RIFF", b"x" * 1024 * 1024, 30.0, b"never"])
    assert _status_and_body(sent)[0] == 408
    assert seen == [("the conversion's deadline", 0.2), True]
    assert elapsed < 1.0  # not drained either: the body is given up on


def test_uploads_hold_at_most_threads_and_the_reserve_serves_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the one upload thread taken, a GET is answered at once; a second upload waits
    for a thread, then is told 503 with Retry-After."""
    monkeypatch.setattr(bridge, "SLOT_WAIT_SECONDS", 0.3)
    answered: dict[str, tuple[int, float]] = {}

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        environ["wsgi.input"].read()
        start_response("200 OK", [])
        return [b""]

    async def request(name: str, scope: dict[str, Any], chunks: list[bytes | float]) -> None:
        sent: list[Message] = []
        start = time.monotonic()
        await shared(scope, _receiver(chunks), _sender(sent))
        answered[name] = (sent[0]["status"], time.monotonic() - start)
        if name == "second upload":
            answered["retry-after"] = (
                int(dict(sent[0]["headers"])[b"retry-after"]),
                0.0,
            )

    shared = WsgiBridge(app, 1, BodyPace(grace_seconds=5.0, min_bytes_per_second=1))
    slow_body: list[bytes | float] = [b"RIFF", 0.2, b"x" * 65536, 0.2, b"x" * 65536, 0.2, b"x"]

    async def main() -> None:
        first = asyncio.create_task(request("upload", _scope(), slow_body))
        await asyncio.sleep(0.05)
        await asyncio.gather(
            request("get", _scope(method="GET", headers=[]), [b""]),
            request("second upload", _scope(), [b"RIFF", 0.1, b"x"]),
        )
        await first

    asyncio.run(main())
    assert answered["get"][0] == 200 and answered["get"][1] < 0.15
    assert answered["second upload"][0] == 503 and 0.3 <= answered["second upload"][1] < 0.6
    assert answered["retry-after"][0] == bridge.BUSY_RETRY_AFTER_SECONDS
    assert answered["upload"][0] == 200


def test_the_app_drains_nothing_itself_behind_the_bridge_and_survives_a_stalled_body() -> None:
    """drain_body leaves the body to the server that set the flag; elsewhere a 408 from the
    stream ends its drain quietly."""
    reads: list[int] = []

    class Stalled:
        def __init__(self, drained_by_server: bool) -> None:
            setattr(self, BODY_DRAINED_BY_SERVER, drained_by_server)

        def read(self, size: int = -1) -> bytes:
            reads.append(size)
            raise RequestTimeout("stalled")

    def request(stream: Stalled) -> flask.Request:
        return flask.Request(
            {
                "REQUEST_METHOD": "POST",
                "CONTENT_LENGTH": "1000",
                "wsgi.input": stream,
                "wsgi.input_terminated": True,
            }
        )

    drain_body(request(Stalled(drained_by_server=True)))
    assert reads == []
    drain_body(request(Stalled(drained_by_server=False)))
    assert reads  # tried, and the RequestTimeout did not escape


def test_nothing_past_the_prefix_is_received_before_the_app_reads_it() -> None:
    """The credentials are checked before more of the body is taken from the client."""
    received: list[int] = []
    seen: list[int] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        time.sleep(0.2)  # time for the loop to read ahead, were it to do so unasked
        seen.append(len(received))
        start_response("401 Unauthorized", [])
        return [b""]

    sent, _ = _run(app, [b"RIFF" * 1024, *[b"x" * 65536] * 32], received=received)
    assert _status_and_body(sent)[0] == 401
    assert seen == [1]  # a raw WAV body's prefix is its first chunk
    assert len(received) == 33  # the rest drained after the answer


def test_the_body_is_read_ahead_of_the_app_by_a_bounded_amount() -> None:
    """Once the app reads, the loop receives ahead of it: at most READ_AHEAD_BYTES waiting (and
    the chunk that crossed the line), at least half of it while the app is slow; the app still
    gets every byte in order."""
    chunk = 256 * 1024
    chunks = [bytes([n]) * chunk for n in range(48)]  # 12 MiB
    received: list[int] = []
    ahead: list[int] = []
    got = bytearray()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        stream = environ["wsgi.input"]
        while len(got) <= chunk:  # past the prefix (the first chunk): reading ahead starts
            got.extend(stream.read(65536))
        time.sleep(0.3)  # a slow consumer: the loop fills the read-ahead, then waits
        ahead.append(sum(received) - len(got))
        while piece := stream.read(65536):
            got.extend(piece)
        start_response("200 OK", [])
        return [b""]

    sent, _ = _run(app, [*chunks], received=received)
    assert _status_and_body(sent)[0] == 200
    assert bytes(got) == b"".join(chunks)
    (waiting,) = ahead
    assert bridge.READ_AHEAD_BYTES // 2 <= waiting <= bridge.READ_AHEAD_BYTES + 2 * chunk
