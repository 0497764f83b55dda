"""Every write under every fault (tests/support/faultproxy.py in front of PostgreSQL, and in front
of the S3 store for the upload and delete paths): no 500, nothing twice, never a row without its
object, nobody locked out, and the same process serves the next request within 5 s.

The matrix is in docs/reliability.md. Each armed fault must fire, or the case proves nothing.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flask.testing
import pytest
from common.adapters.db import sql
from common.domain.erasure import continue_erasures
from common.domain.jobs import Outcome, run_job
from common.domain.uploads import pending_key
from common.domain.users import authenticate
from common.errors import Unauthorized
from common.platform.runtime import Services, set_services
from werkzeug.test import TestResponse

from devstack import ScratchStack, wavgen
from tests.support.faultproxy import FaultProxy, Kind
from tests.support.stack_clients import RecordingQueue, build_services

ROOT = Path(__file__).resolve().parents[2]
USERS_NAMED = sql("SELECT count(*) AS n FROM users WHERE name = :name", idempotent=True)
RECORDS_OF = sql("SELECT id, object_key FROM records WHERE user_id = :user", idempotent=True)
UPLOAD = sql("SELECT status, record_id FROM uploads WHERE id = :id", idempotent=True)
ATTEMPTS = sql("SELECT attempts FROM uploads WHERE id = :id", idempotent=True)
USER_ROW = sql("SELECT 1 FROM users WHERE id = :id", idempotent=True)
WAV = wavgen.wav(seconds=0.5)


@dataclass
class Env:
    users: flask.testing.FlaskClient
    records: flask.testing.FlaskClient
    db_proxy: FaultProxy
    s3_proxy: FaultProxy
    services: Services  # through the proxies: what the functions use
    direct: Services  # straight to the servers: what the checks use
    queue: RecordingQueue


@pytest.fixture
def env(stack: ScratchStack, services: Services) -> Iterator[Env]:
    db_proxy = FaultProxy(stack.ports.postgres, postgres=True).start()
    s3_proxy = FaultProxy(stack.ports.s3).start()
    url = stack.database_tcp_url().replace(f":{stack.ports.postgres}/", f":{db_proxy.port}/")
    proxied = build_services(
        stack,
        database_url=url,
        db_pool_size=2,
        db_connect_timeout_seconds=2.0,
        db_statement_timeout_seconds=1.5,
        s3_endpoint_url=f"http://127.0.0.1:{s3_proxy.port}",
        s3_timeout_seconds=1.5,
    )
    queue = RecordingQueue()  # the stack's worker does not take these jobs
    proxied = proxied.replace(queue=queue)
    set_services(proxied)
    import functions_framework

    apps = {
        name: functions_framework.create_app(  # type: ignore[no-untyped-call]
            name, str(ROOT / "functions" / name / "main.py")
        )
        for name in ("create_user", "upload_record")
    }
    try:
        yield Env(
            apps["create_user"].test_client(),
            apps["upload_record"].test_client(),
            db_proxy,
            s3_proxy,
            proxied,
            services,
            queue,
        )
    finally:
        set_services(None)
        proxied.db.dispose()
        db_proxy.stop()
        s3_proxy.stop()


def bearer(token: str, key: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    return {**headers, "Idempotency-Key": key} if key else headers


def new_user(env: Env) -> dict[str, Any]:
    created = env.users.post("/users", json={"name": "Matrix"})
    assert created.status_code == 201, created.get_data(as_text=True)
    user: dict[str, Any] = created.get_json()
    return user


def upload(env: Env, user: dict[str, Any], key: str | None = None) -> TestResponse:
    form = {"user": user["id"], "file": (io.BytesIO(WAV), "take.wav")}
    return env.records.post(
        "/records",
        data=form,
        headers=bearer(user["token"], key),
        content_type="multipart/form-data",
    )


def object_exists(env: Env, key: str) -> bool:
    storage = env.direct.storage
    listing = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=key)
    return any(item["Key"] == key for item in listing.get("Contents", []))


def rows_have_objects(env: Env, user_id: str) -> list[Any]:
    rows = env.direct.db.execute(RECORDS_OF, {"user": uuid.UUID(user_id)})
    for row in rows:
        assert object_exists(env, row.object_key), f"a row without its object: {row.id}"
    return rows


def not_locked_out(env: Env, user_id: str, token: str) -> None:
    assert authenticate(env.direct.db, user_id, token) == uuid.UUID(user_id)


# --- the writes: each makes its request twice (the fault hits the first), then checks -------


@dataclass
class Case:
    env: Env
    user: dict[str, Any]
    key: str
    state: dict[str, Any]


def _create_user(case: Case) -> TestResponse:
    return case.env.users.post(
        "/users", json={"name": case.state["name"]}, headers={"Idempotency-Key": case.key}
    )


def _create_user_setup(case: Case) -> None:
    case.state["name"] = f"Matrix {uuid.uuid4()}"


def _create_user_check(case: Case, first: TestResponse, repeat: TestResponse) -> None:
    assert repeat.status_code == 201
    assert case.env.direct.db.execute(USERS_NAMED, {"name": case.state["name"]})[0].n == 1
    body = repeat.get_json()
    not_locked_out(case.env, body["id"], body["token"])


def _upload(case: Case) -> TestResponse:
    return upload(case.env, case.user, case.key)


def _upload_check(case: Case, first: TestResponse, repeat: TestResponse) -> None:
    assert repeat.status_code == 201
    rows = rows_have_objects(case.env, case.user["id"])
    assert [str(row.id) for row in rows] == [repeat.get_json()["id"]]  # one record, this one
    not_locked_out(case.env, case.user["id"], case.user["token"])


def _complete_setup(case: Case) -> None:
    env, user = case.env, case.user
    started = env.records.post(
        "/records/uploads", json={"user": user["id"]}, headers=bearer(user["token"])
    )
    assert started.status_code == 201, started.get_data(as_text=True)
    upload_id = started.get_json()["id"]
    storage = env.direct.storage
    key = pending_key(uuid.UUID(user["id"]), uuid.UUID(upload_id))
    storage.client.put_object(Bucket=storage.bucket, Key=key, Body=WAV)
    case.state["upload_id"] = upload_id


def _complete(case: Case) -> TestResponse:
    path = f"/records/uploads/{case.state['upload_id']}/complete"
    return case.env.records.post(
        path, json={"user": case.user["id"]}, headers=bearer(case.user["token"], case.key)
    )


def _complete_check(case: Case, first: TestResponse, repeat: TestResponse) -> None:
    assert repeat.status_code == 202, repeat.get_data(as_text=True)  # the winner stays it
    upload_id = uuid.UUID(case.state["upload_id"])
    row = case.env.direct.db.execute(UPLOAD, {"id": upload_id})[0]
    assert row.status == "queued" and row.record_id is not None
    assert upload_id in case.env.queue.sent  # the job was sent, whatever the reply did


def _rotate(case: Case) -> TestResponse:
    path = f"/users/{case.user['id']}/token"
    return case.env.users.post(path, headers=bearer(case.user["token"], case.key))


def _rotate_check(case: Case, first: TestResponse, repeat: TestResponse) -> None:
    assert repeat.status_code == 200
    not_locked_out(case.env, case.user["id"], repeat.get_json()["token"])
    with pytest.raises(Unauthorized):
        authenticate(case.env.direct.db, case.user["id"], case.user["token"])


def _delete_setup(case: Case) -> None:
    created = upload(case.env, case.user)
    assert created.status_code == 201, created.get_data(as_text=True)
    case.state["record"] = created.get_json()["id"]


def _delete(case: Case) -> TestResponse:
    path = f"/record?id={case.state['record']}&user={case.user['id']}"
    return case.env.records.delete(path, headers=bearer(case.user["token"]))


def _delete_check(case: Case, first: TestResponse, repeat: TestResponse) -> None:
    assert 204 in (first.status_code, repeat.status_code)
    assert repeat.status_code in (204, 404)  # gone: this or the first request deleted it
    assert rows_have_objects(case.env, case.user["id"]) == []
    not_locked_out(case.env, case.user["id"], case.user["token"])


def _erase_setup(case: Case) -> None:
    _delete_setup(case)


def _erase(case: Case) -> TestResponse:
    return case.env.users.delete(f"/users/{case.user['id']}", headers=bearer(case.user["token"]))


def _erase_check(case: Case, first: TestResponse, repeat: TestResponse) -> None:
    assert first.status_code in (204, 503)
    assert repeat.status_code in (204, 401)  # 401: the first erased the user and its token
    user_id = uuid.UUID(case.user["id"])
    assert case.env.direct.db.execute(USER_ROW, {"id": user_id}) == []
    continue_erasures(case.env.direct.db, case.env.direct.storage, case.env.direct.settings)
    listing = case.env.direct.storage.client.list_objects_v2(
        Bucket=case.env.direct.storage.bucket, Prefix=f"users/{user_id}/"
    )
    assert listing.get("KeyCount", 0) == 0  # the erasure's objects are gone too


def _replay_setup(case: Case) -> None:
    _create_user_setup(case)
    assert _create_user(case).status_code == 201  # answered: the repeats below are replays


def _replay_check(case: Case, first: TestResponse, repeat: TestResponse) -> None:
    assert repeat.status_code == 201 and repeat.headers["Idempotent-Replayed"] == "true"
    _create_user_check(case, first, repeat)


@dataclass(frozen=True)
class Write:
    run: Callable[[Case], TestResponse]
    check: Callable[[Case, TestResponse, TestResponse], None]
    statement: bytes  # the statement whose reply the database fault hits
    then: bytes | None  # in a transaction: the COMMIT after it
    setup: Callable[[Case], None] | None = None
    s3_request: bytes | None = None  # the store's request the S3 fault hits


WRITES = {
    "create user": Write(
        _create_user, _create_user_check, b"INSERT INTO users", b"COMMIT", _create_user_setup
    ),
    "upload": Write(_upload, _upload_check, b"INSERT INTO records", b"COMMIT", s3_request=b"PUT /"),
    "complete": Write(
        _complete,
        _complete_check,
        b"UPDATE uploads SET status = 'queued'",
        b"COMMIT",
        _complete_setup,
    ),
    "rotate": Write(_rotate, _rotate_check, b"UPDATE users SET token_hash", b"COMMIT"),
    "delete": Write(
        _delete, _delete_check, b"DELETE FROM records", None, _delete_setup, b"DELETE /"
    ),
    "erase": Write(_erase, _erase_check, b"DELETE FROM users", b"COMMIT", _erase_setup),
    "replay": Write(
        _create_user, _replay_check, b"INSERT INTO idempotency_keys", None, _replay_setup
    ),
}
REFUSE = "refuse"  # new connections refused (and open ones reset) during the first request
FAULTS: list[Kind | str] = [Kind.HANG, Kind.CUT, Kind.RESET, REFUSE]


def run_case(env: Env, write: Write, fault: Kind | str, proxy: FaultProxy, match: bytes,
             then: bytes | None) -> None:  # fmt: skip
    case = Case(env, new_user(env), str(uuid.uuid4()), {})
    if write.setup is not None:
        write.setup(case)
    if fault == REFUSE:
        with proxy.refusing():
            first = write.run(case)
        assert proxy.refused, "no connection was refused"
    else:
        assert isinstance(fault, Kind)
        armed = proxy.arm(fault, match, then=then)
        first = write.run(case)
        assert armed.fired.is_set(), "the fault never fired"
    assert first.status_code < 500 or first.status_code == 503, first.get_data(as_text=True)
    started = time.monotonic()
    repeat = write.run(case)
    assert time.monotonic() - started < 5
    assert repeat.status_code < 500, repeat.get_data(as_text=True)
    write.check(case, first, repeat)


@pytest.mark.parametrize("fault", FAULTS, ids=str)
@pytest.mark.parametrize("write", list(WRITES))
def test_every_write_under_every_database_fault(env: Env, write: str, fault: Kind | str) -> None:
    spec = WRITES[write]
    run_case(env, spec, fault, env.db_proxy, spec.statement, spec.then)


@pytest.mark.parametrize("fault", FAULTS, ids=str)
@pytest.mark.parametrize("write", [name for name, spec in WRITES.items() if spec.s3_request])
def test_the_store_paths_under_every_store_fault(env: Env, write: str, fault: Kind | str) -> None:
    spec = WRITES[write]
    assert spec.s3_request is not None
    run_case(env, spec, fault, env.s3_proxy, spec.s3_request, None)


# --- single promises, each shown where it broke ---------------------------------------------


def test_an_upload_whose_insert_outcome_is_unknown_keeps_its_mp3(env: Env) -> None:
    """The INSERT committed, its reply was lost, and no connection is left for a retry: 503,
    and the MP3 stays (the row is there; had it not been, the sweep removes the object)."""
    user = new_user(env)
    fault = env.db_proxy.arm(Kind.CUT, b"INSERT INTO records", outage=True)
    try:
        lost = upload(env, user)
    finally:
        env.db_proxy.end_outage()
    assert fault.fired.is_set()
    assert lost.status_code == 503, lost.get_data(as_text=True)
    assert len(rows_have_objects(env, user["id"])) == 1  # committed, with its object


def test_a_keyed_upload_whose_commit_is_lost_is_replayed_not_converted_again(env: Env) -> None:
    user = new_user(env)
    key = str(uuid.uuid4())
    fault = env.db_proxy.arm(Kind.CUT, b"INSERT INTO records", then=b"COMMIT")
    assert upload(env, user, key).status_code == 503
    assert fault.fired.is_set()
    repeat = upload(env, user, key)
    assert repeat.status_code == 201 and repeat.headers["Idempotent-Replayed"] == "true"
    assert [str(row.id) for row in rows_have_objects(env, user["id"])] == [repeat.get_json()["id"]]


def test_a_retried_winning_completion_stays_the_winner(env: Env) -> None:
    """Without a key: the _QUEUE UPDATE's reply is reset, the driver runs it again, and it
    finds its own record id: 202 and a job sent, not a 409 with nothing queued."""
    case = Case(env, new_user(env), "", {})
    _complete_setup(case)
    fault = env.db_proxy.arm(Kind.RESET, b"UPDATE uploads SET status = 'queued'")
    path = f"/records/uploads/{case.state['upload_id']}/complete"
    won = env.records.post(path, json={"user": case.user["id"]}, headers=bearer(case.user["token"]))
    assert fault.fired.is_set()
    assert won.status_code == 202, won.get_data(as_text=True)
    assert env.queue.sent == [uuid.UUID(case.state["upload_id"])]


def test_a_retried_delete_is_a_204(env: Env) -> None:
    case = Case(env, new_user(env), "", {})
    _delete_setup(case)
    fault = env.db_proxy.arm(Kind.RESET, b"DELETE FROM records")
    deleted = _delete(case)
    assert fault.fired.is_set()
    assert deleted.status_code == 204, deleted.get_data(as_text=True)
    assert rows_have_objects(env, case.user["id"]) == []
    record_key = f"users/{case.user['id']}/records/{case.state['record']}.mp3"
    assert not object_exists(env, record_key)


def test_an_unknown_user_with_a_key_is_a_401_not_a_500(env: Env) -> None:
    answer = env.users.post(
        f"/users/{uuid.uuid4()}/token", headers=bearer(str(uuid.uuid4()), str(uuid.uuid4()))
    )
    assert answer.status_code == 401


def test_a_retried_job_claim_does_not_burn_an_attempt(env: Env) -> None:
    """The claim's reply is reset; the driver runs the UPDATE again with the same lease
    token, which takes the same job as the same attempt."""
    case = Case(env, new_user(env), str(uuid.uuid4()), {})
    _complete_setup(case)
    assert _complete(case).status_code == 202
    upload_id = uuid.UUID(case.state["upload_id"])
    fault = env.db_proxy.arm(Kind.RESET, b"UPDATE uploads SET status = 'converting'")
    outcome = run_job(env.services.db, env.services.storage, env.services.settings, upload_id)
    assert fault.fired.is_set()
    assert outcome is Outcome.DONE
    assert env.direct.db.execute(ATTEMPTS, {"id": upload_id})[0].attempts == 1
    assert len(rows_have_objects(env, case.user["id"])) == 1
