"""Idempotency-Key on every POST: replays, mismatches, in-flight repeats, leases, scopes, and
what a database dump shows (common.domain.idempotency, common.http.idempotency).

"""

from __future__ import annotations

import http.client
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from common.adapters.db import sql
from common.platform.runtime import Services

from devstack import wavgen
from tests.support import Client

SECRET = "s" * 40
_ALL_ROWS = sql(
    "SELECT key_hash, user_id, fingerprint, state, response FROM idempotency_keys "
    "WHERE user_id = :user OR user_id IS NULL"
)


def post_user(client: Client, key: str, name: str = "Idem") -> requests.Response:
    return client.session.post(
        f"{client.base_url}/users", json={"name": name}, headers={"Idempotency-Key": key},
        timeout=30,
    )  # fmt: skip


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


def test_rotation_replays_to_a_client_that_lost_the_answer(client: Client) -> None:
    user, other = client.create_user("Lost"), client.create_user("Other")
    url = f"{client.base_url}/users/{user['id']}/token"
    key = str(uuid.uuid4())
    old = {"Authorization": f"Bearer {user['token']}", "Idempotency-Key": key}
    first = client.session.post(url, headers=old, timeout=30)
    assert first.status_code == 200
    # The answer was lost: the client still has only the old token, and gets the same new one.
    replay = client.session.post(url, headers=old, timeout=30)
    assert replay.status_code == 200 and replay.json() == first.json()
    # The old token is otherwise dead, and no one else learns anything of the key.
    assert client.session.post(
        url, headers={**old, "Idempotency-Key": str(uuid.uuid4())}, timeout=30
    ).status_code == 401  # fmt: skip
    stranger = client.session.post(
        url, headers={"Authorization": f"Bearer {other['token']}", "Idempotency-Key": key},
        timeout=30,
    )  # fmt: skip
    assert stranger.status_code == 401
    fresh = {"Authorization": f"Bearer {first.json()['token']}", "Idempotency-Key": key}
    assert client.session.post(url, headers=fresh, timeout=30).status_code == 422
    # A rotation key is the replay's second secret: as long as POST /users's (16+ characters).
    short = client.session.post(url, headers={**fresh, "Idempotency-Key": "rotate-1"}, timeout=30)
    assert short.status_code == 422, short.text


def test_rotation_replay_window_is_minutes(client: Client, services: Services) -> None:
    user = client.create_user("Window")
    url = f"{client.base_url}/users/{user['id']}/token"
    old = {"Authorization": f"Bearer {user['token']}", "Idempotency-Key": str(uuid.uuid4())}
    assert client.session.post(url, headers=old, timeout=30).status_code == 200
    left = services.db.execute(
        sql("SELECT expires_at - now() AS left FROM idempotency_keys WHERE user_id = :u"),
        {"u": uuid.UUID(user["id"])},
    )
    assert [row.left <= timedelta(minutes=5) for row in left] == [True]
    services.db.execute(
        sql("UPDATE idempotency_keys SET expires_at = now() WHERE user_id = :u"),
        {"u": uuid.UUID(user["id"])},
    )
    assert client.session.post(url, headers=old, timeout=30).status_code == 401  # window over


@pytest.mark.parametrize(
    ("headers", "status", "words"),
    [
        ([("Idempotency-Key", "a" * 20), ("Idempotency-Key", "b" * 20)], 400, "one"),
        ([("Idempotency-Key", "ключ-ключ-ключ-ключ")], 422, "ASCII"),
    ],
)
def test_bad_key_headers_are_refused(
    client: Client, headers: list[tuple[str, str]], status: int, words: str
) -> None:
    conn = http.client.HTTPConnection(client.base_url.removeprefix("http://"), timeout=30)
    try:
        body = b'{"name": "Dup"}'
        conn.putrequest("POST", "/users")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        for name, value in headers:
            conn.putheader(name, value.encode())
        conn.endheaders(body)
        answer = conn.getresponse()
        assert answer.status == status
        assert words in answer.read().decode()
    finally:
        conn.close()


def test_an_unknown_user_with_a_key_is_the_same_401_as_a_wrong_token(client: Client) -> None:
    user = client.create_user("Known")
    answers = [
        client.session.post(
            f"{client.base_url}/users/{target}/token",
            headers={"Authorization": f"Bearer {user['token']}", **key},
            timeout=30,
        )
        for target in (uuid.uuid4(), user["id"])
        for key in ({"Idempotency-Key": str(uuid.uuid4())},)
    ]
    assert [a.status_code for a in answers] == [401, 200]
    wrong = client.session.post(
        f"{client.base_url}/users/{user['id']}/token",
        headers={"Authorization": f"Bearer {uuid.uuid4()}", "Idempotency-Key": str(uuid.uuid4())},
        timeout=30,
    )
    same = ("type", "title", "status", "detail")
    assert wrong.status_code == 401
    assert {k: wrong.json()[k] for k in same} == {k: answers[0].json()[k] for k in same}


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
