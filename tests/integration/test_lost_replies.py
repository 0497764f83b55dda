"""Writes whose reply is lost after the server committed (tests/support/faultproxy.py in front
of PostgreSQL): a repeat with the same Idempotency-Key finds the effect, nothing runs twice,
and no user is locked out."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import flask.testing
import pytest
from common.adapters.db import sql
from common.platform.runtime import Services, set_services

from devstack import ScratchStack
from tests.support.faultproxy import FaultProxy, Kind
from tests.support.stack_clients import build_services

ROOT = Path(__file__).resolve().parents[2]
USERS_NAMED = sql("SELECT count(*) AS n FROM users WHERE name = :name", idempotent=True)


Proxied = tuple[flask.testing.FlaskClient, FaultProxy, Services]


@pytest.fixture
def proxied(stack: ScratchStack) -> Iterator[Proxied]:
    proxy = FaultProxy(stack.ports.postgres, postgres=True).start()
    url = stack.database_tcp_url().replace(f":{stack.ports.postgres}/", f":{proxy.port}/")
    services = build_services(
        stack,
        database_url=url,
        db_pool_size=2,
        db_connect_timeout_seconds=2.0,
        db_statement_timeout_seconds=1.5,
    )
    set_services(services)
    import functions_framework

    app = functions_framework.create_app(  # type: ignore[no-untyped-call]
        "create_user", str(ROOT / "functions" / "create_user" / "main.py")
    )
    try:
        yield app.test_client(), proxy, services
    finally:
        set_services(None)
        services.db.dispose()
        proxy.stop()


def test_a_rotation_whose_answer_was_lost_is_replayed_and_nobody_is_locked_out(
    proxied: Proxied,
) -> None:
    client, proxy, _ = proxied
    user = client.post("/users", json={"name": "Rotor"}).get_json()
    path = f"/users/{user['id']}/token"
    old = {"Authorization": f"Bearer {user['token']}", "Idempotency-Key": str(uuid.uuid4())}
    fault = proxy.arm(Kind.CUT, b"UPDATE users SET token_hash", then=b"COMMIT")
    lost = client.post(path, headers=old)
    assert fault.fired.is_set()
    assert lost.status_code == 503, lost.get_data(as_text=True)  # committed; the reply is gone
    repeat = client.post(path, headers=old)
    assert repeat.status_code == 200, repeat.get_data(as_text=True)
    assert repeat.headers["Idempotent-Replayed"] == "true"
    new = repeat.get_json()["token"]
    # The new token works (a second rotation with it), the old one does not.
    again = {"Authorization": f"Bearer {new}", "Idempotency-Key": str(uuid.uuid4())}
    assert client.post(path, headers=again).status_code == 200
    assert (
        client.post(path, headers={**old, "Idempotency-Key": str(uuid.uuid4())}).status_code == 401
    )


def test_a_keyed_user_creation_whose_answer_was_lost_makes_one_user(
    proxied: Proxied,
) -> None:
    client, proxy, services = proxied
    name = f"Once {uuid.uuid4()}"
    key = {"Idempotency-Key": str(uuid.uuid4())}
    fault = proxy.arm(Kind.CUT, b"INSERT INTO users", then=b"COMMIT")
    assert client.post("/users", json={"name": name}, headers=key).status_code == 503
    assert fault.fired.is_set()
    repeat = client.post("/users", json={"name": name}, headers=key)
    assert repeat.status_code == 201 and repeat.headers["Idempotent-Replayed"] == "true"
    assert services.db.execute(USERS_NAMED, {"name": name})[0].n == 1


def test_an_unknown_user_with_a_key_is_a_401_not_a_500(
    proxied: Proxied,
) -> None:
    client, _, _ = proxied
    answer = client.post(
        f"/users/{uuid.uuid4()}/token",
        headers={"Authorization": f"Bearer {uuid.uuid4()}", "Idempotency-Key": str(uuid.uuid4())},
    )
    assert answer.status_code == 401


# The matrix: each write under each database fault, then the same process must serve the
# repeat within 5 s, with no 500, one user per key and nobody locked out.
FAULTS = [Kind.HANG, Kind.CUT, Kind.RESET]
WRITES = {
    "create user": (b"INSERT INTO users", b"COMMIT"),
    "rotate": (b"UPDATE users SET token_hash", b"COMMIT"),
    "claim a key": (b"INSERT INTO idempotency_keys", None),
}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("write", list(WRITES))
def test_every_write_under_every_fault(proxied: Proxied, write: str, fault: Kind) -> None:
    client, proxy, services = proxied
    user = client.post("/users", json={"name": "Matrix"}).get_json()
    name = f"Matrix {uuid.uuid4()}"
    key = {"Idempotency-Key": str(uuid.uuid4())}
    if write == "rotate":
        path, body = f"/users/{user['id']}/token", None
        headers = {**key, "Authorization": f"Bearer {user['token']}"}
    else:
        path, body, headers = "/users", {"name": name}, key
    match, then = WRITES[write]
    proxy.arm(fault, match, then=then)
    first = client.post(path, json=body, headers=headers)
    assert first.status_code in (200, 201, 503), first.get_data(as_text=True)  # never a 500
    started = time.monotonic()
    repeat = client.post(path, json=body, headers=headers)
    assert time.monotonic() - started < 5
    assert repeat.status_code in (200, 201), repeat.get_data(as_text=True)
    if write == "rotate":
        new = {"Authorization": f"Bearer {repeat.get_json()['token']}", **key}
        again = client.post(path, headers={**new, "Idempotency-Key": str(uuid.uuid4())})
        assert again.status_code == 200  # not locked out
    else:
        assert services.db.execute(USERS_NAMED, {"name": name})[0].n == 1
