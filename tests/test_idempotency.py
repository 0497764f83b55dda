"""Idempotency-Key on every POST: replays, mismatches, in-flight repeats, leases, scopes, and
what a database dump shows (common.domain.idempotency, common.http.idempotency).

Unit tests first (no servers), then the real stack through the router.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
import wavgen
from common.adapters.db import sql
from common.domain import idempotency
from common.domain.idempotency import Claim, Replay, Scope, StoredReply
from common.errors import IdempotencyKeyReused, InvalidField, RequestInProgress
from common.ops.sweep import sweep
from common.platform.runtime import Services
from conftest import Client

SECRET = "s" * 40
_ALL_ROWS = sql(
    "SELECT key_hash, user_id, fingerprint, state, response FROM idempotency_keys "
    "WHERE user_id = :user OR user_id IS NULL"
)


# --- unit ---------------------------------------------------------------------------------


def test_sealed_reply_needs_the_raw_key_and_the_secret() -> None:
    reply = StoredReply(201, {"Location": "/x"}, b'{"token": "secret-token"}')
    hashed = idempotency.key_hash(Scope("anonymous", "POST", "/users"), "k" * 20)
    sealed = idempotency.seal(reply, secret=SECRET, key="k" * 20, hashed=hashed)
    assert b"secret-token" not in sealed
    assert idempotency.unseal(sealed, secret=SECRET, key="k" * 20, hashed=hashed) == reply
    for secret, key in ((SECRET, "k" * 21), ("t" * 40, "k" * 20)):
        with pytest.raises(IdempotencyKeyReused):
            idempotency.unseal(sealed, secret=secret, key=key, hashed=hashed)


def test_scopes_never_share_a_key_hash() -> None:
    key = "same-key"
    scopes = [
        Scope(str(uuid.uuid4()), "POST", "/records"),
        Scope(str(uuid.uuid4()), "POST", "/records"),
        Scope("anonymous", "POST", "/users"),
        Scope(scopes_user := str(uuid.uuid4()), "POST", "/records/uploads"),
        Scope(scopes_user, "POST", "/records"),
    ]
    assert len({idempotency.key_hash(s, key) for s in scopes}) == len(scopes)


@pytest.mark.parametrize(
    ("raw", "anonymous"),
    [("", False), ("   ", False), ("x" * 256, False), ("a\x01b", False), ("short", True)],
)
def test_bad_keys_are_refused(raw: str, anonymous: bool) -> None:
    with pytest.raises(InvalidField):
        idempotency.validate_key(raw, anonymous=anonymous)


def test_good_keys() -> None:
    assert idempotency.validate_key("x" * 255) == "x" * 255
    assert idempotency.validate_key(str(uuid.uuid4()), anonymous=True)


# --- integration: the domain against PostgreSQL ---------------------------------------------


def _begin(services: Services, scope: Scope, key: str, fp: bytes | None, **kw: Any) -> Any:
    return idempotency.begin(
        services.db, secret=SECRET, scope=scope, key=key, fingerprint=fp, user_id=None,
        lease_seconds=kw.pop("lease", 60), **kw,
    )  # fmt: skip


@pytest.mark.integration
def test_claim_replay_mismatch_and_conflict(services: Services) -> None:
    scope = Scope("anonymous", "POST", f"/test/{uuid.uuid4()}")
    claim = _begin(services, scope, "key-1", b"a" * 32)
    assert isinstance(claim, Claim)
    with pytest.raises(RequestInProgress) as running:
        _begin(services, scope, "key-1", b"a" * 32, retry_after=7)
    assert running.value.headers["Retry-After"] == "7"
    with pytest.raises(IdempotencyKeyReused):
        _begin(services, scope, "key-1", b"b" * 32)
    claim.finish(StoredReply(201, {"Location": "/here"}, b"{}"))
    replay = _begin(services, scope, "key-1", b"a" * 32)
    assert isinstance(replay, Replay)
    assert replay.reply == StoredReply(201, {"Location": "/here"}, b"{}")
    with pytest.raises(IdempotencyKeyReused):
        _begin(services, scope, "key-1", b"b" * 32)


@pytest.mark.integration
def test_a_dead_claims_lease_expires_and_a_retry_takes_over(services: Services) -> None:
    scope = Scope("anonymous", "POST", f"/test/{uuid.uuid4()}")
    dead = _begin(services, scope, "key", None, lease=5)
    assert isinstance(dead, Claim)
    dead._stop_heartbeat()  # the process 'died': nobody renews the lease
    with pytest.raises(RequestInProgress):
        _begin(services, scope, "key", None)
    time.sleep(5.5)
    taker = _begin(services, scope, "key", None)
    assert isinstance(taker, Claim)
    dead.finish(StoredReply(201, {}, b"late"))  # the zombie's answer does not count
    taker.finish(StoredReply(201, {}, b"taker"))
    replay = _begin(services, scope, "key", None)
    assert isinstance(replay, Replay) and replay.reply.body == b"taker"


@pytest.mark.integration
def test_a_live_claim_is_renewed_past_its_lease(services: Services) -> None:
    scope = Scope("anonymous", "POST", f"/test/{uuid.uuid4()}")
    claim = _begin(services, scope, "key", None, lease=5)
    time.sleep(7)  # longer than the lease: the heartbeat renewed it
    with pytest.raises(RequestInProgress):
        _begin(services, scope, "key", None)
    claim.release()
    assert isinstance(_begin(services, scope, "key", None), Claim)


@pytest.mark.integration
def test_expired_keys_are_purged_and_free_again(services: Services) -> None:
    scope = Scope("anonymous", "POST", f"/test/{uuid.uuid4()}")
    claim = _begin(services, scope, "old", b"a" * 32)
    claim.finish(StoredReply(200, {}, b"first"))
    hashed = idempotency.key_hash(scope, "old")
    services.db.execute(
        sql("UPDATE idempotency_keys SET expires_at = now() - interval '1 second' "
            "WHERE key_hash = :k"), {"k": hashed},
    )  # fmt: skip
    assert isinstance(_begin(services, scope, "old", b"b" * 32), Claim)  # a new request now
    other = Scope("anonymous", "POST", f"/test/{uuid.uuid4()}")
    _begin(services, other, "old", None).finish(StoredReply(200, {}, b""))
    services.db.execute(
        sql("UPDATE idempotency_keys SET expires_at = now() - interval '1 second' "
            "WHERE key_hash = :k"), {"k": idempotency.key_hash(other, "old")},
    )  # fmt: skip
    assert sweep(services, 3600).idempotency_keys_purged >= 1
    rows = services.db.execute(
        sql("SELECT 1 FROM idempotency_keys WHERE key_hash = :k"),
        {"k": idempotency.key_hash(other, "old")},
    )
    assert rows == []


# --- end to end through the router -------------------------------------------------------


def post_user(client: Client, key: str, name: str = "Idem") -> requests.Response:
    return client.session.post(
        f"{client.base_url}/users", json={"name": name}, headers={"Idempotency-Key": key},
        timeout=30,
    )  # fmt: skip


@pytest.mark.e2e
def test_create_user_replays_and_the_database_holds_no_token(
    client: Client, services: Services
) -> None:
    key = str(uuid.uuid4())
    first = post_user(client, key)
    assert first.status_code == 201
    replay = post_user(client, key)
    assert replay.status_code == 201
    assert replay.json() == first.json()
    assert replay.headers["Cache-Control"] == "no-store"
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    user = first.json()
    # One user, whose token works.
    assert client.upload(user, wavgen.wav(seconds=0.2)).status_code == 201
    mismatch = post_user(client, key, name="Other name")
    assert mismatch.status_code == 422
    assert mismatch.json()["type"] == "urn:record-service:problem:idempotency-key-reused"
    assert post_user(client, "x" * 256).status_code == 422
    assert post_user(client, "short").status_code == 422  # anonymous: a guessable key
    # A dump of the table: no token, no raw key, in any form.
    rows = services.db.execute(_ALL_ROWS, {"user": uuid.UUID(user["id"])})
    mine = [r for r in rows if r.user_id == uuid.UUID(user["id"])]
    assert len(mine) == 1 and mine[0].state == "done"
    token = user["token"]
    needles = (token.encode(), uuid.UUID(token).bytes, token.replace("-", "").encode(),
               key.encode(), uuid.UUID(key).bytes)  # fmt: skip
    for row in rows:
        dump = b"|".join(bytes(v) if isinstance(v, bytes | memoryview) else str(v).encode()
                         for v in row)  # fmt: skip
        for needle in needles:
            assert needle not in dump


def upload_with_key(
    client: Client, user: dict[str, str], key: str, wav: bytes, **kw: Any
) -> requests.Response:
    return client.session.post(
        f"{client.base_url}/records",
        data={"user": user["id"], "token": user["token"]},
        files={"file": ("take.wav", wav, "audio/wav")},
        headers={"Idempotency-Key": key},
        timeout=120,
        **kw,
    )


def record_ids(client: Client, user: dict[str, str]) -> list[str]:
    response = client.session.get(
        f"{client.base_url}/records", params={"user": user["id"], "limit": "100"},
        headers={"Authorization": f"Bearer {user['token']}"}, timeout=30,
    )  # fmt: skip
    return [r["id"] for r in response.json()["records"]]


@pytest.mark.e2e
def test_upload_replays_without_converting_again(client: Client) -> None:
    alice, bob = client.create_user("Alice"), client.create_user("Bob")
    wav = wavgen.wav(seconds=0.5)
    first = upload_with_key(client, alice, "take-1", wav)
    assert first.status_code == 201, first.text
    replay = upload_with_key(client, alice, "take-1", wav)
    assert replay.status_code == 201
    assert replay.json() == first.json()
    assert replay.headers["Location"] == first.headers["Location"]
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert record_ids(client, alice) == [first.json()["id"]]
    other_bytes = wavgen.wav(seconds=0.6)
    assert upload_with_key(client, alice, "take-1", other_bytes).status_code == 422
    assert record_ids(client, alice) == [first.json()["id"]]
    # The same key of another caller is another key.
    bobs = upload_with_key(client, bob, "take-1", wav)
    assert bobs.status_code == 201 and bobs.json()["id"] != first.json()["id"]
    # A stored refusal replays too (the same bytes would fail again).
    bad = upload_with_key(client, alice, "bad-1", b"RIFF....WAVEjunk" * 10)
    assert bad.status_code in (415, 422)
    again = upload_with_key(client, alice, "bad-1", b"RIFF....WAVEjunk" * 10)
    assert again.status_code == bad.status_code and again.json() == bad.json()
    assert again.headers["Idempotent-Replayed"] == "true"


@pytest.mark.e2e
def test_a_repeat_while_the_first_runs_is_409_with_retry_after(client: Client) -> None:
    user = client.create_user("Impatient")
    wav = wavgen.wav(seconds=2.0)
    release = threading.Event()
    started = threading.Event()

    def body() -> Iterator[bytes]:
        yield wav[:65536]
        started.set()
        assert release.wait(60)
        yield wav[65536:]

    result: dict[str, requests.Response] = {}

    def first() -> None:
        result["r"] = requests.post(
            f"{client.base_url}/records", params={"user": user["id"]}, data=body(),
            headers={"Authorization": f"Bearer {user['token']}", "Content-Type": "audio/wav",
                     "Idempotency-Key": "slow"}, timeout=120,
        )  # fmt: skip

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(30)
    time.sleep(0.5)
    try:
        repeat = client.session.post(
            f"{client.base_url}/records", params={"user": user["id"]}, data=wav,
            headers={"Authorization": f"Bearer {user['token']}", "Content-Type": "audio/wav",
                     "Idempotency-Key": "slow"}, timeout=120,
        )  # fmt: skip
    finally:
        release.set()
        thread.join(120)
    assert repeat.status_code == 409, repeat.text
    assert int(repeat.headers["Retry-After"]) >= 1
    assert repeat.headers["Content-Type"] == "application/problem+json"
    assert result["r"].status_code == 201
    after = client.session.post(
        f"{client.base_url}/records", params={"user": user["id"]}, data=wav,
        headers={"Authorization": f"Bearer {user['token']}", "Content-Type": "audio/wav",
                 "Idempotency-Key": "slow"}, timeout=120,
    )  # fmt: skip
    assert after.status_code == 201 and after.json() == result["r"].json()
    assert record_ids(client, user) == [result["r"].json()["id"]]


@pytest.mark.e2e
def test_direct_upload_start_and_completion_replay(client: Client) -> None:
    user, other = client.create_user("Direct"), client.create_user("Other")
    auth = {"Authorization": f"Bearer {user['token']}"}

    def start(who: dict[str, str], key: str) -> requests.Response:
        return client.session.post(
            f"{client.base_url}/records/uploads", json={"user": who["id"]},
            headers={"Authorization": f"Bearer {who['token']}", "Idempotency-Key": key},
            timeout=30,
        )  # fmt: skip

    first = start(user, "start-1")
    assert first.status_code == 201
    assert start(user, "start-1").json()["id"] == first.json()["id"]
    assert start(other, "start-1").json()["id"] != first.json()["id"]  # no collision
    form = first.json()["upload"]
    sent = requests.post(
        form["url"], data=form["fields"],
        files={form["file_field"]: ("take.wav", wavgen.wav(seconds=0.5), "audio/wav")},
        timeout=60,
    )  # fmt: skip
    assert sent.status_code in (200, 201, 204)

    def complete(key: str) -> requests.Response:
        return client.session.post(
            first.json()["complete_url"], params={"user": user["id"]},
            headers={**auth, "Idempotency-Key": key}, timeout=120,
        )  # fmt: skip

    done = complete("complete-1")
    assert done.status_code in (201, 202), done.text
    again = complete("complete-1")
    assert again.status_code == done.status_code
    assert again.json() == done.json()
    assert again.headers.get("Location") == done.headers.get("Location")


@pytest.mark.e2e
def test_rotation_replays_to_a_client_that_lost_the_answer(client: Client) -> None:
    user, other = client.create_user("Lost"), client.create_user("Other")
    url = f"{client.base_url}/users/{user['id']}/token"
    old = {"Authorization": f"Bearer {user['token']}", "Idempotency-Key": "rotate-1"}
    first = client.session.post(url, headers=old, timeout=30)
    assert first.status_code == 200
    # The answer was lost: the client still has only the old token, and gets the same new one.
    replay = client.session.post(url, headers=old, timeout=30)
    assert replay.status_code == 200 and replay.json() == first.json()
    # The old token is otherwise dead, and no one else learns anything of the key.
    assert client.session.post(
        url, headers={"Authorization": f"Bearer {user['token']}"}, timeout=30
    ).status_code == 401  # fmt: skip
    stranger = client.session.post(
        url, headers={"Authorization": f"Bearer {other['token']}", "Idempotency-Key": "rotate-1"},
        timeout=30,
    )  # fmt: skip
    assert stranger.status_code == 401
    fresh = {"Authorization": f"Bearer {first.json()['token']}", "Idempotency-Key": "rotate-1"}
    assert client.session.post(url, headers=fresh, timeout=30).status_code == 422


@pytest.mark.e2e
def test_keys_expire_after_a_day(client: Client, services: Services) -> None:
    user = client.create_user("Expiry")
    url = f"{client.base_url}/records/uploads"
    headers = {"Authorization": f"Bearer {user['token']}", "Idempotency-Key": "day"}
    first = client.session.post(url, json={"user": user["id"]}, headers=headers, timeout=30)
    services.db.execute(
        sql("UPDATE idempotency_keys SET expires_at = :at WHERE user_id = :u"),
        {"at": datetime.now(UTC) - timedelta(seconds=1), "u": uuid.UUID(user["id"])},
    )
    second = client.session.post(url, json={"user": user["id"]}, headers=headers, timeout=30)
    assert second.status_code == 201 and second.json()["id"] != first.json()["id"]
