"""Records with a lifecycle, end to end through the router on the native stack: list, delete,
erase a user, rotate a token (docs/lifecycle.md). Idempotency keys are in test_idempotency.py.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from common.adapters.db import sql
from common.adapters.storage import ObjectMissing
from common.domain.erasure import erase_user, user_prefixes
from common.domain.records import object_key
from common.domain.uploads import pending_key
from common.ops.sweep import sweep
from common.platform.runtime import Services

from devstack import ScratchStack, wavgen
from tests.support import Client

UPLOAD_FIELDS = {
    "id", "url", "duration_seconds", "size_bytes", "bitrate_kbps", "sample_rate", "channels",
    "vbr_quality", "tags", "filename",
}  # fmt: skip
_INSERT_RECORD = sql(
    "INSERT INTO records (id, user_id, object_key, filename, size_bytes, etag, duration_seconds, "
    "bitrate_kbps, sample_rate, channels, created_at) VALUES (:id, :user_id, :object_key, "
    "'row.mp3', 3, 'etag', 0.1, 192, 44100, 1, :created_at)"
)
_COUNT = {
    table: sql(f"SELECT count(*) FROM {table} WHERE user_id = :user")  # noqa: S608
    for table in ("users", "records", "idempotency_keys", "erasures")
}
_COUNT["users"] = sql("SELECT count(*) FROM users WHERE id = :user")


def bearer(user: dict[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {user['token']}"}


def list_page(client: Client, user: dict[str, str], **params: Any) -> requests.Response:
    return client.session.get(
        f"{client.base_url}/records",
        params={"user": user["id"], **params},
        headers=bearer(user),
        timeout=30,
    )


def delete_record(client: Client, user: dict[str, str], record_id: str) -> requests.Response:
    return client.session.delete(
        f"{client.base_url}/record",
        params={"id": record_id, "user": user["id"]},
        headers=bearer(user),
        timeout=30,
    )


def insert_rows(services: Services, user_id: str, created: list[datetime]) -> list[str]:
    """Record rows straight into PostgreSQL (no objects): listing needs only rows."""
    ids = []
    for at in created:
        record_id = uuid.uuid4()
        services.db.execute(
            _INSERT_RECORD,
            {
                "id": record_id,
                "user_id": uuid.UUID(user_id),
                "object_key": object_key(uuid.UUID(user_id), record_id),
                "created_at": at,
            },
        )
        ids.append(str(record_id))
    return ids


def count(services: Services, table: str, user_id: str) -> int:
    return int(services.db.execute(_COUNT[table], {"user": uuid.UUID(user_id)})[0][0])


def keys_under(services: Services, user_id: str) -> list[str]:
    found: list[str] = []
    for prefix in user_prefixes(uuid.UUID(user_id)):
        for page in services.storage.list_keys(prefix):
            found.extend(page)
    return found


# --- list -------------------------------------------------------------------------------


def test_list_is_newest_first_in_pages_with_the_upload_fields(client: Client) -> None:
    user = client.create_user("Lister")
    uploaded = [client.upload(user, wavgen.wav(seconds=0.2), f"t{i}.wav").json() for i in range(3)]
    first = list_page(client, user, limit=2)
    assert first.status_code == 200, first.text
    assert first.headers["Cache-Control"] == "no-store"
    body = first.json()
    assert [r["id"] for r in body["records"]] == [uploaded[2]["id"], uploaded[1]["id"]]
    item = body["records"][0]
    assert set(item) == UPLOAD_FIELDS | {"created_at"}
    assert {k: item[k] for k in UPLOAD_FIELDS} == uploaded[2]
    created = datetime.fromisoformat(item["created_at"])
    assert item["created_at"].endswith("Z") and created.tzinfo is not None
    assert abs(datetime.now(UTC) - created) < timedelta(minutes=5)
    assert body["next_cursor"]
    second = list_page(client, user, limit=2, cursor=body["next_cursor"]).json()
    assert [r["id"] for r in second["records"]] == [uploaded[0]["id"]]
    assert second["next_cursor"] is None
    # Default limit 20: all three on one page.
    assert len(list_page(client, user).json()["records"]) == 3


def test_list_refuses_bad_input_and_shows_only_the_callers_records(client: Client) -> None:
    alice, bob = client.create_user("Alice"), client.create_user("Bob")
    client.upload(alice, wavgen.wav(seconds=0.2))
    client.upload(alice, wavgen.wav(seconds=0.2))
    assert list_page(client, bob).json() == {"records": [], "next_cursor": None}
    wrong = client.session.get(
        f"{client.base_url}/records", params={"user": alice["id"]}, headers=bearer(bob),
        timeout=30,
    )  # fmt: skip
    assert wrong.status_code == 401
    assert wrong.headers["Content-Type"] == "application/problem+json"
    no_token = client.session.get(
        f"{client.base_url}/records", params={"user": alice["id"]}, timeout=30
    )
    assert no_token.status_code == 401
    malformed = list_page(client, {**alice, "id": "not-a-uuid"})
    assert malformed.status_code == 422
    for limit in ("0", "101", "abc", "-1", "1.5"):
        response = list_page(client, alice, limit=limit)
        assert response.status_code == 422, limit
        assert "'limit'" in response.json()["detail"]
    cursor = list_page(client, alice, limit=1).json()["next_cursor"]
    assert cursor
    forged = cursor[:-2] + ("AA" if not cursor.endswith("AA") else "BB")
    for bad in (forged, "garbage", "a.b.c", cursor.split(".")[0]):
        response = list_page(client, alice, cursor=bad)
        assert response.status_code == 422, bad
        assert response.json()["type"] == "urn:record-service:problem:invalid-cursor"
    # Alice's cursor is not Bob's.
    assert list_page(client, bob, cursor=cursor).status_code == 422


def test_list_pagination_never_skips_or_repeats_under_concurrent_writes(
    client: Client, services: Services
) -> None:
    """Keyset pages while rows are inserted (newer and older than the cursor) and deleted."""
    user = client.create_user("Busy")
    base = datetime.now(UTC) - timedelta(hours=1)
    # Ties on created_at on purpose: the id orders them.
    stable = insert_rows(
        services, user["id"], [base + timedelta(seconds=i // 3) for i in range(60)]
    )
    doomed = insert_rows(services, user["id"], [base + timedelta(seconds=i) for i in range(20)])
    stop = threading.Event()
    inserted: list[str] = []

    def writer() -> None:
        n = 0
        while not stop.is_set():
            at = datetime.now(UTC) if n % 2 else base + timedelta(seconds=n % 30, microseconds=7)
            inserted.extend(insert_rows(services, user["id"], [at]))
            if doomed:
                services.db.execute(
                    sql("DELETE FROM records WHERE id = :id"), {"id": uuid.UUID(doomed.pop())}
                )
            n += 1
            time.sleep(0.005)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    seen: list[str] = []
    cursor = None
    try:
        while True:
            params: dict[str, Any] = {"limit": 7}
            if cursor:
                params["cursor"] = cursor
            page = list_page(client, user, **params)
            assert page.status_code == 200, page.text
            body = page.json()
            seen.extend(r["id"] for r in body["records"])
            cursor = body["next_cursor"]
            time.sleep(0.01)
            if cursor is None:
                break
    finally:
        stop.set()
        thread.join()
    assert inserted, "the writer never ran during the pagination"
    assert len(seen) == len(set(seen)), "a record was repeated across pages"
    assert set(stable) <= set(seen), "a record that existed throughout was skipped"


# --- delete a record --------------------------------------------------------------------


@pytest.fixture(params=["accel", "stream", "redirect"])
def any_download_mode(request: pytest.FixtureRequest, stack: ScratchStack) -> Iterator[str]:
    with stack.download_mode(request.param) as mode:
        yield mode


def test_deleted_record_is_404_at_once_in_every_download_mode(
    client: Client, services: Services, any_download_mode: str
) -> None:
    user, other = client.create_user("Deleter"), client.create_user("Other")
    record = client.upload(user, wavgen.wav(seconds=1.0)).json()
    url = record["url"]
    for _ in range(2):  # accel: the second download comes from the router's cache
        got = client.session.get(url, timeout=30)
        assert got.status_code == 200 and len(got.content) == record["size_bytes"]
    presigned = None
    if any_download_mode == "redirect":
        presigned = client.session.get(url, allow_redirects=False, timeout=30).headers["Location"]
    key = object_key(uuid.UUID(user["id"]), uuid.UUID(record["id"]))
    # Not the owner, or not a valid token: nothing is deleted.
    assert delete_record(client, other, record["id"]).status_code == 404
    stranger = client.session.delete(
        f"{client.base_url}/record", params={"id": record["id"], "user": user["id"]},
        headers=bearer(other), timeout=30,
    )  # fmt: skip
    assert stranger.status_code == 401
    assert client.session.get(url, timeout=30).status_code == 200

    deleted = delete_record(client, user, record["id"])
    assert deleted.status_code == 204, deleted.text
    assert deleted.content == b""
    for method in ("GET", "HEAD"):
        gone = client.session.request(method, url, allow_redirects=False, timeout=30)
        assert gone.status_code == 404, (method, gone.status_code)
        assert "Cache-Control" not in gone.headers or "max-age" not in gone.headers["Cache-Control"]
    ranged = client.session.get(url, headers={"Range": "bytes=0-9"}, timeout=30)
    assert ranged.status_code == 404
    with pytest.raises(ObjectMissing), services.storage.translate_errors():
        services.storage.client.head_object(Bucket=services.storage.bucket, Key=key)
    if presigned is not None:  # a link handed out before: the object behind it is gone
        assert requests.get(presigned, timeout=30).status_code == 404
    again = delete_record(client, user, record["id"])
    assert again.status_code == 404
    assert again.json()["detail"] == "No record with this id exists for this user."
    assert delete_record(client, user, "not-a-uuid").status_code == 422
    unknown = delete_record(client, user, str(uuid.uuid4()))
    assert unknown.status_code == 404 and unknown.json() == {
        **again.json(), "instance": "/record"
    }  # fmt: skip
    assert record["id"] not in [r["id"] for r in list_page(client, user).json()["records"]]


def test_delete_during_a_download(client: Client) -> None:
    """A download in flight ends (whole or cut short); the next request is 404."""
    user = client.create_user("Listener")
    record = client.upload(user, wavgen.wav(seconds=30.0, channels=2)).json()
    assert record["size_bytes"] > 256 * 1024
    with client.session.get(record["url"], stream=True, timeout=30) as download:
        assert download.status_code == 200
        first = next(download.iter_content(16 * 1024))
        assert first
        assert delete_record(client, user, record["id"]).status_code == 204
        assert client.session.get(record["url"], timeout=30).status_code == 404
        received = len(first)
        try:
            for chunk in download.iter_content(64 * 1024):
                received += len(chunk)
        except requests.RequestException:
            pass  # cut short: allowed, the record is gone
        assert received <= record["size_bytes"]
    assert client.session.head(record["url"], timeout=30).status_code == 404


def test_sweep_removes_the_object_of_a_delete_that_crashed_halfway(
    client: Client, services: Services
) -> None:
    """Row deleted, object not (a crash in between): make sweep removes the orphan."""
    user = client.create_user("Crash")
    record = client.upload(user, wavgen.wav(seconds=0.2)).json()
    key = object_key(uuid.UUID(user["id"]), uuid.UUID(record["id"]))
    services.db.execute(sql("DELETE FROM records WHERE id = :id"), {"id": uuid.UUID(record["id"])})
    assert client.session.get(record["url"], timeout=30).status_code == 404
    result = sweep(services, 0, now=datetime.now(UTC) + timedelta(seconds=5))
    assert key in result.orphans_deleted


# --- erase a user -----------------------------------------------------------------------


def test_erase_a_user_with_1000_records(
    client: Client, services: Services, stack: ScratchStack
) -> None:
    user = client.create_user("Eraser")
    survivor = client.create_user("Survivor")
    kept = client.upload(survivor, wavgen.wav(seconds=0.2)).json()
    user_id = uuid.UUID(user["id"])
    real = client.upload(user, wavgen.wav(seconds=0.2)).json()
    ids = insert_rows(services, user["id"], [datetime.now(UTC)] * 999)
    storage = services.storage

    def put(record_id: str) -> None:
        storage.client.put_object(
            Bucket=storage.bucket, Key=object_key(user_id, uuid.UUID(record_id)), Body=b"mp3"
        )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, ids))
    pending = pending_key(user_id, uuid.uuid4())
    storage.client.put_object(Bucket=storage.bucket, Key=pending, Body=b"RIFF")
    keyed = client.session.post(
        f"{client.base_url}/records/uploads", json={"user": user["id"]},
        headers={**bearer(user), "Idempotency-Key": "erase-me"}, timeout=30,
    )  # fmt: skip
    assert keyed.status_code == 201
    assert len(keys_under(services, user["id"])) == 1001
    assert count(services, "records", user["id"]) == 1000
    assert count(services, "idempotency_keys", user["id"]) == 1

    started = time.monotonic()
    erased = client.session.delete(
        f"{client.base_url}/users/{user['id']}", headers=bearer(user), timeout=60
    )
    elapsed = time.monotonic() - started
    assert erased.status_code == 204, erased.text
    assert elapsed < 20, f"erasing 1,000 records took {elapsed:.1f}s"
    # The token is dead at once, everywhere.
    assert list_page(client, user).status_code == 401
    assert client.upload(user, wavgen.wav(seconds=0.2)).status_code == 401
    assert client.session.get(real["url"], timeout=30).status_code == 404
    again = client.session.delete(
        f"{client.base_url}/users/{user['id']}", headers=bearer(user), timeout=30
    )
    assert again.status_code == 401
    # Bucket and database hold nothing of the user; only the erasure marker, until the sweep.
    assert keys_under(services, user["id"]) == []
    for table in ("users", "records", "idempotency_keys"):
        assert count(services, table, user["id"]) == 0, table
    assert count(services, "erasures", user["id"]) == 1
    later = datetime.now(UTC) + timedelta(seconds=services.settings.presign_expires_seconds + 1)
    assert user["id"] in sweep(services, 3600, now=later).erasures_finished
    assert count(services, "erasures", user["id"]) == 0
    # The other user is untouched.
    assert client.session.get(kept["url"], timeout=30).status_code == 200
    assert [r["id"] for r in list_page(client, survivor).json()["records"]] == [kept["id"]]


def test_an_erasure_past_its_deadline_is_finished_by_the_sweep(
    client: Client, services: Services
) -> None:
    user = client.create_user("Slow")
    user_id = uuid.UUID(user["id"])
    ids = insert_rows(services, user["id"], [datetime.now(UTC)] * 3)
    for record_id in ids:
        services.storage.client.put_object(
            Bucket=services.storage.bucket, Key=object_key(user_id, uuid.UUID(record_id)), Body=b"x"
        )
    pending = pending_key(user_id, uuid.uuid4())
    services.storage.client.put_object(Bucket=services.storage.bucket, Key=pending, Body=b"x")
    hurried = services.replace(settings=dataclasses.replace(
        services.settings, erase_deadline_seconds=1e-9
    ))  # fmt: skip
    # A 'crash' right after the first batch: a listing page is deleted, the rest is left.
    result = erase_user(hurried.db, hurried.storage, hurried.settings, user_id)
    assert not result.complete
    assert keys_under(services, user["id"]) == [pending]  # the records' page went first
    assert count(services, "users", user["id"]) == 0
    assert list_page(client, user).status_code == 401
    sweep(services, 3600)  # the marker is young: objects go, the marker stays
    assert keys_under(services, user["id"]) == []
    assert count(services, "erasures", user["id"]) == 1


def test_erase_refuses_others_and_bad_ids(client: Client) -> None:
    alice, bob = client.create_user("Alice"), client.create_user("Bob")
    base = client.base_url
    assert (
        client.session.delete(
            f"{base}/users/{alice['id']}", headers=bearer(bob), timeout=30
        ).status_code
        == 401
    )
    assert client.session.delete(f"{base}/users/{alice['id']}", timeout=30).status_code == 401
    assert (
        client.session.delete(f"{base}/users/nope", headers=bearer(bob), timeout=30).status_code
        == 422
    )
    assert client.session.get(f"{base}/users/{alice['id']}", timeout=30).status_code == 405
    assert list_page(client, alice).status_code == 200


# --- rotate a token ---------------------------------------------------------------------


def rotate(client: Client, user: dict[str, str], **headers: str) -> requests.Response:
    return client.session.post(
        f"{client.base_url}/users/{user['id']}/token",
        headers={**bearer(user), "Idempotency-Key": str(uuid.uuid4()), **headers},
        timeout=30,
    )


def test_rotate_token(client: Client) -> None:
    user, other = client.create_user("Rotor"), client.create_user("Other")
    record = client.upload(user, wavgen.wav(seconds=0.2)).json()
    rotated = rotate(client, user)
    assert rotated.status_code == 200, rotated.text
    assert rotated.headers["Cache-Control"] == "no-store"
    new = rotated.json()["token"]
    assert set(rotated.json()) == {"token"} and str(uuid.UUID(new)) == new
    assert new != user["token"]
    old = user
    fresh = {**user, "token": new}
    assert list_page(client, old).status_code == 401
    assert client.upload(old, wavgen.wav(seconds=0.2)).status_code == 401
    assert rotate(client, old).status_code == 401
    assert list_page(client, fresh).status_code == 200
    assert client.upload(fresh, wavgen.wav(seconds=0.2)).status_code == 201
    # Records stay where they were.
    assert client.session.get(record["url"], timeout=30).status_code == 200
    assert rotate(client, {**user, "token": other["token"]}).status_code == 401
    assert rotate(client, {"id": "x", "token": other["token"]}).status_code == 422
    # The token may come as a body field too.
    by_field = client.session.post(
        f"{client.base_url}/users/{user['id']}/token",
        json={"token": new},
        headers={"Idempotency-Key": str(uuid.uuid4())},
        timeout=30,
    )
    assert by_field.status_code == 200
    # Without a key a lost answer could never be had again (the old token is dead): 400.
    keyless = client.session.post(
        f"{client.base_url}/users/{user['id']}/token", json={"token": by_field.json()["token"]},
        timeout=30,
    )  # fmt: skip
    assert keyless.status_code == 400
    assert keyless.json()["type"].endswith("idempotency-key-required")


def test_token_rotated_while_an_upload_streams(client: Client) -> None:
    """An upload authenticated at its start finishes; one that starts afterwards is refused."""
    user = client.create_user("Streamer")
    wav = wavgen.wav(seconds=3.0)
    authenticated = threading.Event()
    rotated = threading.Event()

    def body() -> Iterator[bytes]:
        yield wav[:65536]
        time.sleep(0.5)  # the function has read the header and authenticated by now
        authenticated.set()
        assert rotated.wait(30)
        for start in range(65536, len(wav), 65536):
            yield wav[start : start + 65536]

    result: dict[str, requests.Response] = {}

    def upload() -> None:
        result["r"] = requests.post(
            f"{client.base_url}/records", params={"user": user["id"]}, data=body(),
            headers={**bearer(user), "Content-Type": "audio/wav"}, timeout=120,
        )  # fmt: skip

    thread = threading.Thread(target=upload)
    thread.start()
    assert authenticated.wait(30)
    new = rotate(client, user)
    assert new.status_code == 200
    rotated.set()
    thread.join(120)
    assert result["r"].status_code == 201, result["r"].text
    assert client.upload(user, wav).status_code == 401
    fresh = {**user, "token": new.json()["token"]}
    assert result["r"].json()["id"] in [r["id"] for r in list_page(client, fresh).json()["records"]]


def test_token_rotated_during_a_direct_upload(client: Client) -> None:
    """The form handed out stays valid until it expires; completing needs the new token."""
    user = client.create_user("Direct")
    started = client.session.post(
        f"{client.base_url}/records/uploads", json={"user": user["id"]}, headers=bearer(user),
        timeout=30,
    ).json()  # fmt: skip
    new = rotate(client, user).json()["token"]
    form = started["upload"]
    sent = requests.post(
        form["url"], data=form["fields"],
        files={form["file_field"]: ("take.wav", wavgen.wav(seconds=0.5), "audio/wav")},
        timeout=60,
    )  # fmt: skip
    assert sent.status_code in (200, 201, 204), sent.text
    complete_url = started["complete_url"]
    stale = client.session.post(
        complete_url, params={"user": user["id"]}, headers=bearer(user), timeout=120
    )
    assert stale.status_code == 401
    done = client.session.post(
        complete_url, params={"user": user["id"]}, headers=bearer({"token": new}), timeout=120
    )
    assert done.status_code in (201, 202), done.text
