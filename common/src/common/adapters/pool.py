"""A small thread-safe pool of connections: the one every service process uses for PostgreSQL.

At most ``size + overflow`` connections are open at a time (those being opened count too); up
to ``size`` idle ones are kept, the most recently returned first, and the rest are closed when
they come back. A caller that finds the pool at its cap waits up to ``timeout`` seconds for a
connection, then gets :class:`PoolTimeout`. An idle connection older than ``recycle`` seconds is
replaced instead of reused; one idle longer than ``ping_after`` seconds is first checked with
``ping``, and replaced if that fails. Opening a connection happens outside the pool's lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

log = logging.getLogger(__name__)


class Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


class PoolTimeout(Exception):
    """Every connection the cap allows is in use, and none came back in time."""


@dataclass(eq=False, slots=True)
class Lease(Generic[C]):
    """One checked-out connection; hand it back with :meth:`Pool.release`."""

    connection: C
    created: float  # on the pool's clock
    generation: int
    released: bool = field(default=False)


@dataclass(slots=True)
class _Idle(Generic[C]):
    connection: C
    created: float
    generation: int
    returned: float


class Pool(Generic[C]):
    def __init__(
        self,
        create: Callable[[], C],
        *,
        size: int,
        overflow: int = 0,
        timeout: float,
        recycle: float,
        ping: Callable[[C], object] | None = None,
        ping_after: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size < 1 or overflow < 0:
            raise ValueError("a pool needs size >= 1 and overflow >= 0")
        self._create = create
        self.size = size
        self.cap = size + overflow
        self.timeout = timeout
        self.recycle = recycle
        self._ping = ping
        self.ping_after = ping_after
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._idle: list[_Idle[C]] = []  # a stack: the last returned is reused first
        self._open = 0  # open or being opened: what counts against the cap
        self._generation = 0

    @property
    def open_connections(self) -> int:
        with self._cond:
            return self._open

    @property
    def idle_connections(self) -> int:
        with self._cond:
            return len(self._idle)

    def acquire(self) -> Lease[C]:
        """A connection: an idle one, a new one within the cap, or PoolTimeout after a wait."""
        deadline = self._clock() + self.timeout
        with self._cond:
            while not self._idle and self._open >= self.cap:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise PoolTimeout(f"all {self.cap} connections in use for {self.timeout:g} s")
                self._cond.wait(remaining)
            generation = self._generation
            idle = self._idle.pop() if self._idle else None
            if idle is None:
                self._open += 1  # this slot is ours while we connect
        if idle is not None:
            if self._usable(idle):
                return Lease(idle.connection, idle.created, idle.generation)
            _close_quietly(idle.connection)  # its slot is reused for a new connection
        return self._connect(generation)

    def release(self, lease: Lease[C], *, discard: bool = False) -> None:
        """Return ``lease``; ``discard`` closes its connection (one a failure left unusable)."""
        if lease.released:
            raise RuntimeError("connection released twice")
        lease.released = True
        with self._cond:
            keep = (
                not discard and lease.generation == self._generation and len(self._idle) < self.size
            )
            if keep:
                self._idle.append(
                    _Idle(lease.connection, lease.created, lease.generation, self._clock())
                )
            else:
                self._open -= 1
            self._cond.notify()
        if not keep:
            _close_quietly(lease.connection)

    def dispose(self) -> None:
        """Close the idle connections now, and the ones in use when they come back."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._generation += 1
            self._cond.notify_all()
        for entry in idle:
            _close_quietly(entry.connection)

    def _usable(self, idle: _Idle[C]) -> bool:
        now = self._clock()
        if now - idle.created >= self.recycle:
            return False
        if self._ping is None or now - idle.returned < self.ping_after:
            return True
        try:
            self._ping(idle.connection)
        except Exception as exc:
            log.info("a pooled connection failed its ping; connecting afresh: %s", exc)
            return False
        return True

    def _connect(self, generation: int) -> Lease[C]:
        try:
            connection = self._create()
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise
        return Lease(connection, self._clock(), generation)


def _close_quietly(connection: Closable) -> None:
    try:
        connection.close()
    except Exception as exc:  # a connection already broken may fail to say goodbye
        log.debug("closing a pooled connection failed: %s", exc)
