"""An ASGI front for a WSGI app: no slow client holds one of its threads while it waits.

granian serves this (``Interfaces.ASGINL``) for upload_record. A form's fields (up to where its
``file`` part starts: :class:`~common.http.request_body.FieldsRegion`) are read on the event
loop, without a thread; only then does the WSGI app run, in a pool of ``threads``. For a raw
body it runs at the first chunk: the credentials are in the headers, and the app checks them
(and claims the idempotency key) before the audio arrives. Every later read waits on a timer,
not on the next chunk: the body must keep a minimum rate (:class:`BodyPace`), else the read
raises RequestTimeout (408), and a client too slow for the fields is answered 408 by this front
itself. What a refused request leaves of its body is drained on the loop after the answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from common.errors import PROBLEM_CONTENT_TYPE, InternalError, RequestTimeout, ServiceError
from common.http.request_body import FieldsRegion

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
# After an answer, what is left of the body is read and dropped for at most this long.
DRAIN_SECONDS = 5.0
# A client that takes none of the answer for this long is dropped (nginx's send_timeout).
SEND_STALL_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class BodyPace:
    """The slowest body accepted: ``grace_seconds``, then ``min_bytes_per_second`` on average.

    Having received ``n`` bytes, a request waits for more until
    ``start + grace_seconds + n / min_bytes_per_second``; a client that falls below the rate is
    cut off then, in whatever phase it is (fields, WAV header, audio).
    """

    grace_seconds: float
    min_bytes_per_second: int

    def deadline(self, start: float, received: int) -> float:
        return start + self.grace_seconds + received / self.min_bytes_per_second


class _Body:
    """The request body as the loop receives it, with the pace's deadline on every wait."""

    def __init__(self, receive: Receive, pace: BodyPace) -> None:
        self.receive = receive
        self.pace = pace
        self.start = time.monotonic()
        self.received = 0
        self.done = False
        self.timed_out = False

    async def next(self) -> bytes:
        """The next chunk (b"" at the end or on a disconnect); RequestTimeout past the pace."""
        if self.done:
            return b""
        remaining = self.pace.deadline(self.start, self.received) - time.monotonic()
        try:
            message = await asyncio.wait_for(self.receive(), max(0.0, remaining))
        except TimeoutError:
            self.timed_out = True
            self.done = True
            raise RequestTimeout(
                f"The request body arrived slower than {self.pace.min_bytes_per_second} bytes "
                f"per second after {self.pace.grace_seconds:g} seconds."
            ) from None
        if message["type"] != "http.request":  # http.disconnect
            self.done = True
            return b""
        chunk: bytes = message.get("body", b"")
        self.received += len(chunk)
        if not message.get("more_body", False):
            self.done = True
        return chunk

    async def prefix(self, region: FieldsRegion) -> bytes:
        """The chunks up to the end of ``region`` (the whole body when it is shorter)."""
        parts = []
        while not self.done:
            chunk = await self.next()
            parts.append(chunk)
            if region.feed(chunk):
                break
        return b"".join(parts)

    async def drain(self) -> None:
        if self.done or self.timed_out:
            return
        end = time.monotonic() + DRAIN_SECONDS
        try:
            while not self.done and time.monotonic() < end:
                message = await asyncio.wait_for(self.receive(), end - time.monotonic())
                if message["type"] != "http.request" or not message.get("more_body", False):
                    self.done = True
        except TimeoutError:
            log.debug("request body not drained in %s s", DRAIN_SECONDS)


class _Input:
    """``wsgi.input``: the prefix, then chunks fetched from the loop (blocking this thread)."""

    def __init__(self, body: _Body, prefix: bytes, loop: asyncio.AbstractEventLoop) -> None:
        self.body = body
        self.buffer = prefix
        self.loop = loop

    def read(self, size: int | None = -1) -> bytes:
        if not self.buffer:
            self.buffer = asyncio.run_coroutine_threadsafe(self.body.next(), self.loop).result()
        if size is None or size < 0:
            parts = [self.buffer]
            while chunk := asyncio.run_coroutine_threadsafe(self.body.next(), self.loop).result():
                parts.append(chunk)
            self.buffer = b""
            return b"".join(parts)
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def readline(self, size: int | None = -1) -> bytes:  # WSGI requires it; nothing here uses it
        return self.read(size)

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(64 * 1024):
            yield chunk


