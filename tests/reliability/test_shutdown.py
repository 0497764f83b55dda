"""SIGTERM to a function, as Cloud Run sends it (10 s before SIGKILL): nothing is lost.

A stack of its own. upload_record's server process gets SIGTERM (not its process group: the
platform signals the container's first process) while a short upload and a long, slow one are
in flight. The short one finishes with its 201; the long one is answered 503 with Retry-After
after SHUTDOWN_DRAIN_SECONDS, its multipart upload aborted; the process is gone before 10 s.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
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
from tests.support.stacks import running_stack

GRACE = 10.0  # Cloud Run's, and `docker stop`'s default
DRAIN = ServerSettings().shutdown_drain_seconds


@pytest.fixture(scope="module")
def stopping_stack() -> Iterator[ScratchStack]:
    with running_stack("records-shutdown-", {"S3_PART_SIZE_BYTES": str(5 * 1024 * 1024)}) as s:
        yield s


def _form(user: dict[str, str], audio: bytes) -> tuple[bytes, str]:
    boundary = "shutdown-" + uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="user"\r\n\r\n{user["id"]}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="token"\r\n\r\n'
        f"{user['token']}\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="t.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    return head + audio + f"\r\n--{boundary}--\r\n".encode(), boundary


def _upload(
    port: int, user: dict[str, str], audio: bytes, seconds: float, out: dict[str, Any]
) -> None:
    """POST /records straight to the function, its body spread over ``seconds``."""
    body, boundary = _form(user, audio)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(
            (
                "POST /records HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
        )
        step = 32 * 1024
        pause = seconds / max(1, len(body) // step)
        for at in range(0, len(body), step):
            try:
                sock.sendall(body[at : at + step])
            except OSError:
                break  # the server answered and closed
            if select.select([sock], [], [], pause)[0]:
                break  # answered early (a router keeps reading what is left): stop sending
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            pass
    head, _, payload = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    out["status"] = int(lines[0].split()[1]) if data else 0
    out["headers"] = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:])
    }
    out["body"] = payload
    out["at"] = time.monotonic()


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
        threading.Thread(target=_upload, args=(port, user, wav(seconds=1.0), 3.0, short)),
        # 60 s of audio (10 MiB) at about 170 KiB/s: a minute to send, far past the grace.
        threading.Thread(target=_upload, args=(port, user, wav(seconds=60.0), 60.0, long)),
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
