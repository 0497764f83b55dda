"""Faults caused for real, and load, on a native stack of their own (``make test-reliability``).

The object store and PostgreSQL are stopped and started again, connections are killed with
``pg_terminate_backend``, the upload function is SIGKILLed mid-conversion, clients hang up
or stall mid-upload; then nothing half-done may be visible and the service must recover by
itself. The load test sends 1,000 user creations and 200 uploads at once through the router
and checks that every user and record exists exactly once and every MP3 is intact.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pg8000.native
import pytest
import requests
from common.adapters.db import Database, sql
from common.adapters.queue import make_queue
from common.adapters.storage import Storage
from common.ops.sweep import sweep
from common.platform.runtime import Services
from common.settings import Settings
from devstack.native import DB_NAME, DB_USER
from devstack.wavgen import fmt_chunk, wav

from devstack import NativeStack, ScratchStack
from tests.support.slow_clients import upload_form
from tests.support.stacks import ffmpeg_descendants, running_stack

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def fault_stack() -> Iterator[ScratchStack]:
    extra_env = {
        "S3_PART_SIZE_BYTES": str(5 * MIB),  # the smallest part: multipart sooner
        "RETRY_AFTER_SECONDS": "2",
        "S3_TIMEOUT_SECONDS": "3",
        "DB_CONNECT_TIMEOUT_SECONDS": "3",
        "RATE_LIMIT_RPS": "10000",  # one address stands in for many clients here
        "RATE_LIMIT_BURST": "5000",
    }
    with running_stack("records-faults-", extra_env) as native:
        yield native


@pytest.fixture(scope="module")
def fault_services(fault_stack: NativeStack) -> Services:
    """The test's own view of the stack."""
    settings = Settings.from_env(fault_stack.app_env())
    db = Database.from_settings(settings)
    return Services(settings, db, Storage.from_settings(settings), make_queue(settings))


def new_user(stack: NativeStack, name: str = "Faulty") -> dict[str, str]:
    response = requests.post(f"{stack.base_url}/users", json={"name": name}, timeout=30)
    assert response.status_code == 201, response.text
    body: dict[str, str] = response.json()
    return body


# Reads: run again on a fresh connection when the one they had was lost (a restart).
_RECORD_COUNT = sql("SELECT count(*) FROM records WHERE user_id = :user", idempotent=True)
_USERS_IN = sql("SELECT id FROM users WHERE id = ANY(:ids)", idempotent=True)
_RECORDS_IN = sql(
    "SELECT id, user_id, etag, size_bytes FROM records WHERE id = ANY(:ids)", idempotent=True
)


def record_rows(services: Services, user_id: str) -> int:
    return int(services.db.execute(_RECORD_COUNT, {"user": uuid.UUID(user_id)})[0][0])


def user_objects(services: Services, user_id: str) -> list[str]:
    listed = services.storage.client.list_objects_v2(
        Bucket=services.storage.bucket, Prefix=f"users/{user_id}/"
    )
    return [obj["Key"] for obj in listed.get("Contents", [])]


def open_multipart(services: Services, user_id: str) -> list[Any]:
    listed = services.storage.client.list_multipart_uploads(
        Bucket=services.storage.bucket, Prefix=f"users/{user_id}/"
    )
    return list(listed.get("Uploads", []))


class RawUpload:
    """An upload over a plain socket, so the test decides when each byte is sent."""

    def __init__(self, stack: NativeStack, user: dict[str, str], audio: bytes) -> None:
        self.body, boundary = upload_form(user, audio)
        self.sock = socket.create_connection(("127.0.0.1", stack.ports.router), timeout=120)
        self.sock.sendall(
            (
                "POST /records HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                f"Content-Length: {len(self.body)}\r\n\r\n"
            ).encode()
        )
        self.sent = 0

    def send(self, count: int, *, pace: float = 0.0, step: int = 64 * 1024) -> None:
        end = min(len(self.body), self.sent + count)
        while self.sent < end:
            piece = self.body[self.sent : min(end, self.sent + step)]
            try:
                self.sock.sendall(piece)
            except OSError:
                return  # the server has given up on this upload
            self.sent += len(piece)
            if pace:
                time.sleep(pace)

    def finish(self) -> tuple[int, dict[str, str], bytes]:
        self.send(len(self.body))
        return self.response()

    def response(self) -> tuple[int, dict[str, str], bytes]:
        data = b""
        try:
            while chunk := self.sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        self.sock.close()
        if not data:
            return 0, {}, b""  # closed without an answer
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers, body

    def close(self) -> None:
        self.sock.close()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def upload_until_created(
    stack: NativeStack, user: dict[str, str], timeout: float, *, also_502: bool = False
) -> int:
    """Repeat a small upload until it succeeds (honouring Retry-After); count the attempts."""
    deadline = time.monotonic() + timeout
    attempts = 0
    while True:
        attempts += 1
        response = requests.post(
            f"{stack.base_url}/records",
            data={"user": user["id"], "token": user["token"]},
            files={"file": ("r.wav", wav(seconds=0.2), "audio/wav")},
            timeout=60,
        )
        if response.status_code == 201:
            return attempts
        assert response.status_code in ((502, 503) if also_502 else (503,)), response.text
        assert int(response.headers["Retry-After"]) >= 1
        assert time.monotonic() < deadline, "the service did not recover by itself"
        time.sleep(1)


