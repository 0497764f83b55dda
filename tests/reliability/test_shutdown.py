"""SIGTERM to a function, as Cloud Run sends it (10 s before SIGKILL): nothing is lost.

A stack of its own. upload_record's server process gets SIGTERM (not its process group: the
platform signals the container's first process) while a short upload and a long, slow one are
in flight. The short one finishes with its 201; the long one is answered 503 with Retry-After
after SHUTDOWN_DRAIN_SECONDS, its multipart upload aborted; the process is gone before 10 s.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from common.adapters.db import Database, sql
from common.adapters.storage import Storage
from common.settings import ServerSettings, Settings
from devstack.wavgen import wav

from devstack import ScratchStack
from tests.support.slow_clients import paced_upload
from tests.support.stacks import running_stack

GRACE = 10.0  # Cloud Run's, and `docker stop`'s default
DRAIN = ServerSettings().shutdown_drain_seconds


@pytest.fixture(scope="module")
def stopping_stack() -> Iterator[ScratchStack]:
    with running_stack("records-shutdown-", {"S3_PART_SIZE_BYTES": str(5 * 1024 * 1024)}) as s:
        yield s


_RECORDS = sql("SELECT id, object_key FROM records WHERE user_id = :user")


def test_sigterm_finishes_short_requests_and_aborts_long_uploads(
    stopping_stack: ScratchStack,
) -> None:
    stack = stopping_stack
    settings = Settings.from_env(stack.app_env())
    db, storage = Database.from_settings(settings), Storage.from_settings(settings)
    created = requests.post(f"{stack.base_url}/users", json={"name": "Stopping"}, timeout=30)
    assert created.status_code == 201, created.text
    user = created.json()
    port = stack.ports.upload_record
    short: dict[str, Any] = {}
    long: dict[str, Any] = {}
    clients = [
        threading.Thread(target=paced_upload, args=(port, user, wav(seconds=1.0), 3.0, short)),
        # 60 s of audio (10 MiB) at about 170 KiB/s: a minute to send, far past the grace.
        threading.Thread(target=paced_upload, args=(port, user, wav(seconds=60.0), 60.0, long)),
    ]
    for client in clients:
        client.start()
    time.sleep(1.5)  # both authenticated and converting
    server = stack.processes["upload_record"]
    os.kill(server.pid, signal.SIGTERM)
    sent = time.monotonic()
    server.wait(timeout=GRACE + 5)
    exited = time.monotonic() - sent
    for client in clients:
        client.join(timeout=30)

    assert exited < GRACE, f"the server took {exited:.1f} s to stop"
    assert short["status"] == 201, short
    record = json.loads(short["body"])
    assert long["status"] == 503, long
    assert int(long["headers"]["retry-after"]) >= 1
    assert long["headers"]["content-type"] == "application/problem+json"
    assert json.loads(long["body"])["type"].endswith(":server-stopping")
    # The long upload ran for the drain, then was stopped: not at once, not at the kill.
    assert DRAIN - 0.5 <= long["at"] - sent <= GRACE, long["at"] - sent

    rows = db.execute(_RECORDS, {"user": uuid.UUID(user["id"])})
    assert [str(row.id) for row in rows] == [record["id"]]
    listed = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=f"users/{user['id']}/")
    assert [obj["Key"] for obj in listed.get("Contents", [])] == [rows[0].object_key]
    parts = storage.client.list_multipart_uploads(
        Bucket=storage.bucket, Prefix=f"users/{user['id']}/"
    )
    assert parts.get("Uploads", []) == []  # the long upload's multipart upload was aborted
