"""common.adapters.db on the stack's PostgreSQL: prepared statements, errors, transactions."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator

import pytest
from common.adapters.db import Database, is_foreign_key_violation, sql
from common.errors import DependencyUnavailable
from common.settings import Settings
from pg8000.native import DatabaseError

BACKEND = sql("SELECT pg_backend_pid() AS pid", idempotent=True)
PREPARED_HERE = sql("SELECT statement FROM pg_prepared_statements")
TERMINATE = sql("SELECT pg_terminate_backend(:pid, 5000) AS ok")  # waits up to 5 s for it
SHORT_TIMEOUT = sql("SET statement_timeout = 50")  # this session only: the fixture's pool
SLEEP = sql("SELECT pg_sleep(2)")
# A scratch table of this module's, made and dropped by the `table` fixture.
CREATE = sql("CREATE TABLE db_test_scratch (id integer PRIMARY KEY, n integer NOT NULL)")
DROP = sql("DROP TABLE IF EXISTS db_test_scratch")
INSERT = sql("INSERT INTO db_test_scratch (id, n) VALUES (:id, :n) RETURNING id, n")
DELETE = sql("DELETE FROM db_test_scratch WHERE id = :id")
EVERYTHING = sql("SELECT * FROM db_test_scratch ORDER BY id")
COUNT = sql("SELECT count(*) AS rows FROM db_test_scratch")
ADD_COLUMN = sql("ALTER TABLE db_test_scratch ADD COLUMN label text DEFAULT 'x'")


class CallersOwnError(Exception):
    pass


@pytest.fixture
def db(stack_settings: Settings) -> Iterator[Database]:
    """A Database whose pool holds one connection: every statement runs on the same one."""
    one = dataclasses.replace(stack_settings, db_pool_size=1, db_pool_overflow=0)
    database = Database.from_settings(one)
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture
def admin(stack_settings: Settings) -> Iterator[Database]:
    """A second Database: other connections than `db`'s."""
    database = Database.from_settings(stack_settings)
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture
def table(admin: Database) -> Iterator[None]:
    admin.execute(DROP)
    admin.execute(CREATE)
    try:
        yield
    finally:
        admin.execute(DROP)


def test_a_statement_is_prepared_once_per_connection(db: Database) -> None:
    marker = str(uuid.uuid4())
    probe = sql(f"SELECT CAST(:n AS integer) + 1 AS next /* {marker} */")
    assert [row.next for _ in range(3) for row in db.execute(probe, {"n": 41})] == [42] * 3
    prepared = [row.statement for row in db.execute(PREPARED_HERE)]
    assert sum(marker in statement for statement in prepared) == 1


@pytest.mark.usefixtures("table")
def test_rows_are_named_tuples(db: Database) -> None:
    (row,) = db.execute(INSERT, {"id": 1, "n": 7})
    assert (row.id, row.n, row[1], row._asdict()) == (1, 7, 7, {"id": 1, "n": 7})
    assert db.execute(DELETE, {"id": 2}) == []  # a statement without rows


@pytest.mark.usefixtures("table")
def test_a_table_that_changes_shape_is_prepared_again(db: Database) -> None:
    db.execute(INSERT, {"id": 1, "n": 1})
    for _ in range(2):  # the second run is the prepared statement's
        assert [row._asdict() for row in db.execute(EVERYTHING)] == [{"id": 1, "n": 1}]
    db.execute(ADD_COLUMN)  # as a migration would, under the prepared statement
    for _ in range(2):
        rows = db.execute(EVERYTHING)
        assert [row._asdict() for row in rows] == [{"id": 1, "n": 1, "label": "x"}]