def test_object_store_stopped_mid_upload(
    fault_stack: NativeStack, fault_services: Services
) -> None:
    user = new_user(fault_stack)
    upload = RawUpload(fault_stack, user, wav(seconds=2.0))
    try:
        upload.send(len(upload.body) // 2)
        time.sleep(0.5)  # authenticated, converting
        fault_stack.stop_process("seaweedfs")
        status, headers, body = upload.finish()
    finally:
        upload.close()
    try:
        assert status == 503, body
        assert headers["content-type"] == "application/problem+json"
        assert int(headers["retry-after"]) >= 1
        assert b"object store" in body
        assert record_rows(fault_services, user["id"]) == 0
        # Health says so too, then storage returns and uploads work again without a restart.
        assert requests.get(f"{fault_stack.base_url}/healthz", timeout=30).status_code == 503
    finally:  # the module's other tests need it, whatever failed above
        fault_stack.start_storage()
    upload_until_created(fault_stack, user, timeout=60)
    assert record_rows(fault_services, user["id"]) == 1
    assert len(user_objects(fault_services, user["id"])) == 1


def test_postgres_stopped_after_authentication(
    fault_stack: NativeStack, fault_services: Services
) -> None:
    user = new_user(fault_stack)
    upload = RawUpload(fault_stack, user, wav(seconds=2.0))
    try:
        upload.send(len(upload.body) // 2)
        time.sleep(0.5)  # the token was checked; the row is written after conversion
        fault_stack.stop_process("postgres")
        status, headers, body = upload.finish()
    finally:
        upload.close()
    try:
        assert status == 503, body
        assert int(headers["retry-after"]) >= 1
        assert b"database" in body
        # The MP3 was stored before the INSERT, which never reached the server (no connection):
        # it must have been removed again.
        assert user_objects(fault_services, user["id"]) == []
        assert open_multipart(fault_services, user["id"]) == []
        refused = requests.post(f"{fault_stack.base_url}/users", json={"name": "x"}, timeout=30)
        assert refused.status_code == 503
        assert int(refused.headers["Retry-After"]) >= 1
    finally:  # the module's other tests need it, whatever failed above
        fault_stack.start_postgres()
    # The functions' pooled connections are all dead now: pre-ping replaces them.
    attempts = upload_until_created(fault_stack, user, timeout=60)
    assert attempts == 1, f"{attempts - 1} answers of 503 after PostgreSQL was back"
    assert record_rows(fault_services, user["id"]) == 1
    assert len(user_objects(fault_services, user["id"])) == 1


def test_connections_killed_by_pg_terminate_backend(
    fault_stack: NativeStack, fault_services: Services
) -> None:
    user = new_user(fault_stack)
    for _ in range(3):  # warm every function's pool
        assert requests.get(f"{fault_stack.base_url}/healthz", timeout=30).status_code == 200
    conn = pg8000.native.Connection(
        DB_USER,
        password=fault_stack.credentials()["db_password"],
        port=fault_stack.ports.postgres,
        database=DB_NAME,
    )
    try:
        killed = conn.run(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = :db AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
            db=DB_NAME,
        )
    finally:
        conn.close()
    assert len(killed) >= 1
    # Pre-ping replaces the dead connections: not even one 503.
    response = requests.post(
        f"{fault_stack.base_url}/records",
        data={"user": user["id"], "token": user["token"]},
        files={"file": ("t.wav", wav(seconds=0.2), "audio/wav")},
        timeout=60,
    )
    assert response.status_code == 201, response.text
    download = requests.get(response.json()["url"], timeout=30)
    assert download.status_code == 200


def test_upload_function_killed_mid_conversion(
    fault_stack: NativeStack, fault_services: Services
) -> None:
    user = new_user(fault_stack)
    # 15 minutes of mono 44.1 kHz: 21.6 MB of MP3 at 192 kbit/s. Part 1 (the length header)
    # goes last, so the multipart upload starts once ffmpeg has written two 5 MiB parts
    # (7.3 minutes of audio), with half the encoding still to come.
    seconds = 900
    frames = 44100 * seconds
    audio = (
        b"RIFF"
        + (36 + frames * 2).to_bytes(4, "little")
        + b"WAVE"
        + fmt_chunk(channels=1, rate=44100, bits=16)
        + b"data"
        + (frames * 2).to_bytes(4, "little")
        + os.urandom(frames * 2)  # noise: lame cannot shrink it below the bitrate
    )
    upload = RawUpload(fault_stack, user, audio)
    try:
        sender = threading.Thread(target=upload.send, args=(len(upload.body),), daemon=True)
        sender.start()
        wait_for(lambda: bool(open_multipart(fault_services, user["id"])), 120, "a part")
        (killed_key,) = (u["Key"] for u in open_multipart(fault_services, user["id"]))
        converting = ffmpeg_descendants(fault_stack)
        assert len(converting) == 1, "ffmpeg should be running"
        worker = parent_pid(converting[0])  # the server's worker process serving this upload
        os.kill(worker, signal.SIGKILL)
        sender.join(30)
        status, _, _ = upload.response()
    finally:
        upload.close()
    assert status == 502
    # ffmpeg loses its pipes with its parent and ends by itself.
    wait_for(lambda: not os.path.exists(f"/proc/{converting[0]}"), 20, "ffmpeg to exit")
    assert record_rows(fault_services, user["id"]) == 0
    assert user_objects(fault_services, user["id"]) == []  # nothing visible
    assert len(open_multipart(fault_services, user["id"])) == 1  # the crash's leftover
    # The server's main process starts a new worker: no restart by hand.
    upload_until_created(fault_stack, user, timeout=60, also_502=True)
    result = sweep(fault_services, 0)
    # On a busy machine the kill can land while the store completes the killed upload's
    # object (the request already sent), before its row: the crash window the sweep exists
    # for. Either way the sweep leaves exactly the one record and its object.
    assert result.orphans_deleted in ([], [killed_key])
    assert open_multipart(fault_services, user["id"]) == []
    assert record_rows(fault_services, user["id"]) == 1
    assert len(user_objects(fault_services, user["id"])) == 1


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def test_client_disconnect_mid_upload_stops_ffmpeg(
    fault_stack: NativeStack, fault_services: Services
) -> None:
    user = new_user(fault_stack)
    upload = RawUpload(fault_stack, user, wav(seconds=30.0))
    upload.send(len(upload.body) // 3)
    wait_for(lambda: bool(ffmpeg_descendants(fault_stack)), 30, "ffmpeg to start")
    upload.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    upload.close()  # RST: the client is gone
    wait_for(lambda: not ffmpeg_descendants(fault_stack), 40, "ffmpeg to be stopped")
    assert record_rows(fault_services, user["id"]) == 0
    assert user_objects(fault_services, user["id"]) == []
    assert open_multipart(fault_services, user["id"]) == []
    upload_until_created(fault_stack, user, timeout=30)


def test_stalled_clients_are_dropped_and_do_not_block_others(
    fault_stack: NativeStack, fault_services: Services
) -> None:
    """More stalled uploads than the function has upload slots: those past the slots are
    told 503 busy (with Retry-After) after a short wait, the others are dropped (408)."""
    user = new_user(fault_stack)
    stalled = [RawUpload(fault_stack, user, wav(seconds=5.0)) for _ in range(12)]
    try:
        for upload in stalled:
            upload.send(2000)
        started = time.monotonic()
        # Other endpoints stay available meanwhile.
        assert new_user(fault_stack, "Patient")["id"]
        answers = [upload.response() for upload in stalled]  # the server ends them
        waited = time.monotonic() - started
    finally:
        for upload in stalled:
            upload.close()
    assert waited < 60, waited
    statuses = [status for status, _, _ in answers]
    # Cut off (the body's deadline, or nginx's client_body_timeout): an error answer, or the
    # connection closed; past the slots, a 503 that says when to come back.
    assert all(status in (0, 400, 408, 502, 503, 504) for status in statuses), statuses
    for status, headers, body in answers:
        if status == 503:
            assert b"busy" in body and int(headers["retry-after"]) >= 1, body
    wait_for(lambda: not ffmpeg_descendants(fault_stack), 30, "ffmpeg to be stopped")
    assert record_rows(fault_services, user["id"]) == 0
    assert user_objects(fault_services, user["id"]) == []
    upload_until_created(fault_stack, user, timeout=30)


def test_slow_drip_upload_hits_the_conversion_deadline(
    fault_stack: ScratchStack, fault_services: Services
) -> None:
    fault_stack.restart_function("upload_record", {"CONVERT_TIMEOUT_SECONDS": "4"})
    try:
        user = new_user(fault_stack)
        upload = RawUpload(fault_stack, user, wav(seconds=5.0))
        try:
            # A byte-trickle that never stalls long enough for nginx's read timeout.
            dripper = threading.Thread(
                target=upload.send,
                args=(len(upload.body),),
                kwargs={"pace": 0.2, "step": 1024},
                daemon=True,
            )
            upload.send(4096)
            dripper.start()
            status, headers, body = upload.response()
        finally:
            upload.close()
        assert status == 408, body
        assert headers["content-type"] == "application/problem+json"
        assert record_rows(fault_services, user["id"]) == 0
        assert user_objects(fault_services, user["id"]) == []
        wait_for(lambda: not ffmpeg_descendants(fault_stack), 20, "ffmpeg to be stopped")
    finally:
        fault_stack.restart_function("upload_record")


def test_load_users_and_uploads_all_exist_once_and_intact(
    fault_stack: NativeStack, fault_services: Services
) -> None:
    base = fault_stack.base_url
    local = threading.local()

    def session() -> requests.Session:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        s: requests.Session = local.session
        return s

    def create(n: int) -> tuple[int, dict[str, str]]:
        response = session().post(f"{base}/users", json={"name": f"load-{n}"}, timeout=120)
        return response.status_code, response.json() if response.status_code == 201 else {}

    with ThreadPoolExecutor(max_workers=200) as pool:
        created = list(pool.map(create, range(1000)))
    assert [status for status, _ in created] == [201] * 1000
    users = [body for _, body in created]
    ids = {uuid.UUID(u["id"]) for u in users}
    assert len(ids) == 1000
    assert len({u["token"] for u in users}) == 1000
    stored = [row.id for row in fault_services.db.execute(_USERS_IN, {"ids": list(ids)})]
    assert sorted(stored) == sorted(ids)

    uploaders = users[:200]
    audio = [wav(seconds=0.5, rate=22050, channels=1) for _ in range(1)]

    def upload(user: dict[str, str]) -> tuple[int, dict[str, Any]]:
        response = session().post(
            f"{base}/records",
            data={"user": user["id"], "token": user["token"]},
            files={"file": ("load.wav", audio[0], "audio/wav")},
            timeout=300,
        )
        return response.status_code, response.json()

    barrier_start = time.monotonic()
    with ThreadPoolExecutor(max_workers=200) as pool:
        uploaded = list(pool.map(upload, uploaders))
    elapsed = time.monotonic() - barrier_start
    statuses = [status for status, _ in uploaded]
    assert statuses == [201] * 200, {s: statuses.count(s) for s in set(statuses)}
    records = [body for _, body in uploaded]
    assert len({r["id"] for r in records}) == 200

    rows = fault_services.db.execute(_RECORDS_IN, {"ids": [uuid.UUID(r["id"]) for r in records]})
    by_id = {str(row.id): (str(row.user_id), row.etag, row.size_bytes) for row in rows}
    assert len(by_id) == 200

    def download(pair: tuple[dict[str, str], dict[str, Any]]) -> tuple[str, bool]:
        user, record = pair
        response = session().get(record["url"], timeout=120)
        user_id, etag, size = by_id[record["id"]]
        ok = (
            response.status_code == 200
            and user_id == user["id"]
            and len(response.content) == size == record["size_bytes"]
            and hashlib.md5(response.content).hexdigest() == etag  # noqa: S324
            and response.headers["ETag"] == f'"{etag}"'
        )
        return record["id"], ok

    with ThreadPoolExecutor(max_workers=50) as pool:
        checked = list(pool.map(download, zip(uploaders, records, strict=True)))
    bad = [rid for rid, ok in checked if not ok]
    assert bad == [], bad
    assert elapsed < 280, elapsed
