"""The database login from AWS Secrets Manager (moto) against the stack's real PostgreSQL.

A role of its own per test: the secret holds its login, DATABASE_URL holds none. Rotating
(change the role's password, then the secret) needs no restart: the next new connection is
refused with 28P01, the secret is read again and the request succeeds.
"""

from __future__ import annotations

import json
import logging
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import boto3
import pytest
from common.adapters.db import Database, sql
from common.errors import DependencyUnavailable
from common.settings import Settings
from moto import mock_aws

from devstack import NativeStack

REGION = "eu-west-1"


@pytest.fixture
def role(stack: NativeStack, stack_settings: Settings) -> Iterator[tuple[str, str]]:
    name = f"rotating_{uuid.uuid4().hex[:10]}"
    password = secrets.token_urlsafe(16)
    admin = Database.from_settings(stack_settings)
    admin.execute(sql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'"))
    try:
        yield name, password
    finally:
        admin.execute(sql(f"DROP ROLE IF EXISTS {name}"))
        admin.dispose()


@pytest.fixture
def secret_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        yield boto3.client("secretsmanager", region_name=REGION)


def _settings_without_password(stack: NativeStack, stack_settings: Settings, arn: str) -> Settings:
    # Host, port and database from the URL; no user, no password.
    url = f"postgresql+pg8000://127.0.0.1:{stack.ports.postgres}/records"
    return replace(stack_settings, database_url=url, database_secret_arn=arn, db_pool_size=1)


def test_rotation_needs_no_restart(
    stack: NativeStack,
    stack_settings: Settings,
    role: tuple[str, str],
    secret_store: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    name, password = role
    arn = secret_store.create_secret(
        Name="records/db", SecretString=json.dumps({"username": name, "password": password})
    )["ARN"]
    db = Database.from_settings(_settings_without_password(stack, stack_settings, arn))
    try:
        assert db.execute(sql("SELECT current_user"))[0][0] == name

        new_password = secrets.token_urlsafe(16)
        admin = Database.from_settings(stack_settings)
        admin.execute(sql(f"ALTER ROLE {name} PASSWORD '{new_password}'"))
        admin.dispose()
        secret_store.put_secret_value(
            SecretId=arn, SecretString=json.dumps({"username": name, "password": new_password})
        )
        db.dispose()  # the next request needs a new connection: a login
        logging.getLogger("common.adapters.db").disabled = False  # whatever ran before
        with caplog.at_level(logging.WARNING, logger="common.adapters.db"):
            assert db.execute(sql("SELECT current_user"))[0][0] == name  # the same pool
        assert "secret read again" in caplog.text
    finally:
        db.dispose()


def test_a_wrong_secret_is_an_outage_not_a_loop(
    stack: NativeStack, stack_settings: Settings, role: tuple[str, str], secret_store: Any
) -> None:
    name, _password = role
    arn = secret_store.create_secret(
        Name="records/db-wrong", SecretString=json.dumps({"username": name, "password": "nope"})
    )["ARN"]
    db = Database.from_settings(_settings_without_password(stack, stack_settings, arn))
    try:
        with pytest.raises(DependencyUnavailable):
            db.execute(sql("SELECT 1"))
    finally:
        db.dispose()


def test_the_url_holds_no_password_and_the_secret_is_read_at_start(
    stack: NativeStack, stack_settings: Settings, role: tuple[str, str], secret_store: Any
) -> None:
    name, password = role
    arn = secret_store.create_secret(
        Name="records/db-start",
        SecretString=json.dumps({"username": name, "password": password, "dbname": "records"}),
    )["ARN"]
    settings = _settings_without_password(stack, stack_settings, arn)
    assert "@" not in settings.database_url
    db = Database.from_settings(settings)  # reads the secret now
    secret_store.delete_secret(SecretId=arn, ForceDeleteWithoutRecovery=True)
    try:  # the login read at start serves new connections without another read
        assert db.execute(sql("SELECT current_user"))[0][0] == name
    finally:
        db.dispose()
