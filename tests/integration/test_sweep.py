"""``common.ops.sweep`` against the real Postgres and SeaweedFS of the session stack."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from common.adapters.db import sql
from common.domain.new_records import create_record
from common.domain.records import object_key
from common.domain.uploads import pending_key
from common.domain.users import create_user
from common.errors import Unauthorized
from common.ops.sweep import sweep
from common.platform.runtime import Services
from devstack.wavgen import wav

from devstack import NativeStack
from tests.support import ROOT, Client


def keys(services: Services) -> set[str]:
    listed = services.storage.client.list_objects_v2(Bucket=services.storage.bucket)
    return {obj["Key"] for obj in listed.get("Contents", [])}


def open_uploads(services: Services) -> set[str]:
    listed = services.storage.client.list_multipart_uploads(Bucket=services.storage.bucket)
    return {u["UploadId"] for u in listed.get("Uploads", [])}


def test_sweep_removes_orphans_and_stale_uploads_and_keeps_records(
    services: Services, client: Client
) -> None:
    user = client.create_user("Sweeper")
    kept = client.upload(user, wav(seconds=0.3))
    assert kept.status_code == 201, kept.text
    kept_key = object_key(uuid.UUID(user["id"]), uuid.UUID(kept.json()["id"]))
    s3 = services.storage.client
    bucket = services.storage.bucket
    orphan = object_key(uuid.uuid4(), uuid.uuid4())
    s3.put_object(Bucket=bucket, Key=orphan, Body=b"\xff\xfb" + bytes(100))
    other = "not-a-record/notes.txt"  # not the sweep's business
    s3.put_object(Bucket=bucket, Key=other, Body=b"keep me")
    stale = s3.create_multipart_upload(Bucket=bucket, Key=object_key(uuid.uuid4(), uuid.uuid4()))
    try:
        # Inside the grace period nothing is touched.
        result = sweep(services, 3600)
        assert orphan not in result.orphans_deleted
        assert {kept_key, orphan, other} <= keys(services)
        assert stale["UploadId"] in open_uploads(services)

        later = datetime.now(UTC) + timedelta(seconds=5)
        result = sweep(services, 0, now=later)
        assert orphan in result.orphans_deleted
        assert kept_key not in result.orphans_deleted
        remaining = keys(services)
        assert orphan not in remaining
        assert {kept_key, other} <= remaining
        assert stale["UploadId"] not in open_uploads(services)
        # The record still downloads.
        got = client.session.get(kept.json()["url"], timeout=30)
        assert got.status_code == 200
        assert got.content[:2] == b"\xff\xfb"
    finally:
        s3.delete_object(Bucket=bucket, Key=other)


def test_sweep_command_runs_against_the_stack(stack: NativeStack) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "common.ops.sweep", "--grace-seconds", "3600"],
        cwd=ROOT,
        env=stack.app_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "sweep done" in result.stderr


def test_sweep_deletes_each_orphan_once(services: Services) -> None:
    s3 = services.storage.client
    orphans = [object_key(uuid.uuid4(), uuid.uuid4()) for _ in range(3)]
    for key in orphans:
        s3.put_object(Bucket=services.storage.bucket, Key=key, Body=b"\xff\xfb" + bytes(10))
    result = sweep(services, 0, now=datetime.now(UTC) + timedelta(seconds=5))
    assert sorted(k for k in result.orphans_deleted if k in orphans) == sorted(orphans)
    assert len(result.orphans_deleted) == len(set(result.orphans_deleted))
    assert not set(orphans) & keys(services)


def test_a_record_for_a_user_erased_meanwhile_is_refused(services: Services) -> None:
    """The user row is gone when the converted record's row is inserted (erased during the
    upload): 401, and the MP3 already stored is deleted, not left behind."""
    gone = uuid.uuid4()
    with pytest.raises(Unauthorized):
        create_record(
            services.db, services.storage, services.settings,
            user_id=gone, audio=iter([wav(seconds=0.3)]), filename="late.wav",
        )  # fmt: skip
    listed = services.storage.client.list_objects_v2(
        Bucket=services.storage.bucket, Prefix=f"users/{gone}/"
    )
    assert listed.get("KeyCount", 0) == 0


def test_a_form_used_again_after_its_job_leaves_no_wav_behind(services: Services) -> None:
    """The form stays usable until it expires; the sweep removes what it sends after the job."""
    db = services.db
    user = create_user(db, "Again").id
    s3, bucket = services.storage.client, services.storage.bucket
    keyed = {}
    for status in ("done", "failed", "uploading", "queued"):
        upload_id = uuid.uuid4()
        keyed[status] = pending_key(user, upload_id)
        db.execute(
            sql("INSERT INTO uploads (id, user_id, object_key, status) "
                "VALUES (:id, :user_id, :key, :status)"),
            {"id": upload_id, "user_id": user, "key": keyed[status], "status": status},
        )  # fmt: skip
        s3.put_object(Bucket=bucket, Key=keyed[status], Body=b"RIFF")
    no_row = pending_key(user, uuid.uuid4())
    s3.put_object(Bucket=bucket, Key=no_row, Body=b"RIFF")
    assert not {keyed["done"], no_row} & set(sweep(services, 3600).spent_wavs_deleted)
    result = sweep(services, 0, now=datetime.now(UTC) + timedelta(seconds=5))
    assert {keyed["done"], keyed["failed"], no_row} <= set(result.spent_wavs_deleted)
    remaining = keys(services)
    assert not {keyed["done"], keyed["failed"], no_row} & remaining
    assert {keyed["uploading"], keyed["queued"]} <= remaining
    services.storage.delete_many([keyed["uploading"], keyed["queued"]])
