"""common.adapters.db under network faults (tests/support/faultproxy.py in front of PostgreSQL).

Each fault is classified by what happened: a socket that fails or times out discards the
connection and is a 503; a statement that may have run is never run again unless declared
idempotent; a bad parameter is the caller's bug, on a connection kept; a slow statement is
cancelled by the server, before the socket gives up.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pytest
from common.adapters.db import Database, sql
from common.errors import DependencyUnavailable
from common.settings import Settings
from pg8000.native import InterfaceError

from tests.support.faultproxy import FaultProxy, Kind

BACKEND = sql("SELECT pg_backend_pid() AS pid", idempotent=True)
CREATE = sql("CREATE TABLE IF NOT EXISTS db_fault_scratch (id integer PRIMARY KEY)")
DROP = sql("DROP TABLE IF EXISTS db_fault_scratch")
COUNT = sql("SELECT count(*) AS n FROM db_fault_scratch", idempotent=True)
# Not idempotent: a second run of the same INSERT is a unique violation.
INSERT = sql("INSERT INTO db_fault_scratch (id) VALUES (:id) RETURNING id")
INSERT_ONCE = sql(
    "INSERT INTO db_fault_scratch (id) VALUES (:id) ON CONFLICT (id) DO NOTHING",
    idempotent=True,
)
SLOW = sql("SELECT pg_sleep(:seconds)")


@pytest.fixture
def proxy(stack_settings: Settings) -> Iterator[FaultProxy]:
    port = int(stack_settings.database_url.rsplit(":", 1)[1].split("/", 1)[0])
    fault_proxy = FaultProxy(port, postgres=True).start()
    try:
        yield fault_proxy
    finally:
        fault_proxy.stop()


def through(settings: Settings, proxy: FaultProxy, *, socket: float, server: float) -> Settings:
    head, tail = settings.database_url.rsplit(":", 1)
    url = f"{head}:{proxy.port}/{tail.split('/', 1)[1]}"
    return dataclasses.replace(
        settings,
        database_url=url,
        db_pool_size=1,
        db_pool_overflow=0,
        db_connect_timeout_seconds=socket,
        db_statement_timeout_seconds=server,
    )


@pytest.fixture
def db(stack_settings: Settings, proxy: FaultProxy) -> Iterator[Database]:
    """One connection through the proxy; a short socket timeout (2 s), the server's 1.5 s."""
    database = Database.from_settings(through(stack_settings, proxy, socket=2.0, server=1.5))
    database.execute(DROP)
    database.execute(CREATE)
    try:
        yield database
    finally:
        database.execute(DROP)
        database.dispose()


def test_a_reply_that_never_comes_is_a_503_and_the_connection_is_replaced(
    db: Database, proxy: FaultProxy
) -> None:
    pid = db.execute(BACKEND)[0].pid
    proxy.arm(Kind.HANG, b"INSERT INTO db_fault_scratch")
    with pytest.raises(DependencyUnavailable):
        db.execute(INSERT, {"id": 1})
    assert db.execute(BACKEND)[0].pid != pid  # a fresh connection, in step
    assert db.execute(COUNT)[0].n == 1  # it ran once on the server; it was not run again


def test_a_reply_lost_after_commit_is_not_run_again(db: Database, proxy: FaultProxy) -> None:
    fault = proxy.arm(Kind.CUT, b"INSERT INTO db_fault_scratch")
    with pytest.raises(DependencyUnavailable):
        db.execute(INSERT, {"id": 2})
    assert fault.fired.is_set()
    assert db.execute(COUNT)[0].n == 1  # committed once; no retry, no unique violation


def test_an_idempotent_statement_is_run_again_after_a_lost_reply(
    db: Database, proxy: FaultProxy
) -> None:
    fault = proxy.arm(Kind.RESET, b"INSERT INTO db_fault_scratch")
    db.execute(INSERT_ONCE, {"id": 3})  # no error reaches the caller
    assert fault.fired.is_set()
    assert db.execute(COUNT)[0].n == 1


def test_a_reset_in_the_middle_of_a_reply_is_a_503(db: Database, proxy: FaultProxy) -> None:
    pid = db.execute(BACKEND)[0].pid
    proxy.arm(Kind.RESET, b"pg_backend_pid", then=b"INSERT INTO db_fault_scratch")
    db.execute(BACKEND)  # arms the connection; the INSERT's reply is cut in half
    with pytest.raises(DependencyUnavailable):
        db.execute(INSERT, {"id": 4})
    assert db.execute(BACKEND)[0].pid != pid


def test_a_lost_commit_is_a_503_with_the_outcome_left_to_the_caller(
    db: Database, proxy: FaultProxy
) -> None:
    proxy.arm(Kind.CUT, b"INSERT INTO db_fault_scratch", then=b"COMMIT")
    with pytest.raises(DependencyUnavailable) as raised, db.transaction() as conn:
        conn.execute(INSERT, {"id": 5})
    assert raised.value.outcome_unknown  # the caller keeps what goes with the row
    assert db.execute(COUNT)[0].n == 1  # the server committed; nothing ran twice


def test_a_bad_parameter_is_a_bug_on_a_connection_kept(db: Database) -> None:
    pid = db.execute(BACKEND)[0].pid
    with pytest.raises(InterfaceError):
        db.execute(INSERT, {})  # no :id
    assert db.execute(BACKEND)[0].pid == pid


def test_the_server_cancels_a_slow_statement_before_the_socket_gives_up(db: Database) -> None:
    pid = db.execute(BACKEND)[0].pid
    started = time.monotonic()
    with pytest.raises(DependencyUnavailable) as raised:
        db.execute(SLOW, {"seconds": 5})
    assert time.monotonic() - started < 2.0  # 57014 at 1.5 s, before the 2 s socket timeout
    assert "57014" in repr(raised.value.__cause__)
    assert not raised.value.outcome_unknown  # the server cancelled it: nothing committed
    assert db.execute(BACKEND)[0].pid == pid  # the connection stays in use


def test_refused_connections_are_503s_until_the_database_is_back(
    db: Database, proxy: FaultProxy
) -> None:
    db.execute(COUNT)  # a pooled connection, open through the proxy
    with proxy.refusing():  # resets it (done on return), then refuses new ones
        for _ in range(2):
            with pytest.raises(DependencyUnavailable):
                db.execute(COUNT)
    assert db.execute(COUNT)[0].n == 0
