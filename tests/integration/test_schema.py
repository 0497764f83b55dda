"""The migrations and the SQL are the schema: every statement the service runs must prepare
against the migrated database, so a column renamed on one side and not the other fails here."""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Iterator
from typing import Any

import pytest
from common.adapters.db import Statement, connect_params, sql
from common.domain import new_records
from common.settings import Settings
from pg8000 import native
from pg8000.native import DatabaseError

import common


def statements() -> dict[str, Statement[Any]]:
    """Every module-level statement of ``common``, by ``module.NAME``."""
    found: dict[str, Statement[Any]] = {}
    seen: set[int] = set()
    for info in pkgutil.walk_packages(common.__path__, "common."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if isinstance(value, Statement) and id(value) not in seen:  # imported ones once
                seen.add(id(value))
                found[f"{info.name}.{name}"] = value
    return found


STATEMENTS = statements()


@pytest.fixture(scope="module")
def connection(stack_settings: Settings) -> Iterator[native.Connection]:
    params = connect_params(stack_settings.database_url, tls=stack_settings.db_tls, timeout=10)
    conn = native.Connection(**params)
    yield conn
    conn.close()


def prepares(conn: native.Connection, statement: Statement[Any]) -> None:
    """Parse and plan ``statement`` on the server (names, types, tables), running nothing."""
    prepared = conn.prepare(statement.text)
    prepared.close()


def test_the_service_has_statements_to_check() -> None:
    assert len(STATEMENTS) >= 30, sorted(STATEMENTS)
    assert new_records.INSERT_RECORD in STATEMENTS.values()


@pytest.mark.parametrize("name", sorted(STATEMENTS))
def test_statement_prepares_against_the_migrated_schema(
    connection: native.Connection, name: str
) -> None:
    prepares(connection, STATEMENTS[name])


def test_a_statement_out_of_step_with_the_schema_fails(connection: native.Connection) -> None:
    with pytest.raises(DatabaseError, match="does not exist"):
        prepares(connection, sql("SELECT duration_secs FROM records WHERE id = :id"))
    with pytest.raises(DatabaseError):
        prepares(connection, sql("INSERT INTO uploads (id, colour) VALUES (:id, :colour)"))


def returns_rows(statement: Statement[Any]) -> bool:
    text = statement.text.lstrip().upper()
    return text.startswith(("SELECT", "WITH")) or " RETURNING " in f" {text} "


def test_every_statement_that_returns_rows_names_its_row_type() -> None:
    untyped = [name for name, st in STATEMENTS.items() if returns_rows(st) and st.row is None]
    assert untyped == []


ROW_STATEMENTS = sorted(name for name, st in STATEMENTS.items() if returns_rows(st))


@pytest.mark.parametrize("name", ROW_STATEMENTS)
def test_a_statements_columns_are_its_row_types_fields(
    connection: native.Connection, name: str
) -> None:
    """Run with every parameter NULL in a transaction rolled back: the columns the server
    names are the row type's fields, in order (a WHERE on NULL matches nothing). An INSERT
    that NULLs refuse is read from its RETURNING list instead."""
    statement = STATEMENTS[name]
    params = dict.fromkeys(re.findall(r"(?<!:):([a-z_]+)", statement.text))
    connection.run("BEGIN")
    try:
        connection.run(statement.text, **params)
        names = tuple(column["name"] for column in connection.columns or [])
    except DatabaseError as exc:
        if exc.args[0]["C"] != "23502":  # not-null: the statement itself is fine
            raise
        returning = statement.text.rsplit("RETURNING", 1)[1]
        names = tuple(column.strip() for column in returning.split(","))
    finally:
        connection.run("ROLLBACK")
    assert statement.row is not None
    assert names == statement.row._fields