@pytest.mark.usefixtures("table")
def test_a_failed_statement_leaves_the_connection_in_use(db: Database) -> None:
    pid = db.execute(BACKEND)[0].pid
    db.execute(INSERT, {"id": 1, "n": 0})
    with pytest.raises(DatabaseError) as raised:
        db.execute(INSERT, {"id": 1, "n": 0})
    assert raised.value.args[0]["C"] == "23505"  # unique_violation: a bug, not an outage
    assert not is_foreign_key_violation(raised.value)
    assert db.execute(BACKEND)[0].pid == pid  # the same connection, still usable


@pytest.mark.usefixtures("table")
def test_a_transaction_commits_or_leaves_nothing(db: Database, admin: Database) -> None:
    def failing_in_the_body() -> None:
        with db.transaction() as conn:
            conn.execute(INSERT, {"id": 1, "n": 0})
            raise CallersOwnError

    def refused_by_the_server() -> None:
        with db.transaction() as conn:
            conn.execute(INSERT, {"id": 2, "n": 0})
            conn.execute(INSERT, {"id": 2, "n": 0})

    with pytest.raises(CallersOwnError):
        failing_in_the_body()
    with pytest.raises(DatabaseError):
        refused_by_the_server()
    with db.transaction() as conn:
        conn.execute(INSERT, {"id": 3, "n": 0})
        conn.execute(INSERT, {"id": 4, "n": 0})
    # Another connection sees exactly the committed rows: nothing was left open.
    assert admin.execute(COUNT)[0].rows == 2
    assert db.execute(COUNT)[0].rows == 2


def test_a_connection_the_server_ends_is_replaced_and_the_statement_retried(
    db: Database, admin: Database
) -> None:
    pid = db.execute(BACKEND)[0].pid
    assert admin.execute(TERMINATE, {"pid": pid})[0].ok
    assert db.execute(BACKEND)[0].pid != pid  # no error reached the caller


@pytest.mark.usefixtures("table")
def test_without_prepared_statements_nothing_is_prepared(stack_settings: Settings) -> None:
    unprepared = dataclasses.replace(
        stack_settings, db_pool_size=1, db_pool_overflow=0, db_prepared_statements=False
    )
    db = Database.from_settings(unprepared)
    try:
        marker = str(uuid.uuid4())
        probe = sql(f"SELECT CAST(:n AS integer) + 1 AS next /* {marker} */")
        assert [row.next for _ in range(3) for row in db.execute(probe, {"n": 1})] == [2] * 3
        assert not any(marker in row.statement for row in db.execute(PREPARED_HERE))
        db.execute(INSERT, {"id": 1, "n": 1})
        assert [row._asdict() for row in db.execute(EVERYTHING)] == [{"id": 1, "n": 1}]
        db.execute(ADD_COLUMN)
        assert [row._asdict() for row in db.execute(EVERYTHING)] == [
            {"id": 1, "n": 1, "label": "x"}
        ]
    finally:
        db.dispose()


def test_a_statement_timeout_is_an_outage_on_a_connection_kept(db: Database) -> None:
    pid = db.execute(BACKEND)[0].pid
    db.execute(SHORT_TIMEOUT)
    with pytest.raises(DependencyUnavailable) as raised:
        db.execute(SLEEP)
    assert raised.value.status == 503
    assert db.execute(BACKEND)[0].pid == pid  # the connection was kept


def test_a_server_restart_costs_no_request_its_idle_connections(stack_settings: Settings) -> None:
    """Every pooled connection ended at once (a restart, a failover): the first statement's
    retry connects afresh instead of taking the next dead one from the pool."""
    two = dataclasses.replace(stack_settings, db_pool_size=2, db_pool_overflow=0)
    db = Database.from_settings(two)
    admin = Database.from_settings(stack_settings)
    try:
        with db.transaction() as first, db.transaction() as second:  # two connections, pooled
            pids = [conn.execute(BACKEND)[0].pid for conn in (first, second)]
        for pid in pids:
            assert admin.execute(TERMINATE, {"pid": pid})[0].ok
        assert db.execute(BACKEND)[0].pid not in pids  # no error reached the caller
    finally:
        db.dispose()
        admin.dispose()
