"""What the README's Security section promises, checked against the running stack."""

from __future__ import annotations

import hashlib
import threading
import uuid

import requests
from common.adapters.db import sql
from common.domain.records import get_record
from common.platform.runtime import Services
from devstack.wavgen import wav

from devstack import NativeStack
from tests.support import Client

_USER_ROW = sql("SELECT id, name, token_hash, created_at FROM users WHERE id = :id")


def test_tokens_are_random_uuid4s_stored_only_as_hashes(client: Client, services: Services) -> None:
    users = [client.create_user(f"Token {n}") for n in range(20)]
    tokens = [u["token"] for u in users]
    assert len(set(tokens)) == len(tokens)
    for user in users:
        token = uuid.UUID(user["token"])
        assert token.version == 4 and token.variant == uuid.RFC_4122  # 122 random bits
        assert uuid.UUID(user["id"]).version == 4
        (stored,) = services.db.execute(_USER_ROW, {"id": uuid.UUID(user["id"])})
        assert stored.token_hash == hashlib.sha256(user["token"].encode()).digest()
        assert user["token"].encode() not in repr(stored).encode()


def test_no_cross_user_access(client: Client, services: Services) -> None:
    alice, bob = client.create_user("Alice"), client.create_user("Bob")
    uploaded = client.upload(alice, wav(seconds=0.2))
    assert uploaded.status_code == 201
    record = uploaded.json()
    assert uuid.UUID(record["id"]).version == 4
    base = client.base_url
    mine = client.session.get(record["url"], timeout=30)
    assert mine.status_code == 200
    # Bob's id with Alice's record: the same 404 as a record that does not exist.
    for params in (
        {"id": record["id"], "user": bob["id"]},
        {"id": str(uuid.uuid4()), "user": alice["id"]},
    ):
        for method in ("GET", "HEAD"):
            response = client.session.request(method, f"{base}/record", params=params, timeout=30)
            assert response.status_code == 404
        body = client.session.get(f"{base}/record", params=params, timeout=30).json()
        assert body["detail"] == "No record with this id exists for this user."
    # Bob's token cannot upload as Alice, and an unknown user gets the same 401.
    for user_id, token in ((alice["id"], bob["token"]), (str(uuid.uuid4()), bob["token"])):
        response = client.upload({"id": user_id, "token": token}, wav(seconds=0.2))
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert response.json()["detail"] == "The user id and access token do not match."
    # Uploads never overwrite: a second upload is a new record, the first is unchanged.
    again = client.upload(alice, wav(seconds=0.4))
    assert again.json()["id"] != record["id"]
    first = get_record(services.db, uuid.UUID(record["id"]))
    assert first is not None and first.size_bytes == record["size_bytes"]


def test_tokens_never_reach_the_logs(client: Client, stack: NativeStack) -> None:
    user = client.create_user("Quiet")
    assert client.upload(user, wav(seconds=0.2)).status_code == 201
    assert client.upload({"id": user["id"], "token": "wrong"}, b"RIFF").status_code == 401
    raw = client.session.post(
        f"{client.base_url}/records",
        params={"user": user["id"]},
        data=b"not a wav",
        headers={"Authorization": f"Bearer {user['token']}", "Content-Type": "audio/wav"},
        timeout=30,
    )
    assert raw.status_code == 415
    logs = b"".join(path.read_bytes() for path in stack.logs.glob("*.log"))
    assert user["id"].encode() in logs or len(logs) > 0
    assert user["token"].encode() not in logs
    assert user["token"].replace("-", "").encode() not in logs


def _erase_at_once(base_url: str, user: dict[str, str]) -> list[requests.Response]:
    """Two DELETE /users/<id> with the user's token, sent at the same moment."""
    barrier = threading.Barrier(2)
    answers: list[requests.Response] = []

    def erase() -> None:
        barrier.wait()
        answers.append(
            requests.delete(
                f"{base_url}/users/{user['id']}",
                headers={"Authorization": f"Bearer {user['token']}"},
                timeout=60,
            )
        )

    pair = [threading.Thread(target=erase) for _ in range(2)]
    for thread in pair:
        thread.start()
    for thread in pair:
        thread.join()
    return answers


def test_two_concurrent_erasures_give_one_204_and_one_401(client: Client) -> None:
    """Both are authenticated when they start; one erases, the other finds the token dead and
    is answered 401 as docs/lifecycle.md says (never 404 or a 5xx). Ten pairs, for the race."""
    for n in range(10):
        user = client.create_user(f"Erased {n}")
        assert client.upload(user, wav(seconds=0.2)).status_code == 201
        answers = _erase_at_once(client.base_url, user)
        assert sorted(a.status_code for a in answers) == [204, 401], [a.text for a in answers]
        (refused,) = (a for a in answers if a.status_code == 401)
        assert refused.headers["Content-Type"] == "application/problem+json"
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        assert client.upload(user, wav(seconds=0.2)).status_code == 401
