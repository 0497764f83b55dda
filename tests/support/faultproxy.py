"""A small fault-injecting TCP proxy (toxiproxy has no package here), for PostgreSQL and S3.

``FaultProxy(upstream_port)`` listens on a free port of 127.0.0.1 and forwards each
connection to the upstream. :meth:`FaultProxy.arm` sets a one-shot :class:`Fault` on the
reply to the first request that matches: for PostgreSQL the text of the statement being
executed (it follows prepared statements by name), for any other protocol the request's bytes.
:meth:`FaultProxy.refusing` resets the open connections and refuses new ones while its block
runs (an outage); ``arm(..., outage=True)`` starts one when its fault fires (ended by
:meth:`FaultProxy.end_outage`): a statement's outcome is then unknown, with no retry possible.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from enum import StrEnum

_LINGER_RESET = struct.pack("ii", 1, 0)
_CHUNK = 65536


class Kind(StrEnum):
    HANG = "hang"  # the reply is held back (the client's read times out)
    CUT = "cut"  # the server answered (committed); the reply is dropped, both sides closed
    RESET = "reset"  # part of the reply goes through, then the client's socket is reset


@dataclass
class Fault:
    kind: Kind
    match: bytes  # a statement's text (PostgreSQL) or bytes of the request (raw protocols)
    then: bytes | None = None  # armed by `match`; fires on this connection's next `then`
    outage: bool = False  # firing also resets every connection and refuses new ones
    fired: threading.Event = field(default_factory=threading.Event)

    def triggered_by(self, text: bytes, armed: bool) -> bool | None:
        """True: fire now; None: arm the connection for `then`; False: nothing."""
        if armed and self.then is not None and self.then in text:
            return True
        if self.match in text:
            return None if self.then is not None else True
        return False


class _Conn:
    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.fault: Fault | None = None  # fired: applies to what the server sends next
        self.armed = False
        self.statements: dict[bytes, bytes] = {}  # PostgreSQL: prepared name -> text
        self.portal = b""
        self.buffer = b""
        self.started = False  # PostgreSQL: the untyped startup message went by


class FaultProxy:
    def __init__(self, upstream_port: int, *, postgres: bool = False) -> None:
        self.upstream_port = upstream_port
        self.postgres = postgres
        self.port = 0
        self.refuse = False
        self.refused = 0  # connections refused so far
        self._pending: list[Fault] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._closing: set[asyncio.StreamWriter] = set()

    # --- the test's side -----------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def arm(
        self, kind: Kind, match: bytes, *, then: bytes | None = None, outage: bool = False
    ) -> Fault:
        fault = Fault(kind, match, then, outage)
        with self._lock:
            self._pending.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()

    @contextmanager
    def refusing(self) -> Iterator[None]:
        """An outage while the block runs: open connections reset, new ones refused."""
        self.refuse = True
        self.reset_all()
        try:
            yield
        finally:
            self.end_outage()

    def end_outage(self) -> None:
        self.refuse = False

    def reset_all(self) -> None:
        """Reset every open connection (as a failover would); done when this returns."""

        async def reset() -> None:
            self._reset_all()

        asyncio.run_coroutine_threadsafe(reset(), self._loop).result(10)

    # --- the loop's side -----------------------------------------------------------------
    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self._reset_all()

    def _reset_all(self, but: tuple[asyncio.StreamWriter, ...] = ()) -> None:
        for writer in list(self._closing):
            if writer not in but:
                _reset(writer)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            self.refused += 1
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            _reset(writer)
            return
        conn = _Conn(self)
        self._closing.update((writer, up_writer))
        try:
            await asyncio.gather(
                self._requests(conn, reader, up_writer),
                self._replies(conn, up_reader, writer, up_writer),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, up_writer):
                self._closing.discard(w)
                if not w.is_closing():
                    w.close()

    async def _requests(
        self, conn: _Conn, reader: asyncio.StreamReader, up: asyncio.StreamWriter
    ) -> None:
        while data := await reader.read(_CHUNK):
            self._inspect(conn, data)
            if up.is_closing():
                return
            up.write(data)
            await up.drain()
        if not up.is_closing():
            up.close()  # the client left (e.g. its read timed out): so does the server side

    async def _replies(
        self,
        conn: _Conn,
        reader: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        up: asyncio.StreamWriter,
    ) -> None:
        while data := await reader.read(_CHUNK):
            fault = conn.fault
            if fault is None:
                client.write(data)
                await client.drain()
                continue
            if fault.outage:
                self.refuse = True
                self._reset_all(but=(client, up))
            fault.fired.set()
            if fault.kind is Kind.HANG:
                continue  # held back for good; the client gives up and closes
            if fault.kind is Kind.RESET:
                client.write(data[: max(1, len(data) // 2)])
                await client.drain()
                _reset(client)
            else:
                # An autocommitted statement commits at its Sync, which may reach the server
                # after the Execute's reply went out: drop replies until ReadyForQuery, so the
                # cut always follows the commit.
                while self.postgres and _READY_FOR_QUERY not in data:
                    data = await reader.read(_CHUNK)
                    if not data:
                        break
                client.close()
            up.close()
            return
        client.close()

    def _inspect(self, conn: _Conn, data: bytes) -> None:
        if conn.fault is not None:
            return
        texts = self._pg_texts(conn, data) if self.postgres else [data]
        for text in texts:
            with self._lock:
                for fault in self._pending:
                    verdict = fault.triggered_by(text, conn.armed)
                    if verdict is None:
                        conn.armed = True
                    elif verdict:
                        self._pending.remove(fault)
                        conn.fault = fault
                        return

    def _pg_texts(self, conn: _Conn, data: bytes) -> list[bytes]:
        """The statement texts executed by the messages in ``data`` (extended or simple)."""
        conn.buffer += data
        texts: list[bytes] = []
        while True:
            buf = conn.buffer
            if not conn.started:
                if len(buf) < 8:
                    return texts
                length, code = struct.unpack("!ii", buf[:8])
                if len(buf) < length:
                    return texts
                conn.buffer = buf[length:]
                conn.started = code not in (80877103, 80877104)  # SSL/GSS requests come first
                continue
            if len(buf) < 5:
                return texts
            kind, length = buf[:1], struct.unpack("!i", buf[1:5])[0]
            if len(buf) < 1 + length:
                return texts
            body, conn.buffer = buf[5 : 1 + length], buf[1 + length :]
            if kind == b"Q":
                texts.append(body)
            elif kind == b"P":
                name, _, rest = body.partition(b"\0")
                conn.statements[name] = rest.partition(b"\0")[0]
            elif kind == b"B":
                _portal, _, rest = body.partition(b"\0")
                conn.portal = conn.statements.get(rest.partition(b"\0")[0], b"")
            elif kind == b"E":
                texts.append(conn.portal)


# PostgreSQL's ReadyForQuery message (its status byte follows): the server finished a Sync.
_READY_FOR_QUERY = b"Z\x00\x00\x00\x05"


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()
