"""common.adapters.pool: the cap, waiting, reuse, recycling, pings, discards and dispose.

Connections here are plain objects that record what happened to them; the clock is a fake
one where age matters, so no test waits for real time except the ones about waiting.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import pytest
from common.adapters.pool import Lease, Pool, PoolTimeout


class Conn:
    numbers = itertools.count(1)

    def __init__(self) -> None:
        self.number = next(self.numbers)
        self.closed = False
        self.pings = 0
        self.broken = False

    def close(self) -> None:
        self.closed = True
        if self.broken:
            raise OSError("the socket is gone")

    def ping(self) -> None:
        self.pings += 1
        if self.broken:
            raise OSError("the socket is gone")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Factory:
    def __init__(self) -> None:
        self.made: list[Conn] = []
        self.fail_with: BaseException | None = None

    def __call__(self) -> Conn:
        if self.fail_with is not None:
            raise self.fail_with
        conn = Conn()
        self.made.append(conn)
        return conn


@pytest.fixture
def factory() -> Factory:
    return Factory()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(
    factory: Factory,
    clock: Clock | None = None,
    *,
    size: int = 2,
    overflow: int = 0,
    timeout: float = 0.2,
    recycle: float = 1800,
    ping_after: float = 5,
) -> Pool[Conn]:
    return Pool(
        factory,
        size=size,
        overflow=overflow,
        timeout=timeout,
        recycle=recycle,
        ping=Conn.ping,
        ping_after=ping_after,
        **({"clock": clock} if clock else {}),
    )


def test_a_returned_connection_is_reused_the_latest_first(factory: Factory) -> None:
    pool = make(factory)
    first, second = pool.acquire(), pool.acquire()
    pool.release(first)
    pool.release(second)
    again = pool.acquire()
    assert again.connection is second.connection  # the warmest one
    assert len(factory.made) == 2
    assert pool.open_connections == 2 and pool.idle_connections == 1


def test_the_cap_is_size_plus_overflow_and_a_waiter_times_out(factory: Factory) -> None:
    pool = make(factory, size=1, overflow=1, timeout=0.2)
    held = [pool.acquire(), pool.acquire()]
    started = time.monotonic()
    with pytest.raises(PoolTimeout):
        pool.acquire()
    assert time.monotonic() - started >= 0.2
    assert len(factory.made) == 2 and pool.open_connections == 2
    for lease in held:
        pool.release(lease)
    # Only `size` stay open: the overflow connection is closed on its return.
    assert pool.open_connections == 1 and pool.idle_connections == 1
    assert [conn.closed for conn in factory.made] == [False, True]


def test_a_waiter_gets_the_connection_another_thread_returns(factory: Factory) -> None:
    pool = make(factory, size=1, timeout=30)
    held = pool.acquire()
    got: list[Lease[Conn]] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire()))
    waiter.start()
    time.sleep(0.1)
    assert not got  # still waiting
    pool.release(held)
    waiter.join(timeout=10)
    assert got and got[0].connection is held.connection
    assert len(factory.made) == 1


def test_many_threads_never_open_more_than_the_cap(factory: Factory) -> None:
    pool = make(factory, size=2, overflow=1, timeout=30)
    in_use = 0
    most = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal in_use, most
        for _ in range(50):
            lease = pool.acquire()
            with lock:
                in_use += 1
                most = max(most, in_use)
            time.sleep(0.0005)
            with lock:
                in_use -= 1
            pool.release(lease, discard=lease.connection.number % 7 == 0)

    threads = [threading.Thread(target=work) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most == 3
    assert pool.open_connections <= 2
    assert sum(not conn.closed for conn in factory.made) == pool.open_connections


def test_a_discarded_connection_is_closed_and_frees_its_slot(factory: Factory) -> None:
    pool = make(factory, size=1, timeout=0.1)
    lease = pool.acquire()
    lease.connection.broken = True  # closing it fails too: the pool does not mind
    pool.release(lease, discard=True)
    assert lease.connection.closed and pool.open_connections == 0
    fresh = pool.acquire()
    assert fresh.connection is not lease.connection


def test_a_lease_cannot_be_released_twice(factory: Factory) -> None:
    pool = make(factory)
    lease = pool.acquire()
    pool.release(lease)
    with pytest.raises(RuntimeError):
        pool.release(lease)
    assert pool.open_connections == 1


def test_a_failed_connect_frees_its_slot(factory: Factory) -> None:
    pool = make(factory, size=1, timeout=0.1)
    factory.fail_with = OSError("connection refused")
    with pytest.raises(OSError, match="refused"):
        pool.acquire()
    assert pool.open_connections == 0
    factory.fail_with = None
    assert pool.acquire().connection is factory.made[0]


def test_only_a_connection_idle_past_ping_after_is_pinged(factory: Factory, clock: Clock) -> None:
    pool = make(factory, clock, ping_after=5)
    lease = pool.acquire()
    conn = lease.connection
    pool.release(lease)
    clock.now += 4.9
    lease = pool.acquire()
    assert conn.pings == 0  # in steady use: no round trip for a ping
    pool.release(lease)
    clock.now += 5
    lease = pool.acquire()
    assert conn.pings == 1 and lease.connection is conn


def test_a_connection_that_fails_its_ping_is_replaced(factory: Factory, clock: Clock) -> None:
    pool = make(factory, clock, size=1, ping_after=5)
    lease = pool.acquire()
    dead = lease.connection
    pool.release(lease)
    dead.broken = True  # the server restarted while it sat idle
    clock.now += 60
    lease = pool.acquire()
    assert lease.connection is not dead and dead.closed
    assert pool.open_connections == 1


def test_an_old_connection_is_recycled(factory: Factory, clock: Clock) -> None:
    pool = make(factory, clock, recycle=1800, ping_after=1e9)
    lease = pool.acquire()
    old = lease.connection
    pool.release(lease)
    clock.now += 1799
    lease = pool.acquire()
    assert lease.connection is old
    pool.release(lease)
    clock.now += 1
    lease = pool.acquire()
    assert lease.connection is not old and old.closed
    assert pool.open_connections == 1


def test_dispose_closes_idle_connections_now_and_busy_ones_on_return(factory: Factory) -> None:
    pool = make(factory)
    busy, idle = pool.acquire(), pool.acquire()
    pool.release(idle)
    pool.dispose()
    assert idle.connection.closed and not busy.connection.closed
    assert pool.open_connections == 1
    pool.release(busy)
    assert busy.connection.closed and pool.open_connections == 0
    fresh = pool.acquire()
    assert fresh.connection not in (busy.connection, idle.connection)


def test_an_interrupt_while_connecting_frees_the_slot(factory: Factory) -> None:
    pool = make(factory, size=1)
    factory.fail_with = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        pool.acquire()
    assert pool.open_connections == 0


def test_a_pool_needs_a_size() -> None:
    with pytest.raises(ValueError, match="size"):
        Pool(Factory(), size=0, timeout=1, recycle=1)


@pytest.fixture(autouse=True)
def _no_thread_left() -> Iterator[None]:
    before = threading.active_count()
    yield
    assert threading.active_count() == before