class WsgiBridge:
    """The ASGI app (no lifespan) granian calls for each request."""

    def __init__(
        self, app: WsgiApp, threads: int, pace: BodyPace, stall_seconds: float = SEND_STALL_SECONDS
    ) -> None:
        self.app = app
        self.pace = pace
        self.stall_seconds = stall_seconds
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wsgi")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = _Body(receive, self.pace)
        try:
            prefix = await body.prefix(FieldsRegion(_header(scope, b"content-type")))
        except RequestTimeout as exc:
            log.info(exc.detail, extra={"status": exc.status, "path": scope.get("path")})
            await _send_problem(send, exc, scope.get("path"))
            return
        loop = asyncio.get_running_loop()
        environ = wsgi_environ(scope, _Input(body, prefix, loop))
        started: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            started[:] = [int(status.split(" ", 1)[0]), headers]
            return _no_write

        def call() -> tuple[Iterable[bytes], Iterator[bytes], bytes | None]:
            answer = self.app(environ, start_response)
            chunks = iter(answer)
            return answer, chunks, next(chunks, None)

        try:
            answer, result, first = await loop.run_in_executor(self.pool, call)
        except Exception:  # the app's own handler answers every error: this is a bug
            log.exception("the WSGI app raised", extra={"path": scope.get("path")})
            await _send_problem(send, InternalError(), scope.get("path"))
            await body.drain()
            return
        try:
            status, headers = started
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
                }
            )
            chunk = first
            while chunk is not None:
                nxt = await loop.run_in_executor(self.pool, next, result, None)
                message = {
                    "type": "http.response.body",
                    "body": chunk,
                    "more_body": nxt is not None,
                }
                try:
                    await asyncio.wait_for(send(message), self.stall_seconds)
                except TimeoutError:
                    log.info("client stopped reading", extra={"path": scope.get("path")})
                    return  # the finally closes the answer; the server drops the connection
                chunk = nxt
            if first is None:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            close = getattr(answer, "close", None)
            if close is not None:
                await loop.run_in_executor(self.pool, close)
        await body.drain()


def _header(scope: Scope, name: bytes) -> str | None:
    for raw_name, raw_value in scope["headers"]:
        if raw_name.lower() == name:
            return str(raw_value.decode("latin-1"))
    return None


def _no_write(data: bytes) -> None:
    raise NotImplementedError("write() is not supported; return an iterable")


async def _send_problem(send: Send, error: ServiceError, path: str | None) -> None:
    payload = json.dumps(error.to_problem(path)).encode()
    headers = [(b"content-type", PROBLEM_CONTENT_TYPE.encode()),
               (b"content-length", str(len(payload)).encode())]  # fmt: skip
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


def wsgi_environ(scope: Scope, wsgi_input: _Input) -> dict[str, Any]:
    """PEP 3333's environ for an ASGI HTTP scope (as granian's own WSGI server builds it)."""
    raw_path = scope.get("raw_path") or scope["path"].encode("utf-8")
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client") or ("", 0)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote_to_bytes(raw_path.split(b"?", 1)[0]).decode("latin-1"),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "REMOTE_ADDR": str(client[0]),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": wsgi_input,
        "wsgi.input_terminated": True,  # it ends where the body ends (chunked bodies too)
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").upper().replace("-", "_")
        value = raw_value.decode("latin-1")
        if name in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            environ[name] = value
            continue
        key = f"HTTP_{name}"
        if key in environ:
            value = f"{environ[key]}{';' if name == 'COOKIE' else ','}{value}"
        environ[key] = value
    return environ
