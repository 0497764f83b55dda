"""Integration: common's modules against the real PostgreSQL and SeaweedFS of the stack."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable

import pytest
import requests
from common.adapters.db import sql
from common.adapters.storage import ObjectMissing
from common.domain.erasure import erase_user
from common.domain.jobs import Outcome, run_job
from common.domain.new_records import create_record
from common.domain.records import delete_record, find_record, list_records
from common.domain.uploads import complete_upload, pending_key, start_upload, upload_status
from common.domain.users import authenticate, create_user
from common.errors import NotFound, Unauthorized
from common.platform.runtime import Services

from devstack import wavgen
from tests.support.stack_clients import RecordingQueue

ATTEMPTS = sql("SELECT attempts FROM uploads WHERE id = :id", idempotent=True)

MIB = 1024 * 1024


def keys_under(services: Services, prefix: str) -> list[str]:
    listing = services.storage.client.list_objects_v2(Bucket=services.storage.bucket, Prefix=prefix)
    return [item["Key"] for item in listing.get("Contents", [])]


def test_users_authenticate_only_with_their_own_token(services: Services) -> None:
    alice, bob = create_user(services.db, "Alice"), create_user(services.db, "Bob")
    assert authenticate(services.db, str(alice.id), alice.token) == alice.id
    assert authenticate(services.db, f"  {alice.id}  ", f" {alice.token.upper()} ") == alice.id
    for user_id, token in [
        (str(alice.id), bob.token),
        (str(bob.id), alice.token),
        (str(uuid.uuid4()), alice.token),
        (str(alice.id), ""),
        (str(alice.id), None),
    ]:
        with pytest.raises(Unauthorized):
            authenticate(services.db, user_id, token)


def test_tokens_are_stored_as_hashes(services: Services) -> None:
    from common.adapters.db import sql

    user = create_user(services.db, "Hashed")
    stored = services.db.execute(
        sql("SELECT token_hash FROM users WHERE id = :id"), {"id": user.id}
    )[0][0]
    assert len(stored) == 32
    assert user.token.encode() not in bytes(stored)


def test_multipart_writer_against_seaweedfs(services: Services) -> None:
    storage = services.storage
    key = f"it/{uuid.uuid4()}.mp3"
    writer = storage.open_writer(key)
    piece = bytes(range(256)) * 4096
    whole = piece * (storage.part_size // MIB + 3)  # more than one part
    size = storage.part_size
    parts = [whole[start : start + size] for start in range(0, len(whole), size)]
    for number, part in [*enumerate(parts, start=1)][1:]:  # part 1 last, as the conversion
        writer.write_part(number, part)
    writer.write_part(1, parts[0])
    assert keys_under(services, key) == []  # nothing visible before completion
    stored = writer.complete()
    assert stored.size == (storage.part_size // MIB + 3) * MIB
    body = b"".join(storage.open_read(key))
    assert body == piece * (storage.part_size // MIB + 3)
    assert b"".join(storage.open_read(key, (MIB - 2, MIB + 1))) == piece[-2:] + piece[:2]
    storage.delete(key)
    with pytest.raises(ObjectMissing):
        storage.open_read(key)


def test_aborted_multipart_upload_leaves_nothing(services: Services) -> None:
    key = f"it/{uuid.uuid4()}.mp3"
    writer = services.storage.open_writer(key)
    writer.write_part(2, bytes(services.storage.part_size + 100))
    writer.abort()
    assert keys_under(services, key) == []
    uploads = services.storage.client.list_multipart_uploads(Bucket=services.storage.bucket)
    assert all(u["Key"] != key for u in uploads.get("Uploads", []))


def test_record_is_object_and_row_together(services: Services) -> None:
    user = create_user(services.db, "Atomic")
    record = create_record(
        services.db,
        services.storage,
        services.settings,
        user_id=user.id,
        audio=iter([wavgen.wav(seconds=0.5)]),
        filename="atomic.wav",
    )
    found = find_record(services.db, str(record.id), str(user.id))
    assert found.object_key == f"users/{user.id}/records/{record.id}.mp3"
    assert keys_under(services, found.object_key) == [found.object_key]
    assert found.size_bytes == record.size_bytes
    with pytest.raises(NotFound):
        find_record(services.db, str(record.id), str(uuid.uuid4()))


def test_failed_row_insert_deletes_the_object(services: Services) -> None:
    """A record for a user id that no row matches: the insert fails, the object must go."""
    ghost = uuid.uuid4()
    with pytest.raises(Exception):  # noqa: B017, PT011 - the database refuses the foreign key
        create_record(
            services.db,
            services.storage,
            services.settings,
            user_id=ghost,
            audio=iter([wavgen.wav(seconds=0.3)]),
            filename="ghost.wav",
        )
    assert keys_under(services, f"users/{ghost}/") == []


def test_presigned_url_is_signed_for_the_public_endpoint(services: Services) -> None:
    key = f"it/{uuid.uuid4()}.mp3"
    services.storage.client.put_object(Bucket=services.storage.bucket, Key=key, Body=b"ID3...")
    url = services.storage.presigned_get(
        key, expires=60, filename_header='attachment; filename="a.mp3"'
    )
    assert services.settings.s3_public_endpoint_url
    assert url.startswith(services.settings.s3_public_endpoint_url + "/")
    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    assert response.content == b"ID3..."
    assert response.headers["Content-Disposition"] == 'attachment; filename="a.mp3"'
    tampered = url.replace(key, key.replace(".mp3", "x.mp3"))
    assert requests.get(tampered, timeout=10).status_code == 403


def test_health_checks_pass(services: Services) -> None:
    services.db.check()
    services.storage.check()


# --- a user erased mid-request, and the conversion job's own deadline ------------------------


def _queued_upload(services: Services, user_id: uuid.UUID, wav: bytes) -> uuid.UUID:
    """A direct upload whose WAV is in the bucket and whose job is queued (on SQS: the stack's
    worker polls only the PostgreSQL queue, so the test runs the job itself)."""
    started = start_upload(
        services.db, services.storage, services.settings, user_id=user_id, filename="long.wav"
    )
    storage = services.storage
    storage.client.put_object(Bucket=storage.bucket, Key=pending_key(user_id, started.id), Body=wav)
    done = complete_upload(
        services.db, services.storage, RecordingQueue(), services.settings,
        user_id=user_id, raw_upload_id=str(started.id),
    )  # fmt: skip
    assert done.won
    return started.id


def test_an_upload_started_for_a_user_erased_meanwhile_is_a_401(services: Services) -> None:
    """The INSERT's foreign key fails (no such user): the 401 of a dead token, not a 500."""
    for within in (None, lambda conn, upload: None):
        with pytest.raises(Unauthorized):
            start_upload(
                services.db, services.storage, services.settings, user_id=uuid.uuid4(),
                filename=None, within=within,
            )  # fmt: skip


