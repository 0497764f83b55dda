"""The migrations and the SQL are the schema: every statement the service runs must prepare
against the migrated database, so a column renamed on one side and not the other fails here."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator

import pytest
from common.adapters.db import Statement, connect_params, sql
from common.domain import records
from common.settings import Settings
from pg8000 import native
from pg8000.native import DatabaseError

import common


def statements() -> dict[str, Statement]:
    """Every module-level statement of ``common``, by ``module.NAME``."""
    found: dict[str, Statement] = {}
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


def prepares(conn: native.Connection, statement: Statement) -> None:
    """Parse and plan ``statement`` on the server (names, types, tables), running nothing."""
    prepared = conn.prepare(statement.text)
    prepared.close()


def test_the_service_has_statements_to_check() -> None:
    assert len(STATEMENTS) >= 30, sorted(STATEMENTS)
    assert records.INSERT_RECORD in STATEMENTS.values()


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
