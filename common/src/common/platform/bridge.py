"""An ASGI front for a WSGI app: no slow client holds one of its threads while it waits.

granian serves this for upload_record. A form's fields are read on the event loop, and only
then does the WSGI app run, in a pool of ``threads``, so it checks the credentials (and claims
the idempotency key) before the audio arrives; from its first read on, the loop receives the
body ahead of it (:class:`_ReadAhead`). Every receive waits on a timer: a body must keep a
minimum rate and end by a deadline (:class:`BodyPace`), else 408. :data:`RESERVED_THREADS`
more threads serve requests not receiving a body; what a refused request leaves of its body is
drained on the loop. docs/security.md, "Limits" and "Early refusals", has the figures.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from common.domain.conversion import REQUEST_STOP, Stop
from common.errors import PROBLEM_CONTENT_TYPE, InternalError, RequestTimeout, ServiceError
from common.http.request_body import FieldsRegion
from common.http.responses import problem_headers

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
# Threads beyond ``threads`` for requests whose body has all arrived with its fields (status,
# completion, deletion, health): uploads that hold every upload thread never starve them.
RESERVED_THREADS = 2
# A request still sending its body waits this long for one of the ``threads``, then 503.
SLOT_WAIT_SECONDS = 10.0
BUSY_RETRY_AFTER_SECONDS = 5
# The loop reads a body this far ahead of the thread that consumes it: the thread mostly finds
# its next chunk waiting, instead of handing every read to the loop and waiting for it (each
# hand-off waits for the GIL, behind whatever the other uploads' threads are doing). Once full,
# the loop reads on when the thread has taken it down to half: one wake-up per few chunks.
READ_AHEAD_BYTES = 1024 * 1024


class Busy(ServiceError):
    """Every thread for uploads is taken (slow or many uploads): retry later."""

    status = 503
    slug = "busy"
    title = "Service Unavailable"

    def __init__(self) -> None:
        super().__init__(
            "Every upload slot of this server is taken; retry in a few seconds.",
            retry_after=BUSY_RETRY_AFTER_SECONDS,
        )


@dataclass(frozen=True, slots=True)
class BodyPace:
    """The slowest body accepted: ``grace_seconds``, then ``min_bytes_per_second`` on average,
    and all of it within ``max_seconds``.

    Having received ``n`` bytes, a request waits for more until
    ``start + grace_seconds + n / min_bytes_per_second``, and never past
    ``start + max_seconds``; a client that falls below the rate, or bursts then trickles, is
    cut off then, in whatever phase it is (fields, WAV header, audio).
    """

    grace_seconds: float
    min_bytes_per_second: int
    max_seconds: float = float("inf")

    def deadline(self, start: float, received: int) -> float:
        paced = start + self.grace_seconds + received / self.min_bytes_per_second
        return min(paced, start + self.max_seconds)

    def describe(self) -> str:
        """The 408's detail."""
        slow = (
            f"The request body arrived slower than {self.min_bytes_per_second} bytes per "
            f"second after {self.grace_seconds:g} seconds"
        )
        if self.max_seconds == float("inf"):
            return f"{slow}."
        return f"{slow}, or not all within {self.max_seconds:g} seconds."


class _Body:
    """The request body as the loop receives it, with the pace's deadline on every wait."""

    def __init__(self, receive: Receive, pace: BodyPace) -> None:
        self.receive = receive
        self.pace = pace
        self.start = time.monotonic()
        self.received = 0
        self.done = False
        self.timed_out = False

    def restart(self) -> None:
        """The pace counts from now (the request waited for a thread, its body unread)."""
        self.start = time.monotonic()

    async def next(self) -> bytes:
        """The next chunk (b"" at the end or on a disconnect); RequestTimeout past the pace."""
        if self.done:
            return b""
        remaining = self.pace.deadline(self.start, self.received) - time.monotonic()
        try:
            # A timer on this task, not wait_for's task around each receive.
            async with asyncio.timeout(max(0.0, remaining)):
                message = await self.receive()
        except TimeoutError:
            self.timed_out = True
            self.done = True
            raise RequestTimeout(self.pace.describe()) from None
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