def test_a_user_erased_after_authenticating_gets_401_everywhere(services: Services) -> None:
    """Completion, status, delete and list find nothing for a user erased since it was
    authenticated: the 401 of its dead token, not the 404 of another user's upload."""
    user = create_user(services.db, "Soon gone")
    upload_id = _queued_upload(services, user.id, wavgen.wav(seconds=0.2))
    erase_user(services.db, services.storage, services.settings, user.id)
    db, storage, settings = services.db, services.storage, services.settings
    calls: list[Callable[[], object]] = [
        lambda: complete_upload(
            db, storage, RecordingQueue(), settings, user_id=user.id, raw_upload_id=str(upload_id)
        ),
        lambda: upload_status(db, settings, user_id=user.id, raw_upload_id=str(upload_id)),
        lambda: delete_record(db, storage, user_id=user.id, raw_id=str(uuid.uuid4())),
        lambda: list_records(db, settings, user_id=user.id, limit=5, cursor=None),
    ]
    for call in calls:
        with pytest.raises(Unauthorized):
            call()
    alive = create_user(services.db, "Still here")  # a live user's miss is still a 404
    with pytest.raises(NotFound):
        delete_record(db, storage, user_id=alive.id, raw_id=str(uuid.uuid4()))
    assert list_records(db, settings, user_id=alive.id, limit=5, cursor=None).records == []


def test_a_job_past_its_deadline_fails_once_with_a_problem_of_its_own(services: Services) -> None:
    user = create_user(services.db, "Long take")
    upload_id = _queued_upload(services, user.id, wavgen.wav(seconds=60))
    hurried = dataclasses.replace(services.settings, job_timeout_seconds=0.05)
    assert run_job(services.db, services.storage, hurried, upload_id) is Outcome.FAILED
    status = upload_status(
        services.db, services.settings, user_id=user.id, raw_upload_id=str(upload_id)
    )
    assert status.status == "failed" and status.error is not None
    assert status.error["title"] == "Conversion Timed Out"
    assert "0.05 seconds" in status.error["detail"] and "upload was" not in status.error["detail"]
    attempts = services.db.execute(ATTEMPTS, {"id": upload_id})[0].attempts
    assert attempts == 1
    # Delivered again (a queue's retry): nothing runs, nothing is counted.
    assert run_job(services.db, services.storage, hurried, upload_id) is Outcome.SKIPPED
    assert services.db.execute(ATTEMPTS, {"id": upload_id})[0].attempts == 1
    with pytest.raises(ObjectMissing):  # its WAV is gone with it
        services.storage.size(pending_key(user.id, upload_id))