class _ReadAhead:
    """The body after the prefix, received on the loop ahead of the thread that reads it.

    The app's first read past the prefix (after its credentials check) starts :meth:`run`, a
    task on the loop that receives chunks until :data:`READ_AHEAD_BYTES` wait unread;
    :meth:`take` (the app's thread) gives them in order, blocking only when none has arrived
    yet: until one does, the pace's deadline passes (RequestTimeout) or the request's ``stop``
    is set.
    """

    def __init__(self, body: _Body, loop: asyncio.AbstractEventLoop, stop: Stop) -> None:
        self.body = body
        self.loop = loop
        self.stop = stop
        self.chunks: deque[bytes] = deque()
        self.waiting = 0  # bytes received and not yet taken
        self.ended = body.done
        self.error: RequestTimeout | None = None
        self.given_up = False  # stopped while waiting for the body: not drained either
        self.arrived = threading.Condition()
        self.room = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.started = self.closed = False
        self.paused = False  # the loop waits for the thread to take the read-ahead to half
        stop.on_set(self._wake)

    def _start(self) -> None:  # on the loop
        if not self.closed:
            self.task = self.loop.create_task(self.run())

    async def run(self) -> None:
        error = None
        try:
            while not self.body.done:
                if self.waiting >= READ_AHEAD_BYTES:
                    self.room.clear()  # set by take(), through the loop, at half
                    self.paused = True
                    while self.waiting >= READ_AHEAD_BYTES // 2:
                        await self.room.wait()
                        self.room.clear()
                    self.paused = False
                chunk = await self.body.next()
                with self.arrived:
                    if chunk:
                        self.chunks.append(chunk)
                        self.waiting += len(chunk)
                    self.arrived.notify()
        except RequestTimeout as exc:
            error = exc
        finally:
            with self.arrived:
                self.ended = True
                self.error = error
                self.arrived.notify_all()

    def take(self) -> bytes:
        """The next chunk, b"" at the end (or a disconnect)."""
        if not self.started:
            self.started = True
            if not self.ended:
                self.loop.call_soon_threadsafe(self._start)
        with self.arrived:
            while not self.chunks and not self.ended and self.stop.error is None:
                self.arrived.wait()
            if self.stop.error is not None:
                self.given_up = not self.chunks and not self.ended
                raise self.stop.error
            if self.chunks:
                chunk = self.chunks.popleft()
                low = READ_AHEAD_BYTES // 2
                before, self.waiting = self.waiting, self.waiting - len(chunk)
                if self.paused and before >= low > self.waiting:
                    self.loop.call_soon_threadsafe(self.room.set)
                return chunk
            if self.error is not None:
                raise self.error
            return b""

    async def close(self) -> None:
        """Stop reading ahead; what is left is for the caller to drain (or not)."""
        self.closed = True
        if self.task is not None:
            self.task.cancel()
            await asyncio.wait([self.task])
        if self.given_up:
            self.body.done = self.body.timed_out = True

    def _wake(self) -> None:
        with self.arrived:
            self.arrived.notify_all()


class _Input:
    """``wsgi.input``: the prefix, then the chunks the loop has read ahead (:class:`_ReadAhead`)."""

    drained_by_server = True  # what the app leaves of the body is drained on the loop

    def __init__(self, prefix: bytes, ahead: _ReadAhead) -> None:
        self.buffer = prefix
        self.offset = 0  # where the unread part of ``buffer`` starts
        self.ahead = ahead

    def read(self, size: int | None = -1) -> bytes:
        if self.offset >= len(self.buffer):
            self.buffer, self.offset = self.ahead.take(), 0
        start = self.offset
        if size is None or size < 0:
            parts = [self.buffer[start:]]
            while chunk := self.ahead.take():
                parts.append(chunk)
            self.buffer, self.offset = b"", 0
            return b"".join(parts)
        # granian hands over chunks of up to 408 KiB; the app reads 64 KiB at a time. Only what
        # is read is copied: slicing off the rest each time copied a chunk several times over,
        # into fresh pages (a tenth of a second of CPU per 100 MiB).
        end = min(start + size, len(self.buffer))
        self.offset = end
        if start == 0 and end == len(self.buffer):
            return self.buffer
        return self.buffer[start:end]

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
        self.pool = ThreadPoolExecutor(
            max_workers=threads + RESERVED_THREADS, thread_name_prefix="wsgi"
        )
        self.threads = threads
        self._slots: asyncio.Semaphore | None = None

    @property
    def slots(self) -> asyncio.Semaphore:
        """The threads for requests still receiving a body (made in the server's loop)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.threads)
        return self._slots

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
        slot = not body.done  # the rest of the body is read in a thread
        if slot:
            try:
                await asyncio.wait_for(self.slots.acquire(), SLOT_WAIT_SECONDS)
            except TimeoutError:
                log.warning("no upload slot", extra={"status": 503, "path": scope.get("path")})
                await _send_problem(send, Busy(), scope.get("path"))
                await body.drain()
                return
            body.restart()
        try:
            await self._answer(scope, send, body, prefix)
        finally:
            if slot:
                self.slots.release()
        await body.drain()

    async def _answer(self, scope: Scope, send: Send, body: _Body, prefix: bytes) -> None:
        loop = asyncio.get_running_loop()
        stop = Stop()
        ahead = _ReadAhead(body, loop, stop)
        try:
            await self._run_app(scope, send, wsgi_environ(scope, _Input(prefix, ahead)), stop)
        finally:
            await ahead.close()

    async def _run_app(self, scope: Scope, send: Send, environ: dict[str, Any], stop: Stop) -> None:
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        context.run(REQUEST_STOP.set, stop)
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
            answer, result, first = await loop.run_in_executor(self.pool, context.run, call)
        except Exception:  # the app's own handler answers every error: this is a bug
            log.exception("the WSGI app raised", extra={"path": scope.get("path")})
            await _send_problem(send, InternalError(), scope.get("path"))
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
    headers += [
        (k.lower().encode("latin-1"), v.encode("latin-1"))
        for k, v in problem_headers(error).items()
    ]
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
