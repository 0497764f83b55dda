"""Direct uploads end to end: presign through the router, the WAV sent by a plain HTTP client
straight to SeaweedFS, completion (202) and the conversion job run by the stack's worker,
status polling, download; the size policy as the store enforces it; someone else's upload;
racing completions, duplicate deliveries, bounded attempts, a worker SIGKILLed mid-conversion;
and a 300 MB WAV with the worker's memory measured.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from botocore.exceptions import ClientError
from common.adapters.db import sql
from common.domain import jobs
from common.domain import uploads as direct_upload
from common.domain.encoding import EncodingOptions
from common.errors import DependencyUnavailable, PayloadTooLarge
from common.http.jobs import presigned_upload_body
from common.ops import bucket
from common.platform.runtime import Services
from common.settings import JobQueueKind

from devstack import NativeStack, free_port, wavgen
from tests.support import Client
from tests.support.stack_clients import RecordingQueue, build_services


@pytest.fixture(scope="module")
def store(stack: NativeStack) -> Services:
    return build_services(stack)


def presign(client: Client, user: dict[str, str], **body: Any) -> requests.Response:
    return client.session.post(
        f"{client.base_url}/records/uploads",
        json={"user": user["id"], **body},
        headers={"Authorization": f"Bearer {user['token']}"},
        timeout=30,
    )


def send_to_bucket(upload: dict[str, Any], content: bytes, name: str = "take.wav") -> Any:
    """The client's part: a plain multipart POST of the presigned fields and the file."""
    post = upload["upload"]
    assert post["method"] == "POST"
    return requests.post(
        post["url"],
        data=post["fields"],
        files={post["file_field"]: (name, content, "audio/wav")},
        timeout=120,
    )


def complete(
    client: Client, upload: dict[str, Any], user: dict[str, str], prefer: str | None = None
) -> requests.Response:
    headers = {"Authorization": f"Bearer {user['token']}"}
    if prefer is not None:
        headers["Prefer"] = prefer
    return requests.post(
        upload["complete_url"], headers=headers, params={"user": user["id"]}, timeout=900
    )


def status(client: Client, upload_id: str, user: dict[str, str]) -> requests.Response:
    headers = {"Authorization": f"Bearer {user['token']}"}
    return client.session.get(
        f"{client.base_url}/records/uploads/{upload_id}",
        headers=headers,
        params={"user": user["id"]},
        timeout=30,
    )


def poll(
    client: Client,
    upload_id: str,
    user: dict[str, str],
    *,
    timeout: float = 600,
    every: float = 0.2,
) -> list[dict[str, Any]]:
    """Every status body seen until the job is done or failed (the last one)."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = status(client, upload_id, user)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        seen.append(body)
        if body["status"] in ("done", "failed"):
            assert "Retry-After" not in answer.headers
            return seen
        if body["status"] != "uploading":
            assert int(answer.headers["Retry-After"]) >= 1
        time.sleep(every)
    raise AssertionError(f"the job did not finish in {timeout} s: {seen[-3:]}")


def converted(client: Client, upload: dict[str, Any], user: dict[str, str]) -> dict[str, Any]:
    """Complete (202) and poll until done: the record."""
    accepted = complete(client, upload, user)
    assert accepted.status_code == 202, accepted.text
    final = poll(client, upload["id"], user)[-1]
    assert final["status"] == "done", final
    record: dict[str, Any] = final["record"]
    return record


def records_of(store: Services, user_id: str) -> list[str]:
    rows = store.db.execute(
        sql("SELECT id FROM records WHERE user_id = :u"), {"u": uuid.UUID(user_id)}
    )
    return [str(r[0]) for r in rows]


def record_objects(store: Services, user_id: str) -> list[str]:
    listed = store.storage.client.list_objects_v2(
        Bucket=store.storage.bucket, Prefix=f"users/{user_id}/records/"
    )
    return [o["Key"] for o in listed.get("Contents", [])]


def pending_exists(store: Services, user_id: str, upload_id: str) -> bool:
    key = direct_upload.pending_key(uuid.UUID(user_id), uuid.UUID(upload_id))
    try:
        store.storage.client.head_object(Bucket=store.storage.bucket, Key=key)
    except ClientError:
        return False
    return True


def test_direct_upload_converts_and_downloads(client: Client, store: Services) -> None:
    user = client.create_user("Nina")
    wav = wavgen.wav(seconds=2.0, channels=2, rate=48000)
    started = presign(client, user, filename="Live at Ronnie\u2019s.wav")
    assert started.status_code == 201, started.text
    assert started.headers["Cache-Control"] == "no-store"
    upload = started.json()
    assert upload["max_bytes"] == 4 * 1024**3
    assert upload["complete_url"] == (f"{client.base_url}/records/uploads/{upload['id']}/complete")
    assert upload["status_url"] == f"{client.base_url}/records/uploads/{upload['id']}"
    # Signed for the public endpoint, under a pending key of this user.
    assert upload["upload"]["url"].startswith(store.settings.s3_public_endpoint_url or "-")
    assert upload["upload"]["fields"]["key"] == f"uploads/{user['id']}/{upload['id']}.wav"
    # The row exists from the start, with the encoding options of the start call.
    before = status(client, upload["id"], user)
    assert before.status_code == 200
    assert before.json() == {"id": upload["id"], "status": "uploading", "progress": 0.0}
    (options,) = store.db.execute(
        sql("SELECT options FROM uploads WHERE id = :id"), {"id": uuid.UUID(upload["id"])}
    )[0]
    assert options == EncodingOptions.from_fields({"user": user["id"]}).to_json()

    sent = send_to_bucket(upload, wav)
    assert sent.status_code in (200, 201, 204), sent.text
    assert pending_exists(store, user["id"], upload["id"])

    accepted = complete(client, upload, user)
    assert accepted.status_code == 202, accepted.text
    assert accepted.headers["Location"] == f"/records/uploads/{upload['id']}"
    assert int(accepted.headers["Retry-After"]) >= 1
    assert accepted.json()["status"] in ("queued", "converting", "done")
    seen = poll(client, upload["id"], user)
    assert all(0.0 <= b["progress"] <= 1.0 for b in seen)
    final = seen[-1]
    assert final["status"] == "done" and final["progress"] == 1.0, final
    record = final["record"]
    over_http = client.upload(user, wav, filename="Live at Ronnie\u2019s.wav").json()
    assert set(record) == set(over_http)
    for key in ("duration_seconds", "size_bytes", "bitrate_kbps", "sample_rate", "channels"):
        assert record[key] == over_http[key], key
    assert record["filename"] == over_http["filename"] == "Live at Ronnie\u2019s.mp3"
    assert record["url"] == f"{client.base_url}/record?id={record['id']}&user={user['id']}"

    mp3 = client.session.get(record["url"], timeout=30)
    assert mp3.status_code == 200
    assert mp3.headers["Content-Type"] == "audio/mpeg"
    assert len(mp3.content) == record["size_bytes"]
    assert mp3.content == client.session.get(over_http["url"], timeout=30).content

    # The WAV is gone once converted; completing again answers the same record, 200.
    assert not pending_exists(store, user["id"], upload["id"])
    again = complete(client, upload, user)
    assert again.status_code == 200, again.text
    assert again.json() == record
    assert again.headers["Location"] == record["url"]
    assert records_of(store, user["id"]).count(record["id"]) == 1


def test_prefer_wait_answers_201_with_the_record(client: Client) -> None:
    user = client.create_user("Pat")
    upload = presign(client, user, filename="quick.wav").json()
    send_to_bucket(upload, wavgen.wav(seconds=1.0))
    done = complete(client, upload, user, prefer="respond-async, wait=60")  # clamped to 25
    assert done.status_code == 201, done.text
    assert done.headers["Preference-Applied"] == "wait=25"
    record = done.json()
    assert record["filename"] == "quick.mp3"
    assert done.headers["Location"] == record["url"]
    assert status(client, upload["id"], user).json()["record"] == record


@pytest.mark.parametrize("prefer", ["wait=soon", "wait", "wait=-1", "wait=1.5", ";;"])
def test_unparsable_prefer_is_ignored(client: Client, prefer: str) -> None:
    user = client.create_user("Quinn")
    upload = presign(client, user).json()
    send_to_bucket(upload, wavgen.wav(seconds=0.3))
    accepted = complete(client, upload, user, prefer=prefer)
    assert accepted.status_code == 202, accepted.text
    assert "Preference-Applied" not in accepted.headers
    assert poll(client, upload["id"], user)[-1]["status"] == "done"


def test_presign_requires_the_users_token(client: Client) -> None:
    user = client.create_user("Olga")
    cases = [
        ({"json": {"user": user["id"]}}, 401),
        ({"json": {"user": user["id"]}, "headers": {"Authorization": "Bearer " + "0" * 36}}, 401),
        ({"json": {"user": user["id"], "token": user["token"]}}, 201),  # token in the body
        ({"json": {"token": user["token"]}}, 422),  # no user
        ({"data": "{", "headers": {"Content-Type": "application/json"}}, 400),
        ({"json": {"user": 5, "token": user["token"]}}, 422),
        ({"json": {"user": user["id"], "token": user["token"], "filename": ["x"]}}, 422),
        ({"data": "user=1", "headers": {"Content-Type": "text/plain"}}, 415),
    ]
    for kwargs, expected in cases:
        response = client.session.post(f"{client.base_url}/records/uploads", timeout=30, **kwargs)  # type: ignore[arg-type]
        assert response.status_code == expected, (kwargs, response.text)
        if expected >= 400:
            assert response.headers["Content-Type"] == "application/problem+json"
    wrong_method = client.session.get(f"{client.base_url}/records/uploads", timeout=30)
    assert wrong_method.status_code == 405


def test_someone_elses_upload_is_not_found(client: Client, store: Services) -> None:
    alice, mallory = client.create_user("Alice"), client.create_user("Mallory")
    upload = presign(client, alice).json()
    assert send_to_bucket(upload, wavgen.wav(seconds=0.5)).status_code in (200, 201, 204)

    # Mallory with her own credentials: the upload does not exist for her.
    theirs = complete(client, upload, mallory)
    assert theirs.status_code == 404
    unknown = str(uuid.uuid4())
    never_existed = complete(client, {**upload, "complete_url": upload["complete_url"].replace(
        upload["id"], unknown)}, mallory)  # fmt: skip
    assert never_existed.status_code == 404
    assert theirs.json()["detail"] == never_existed.json()["detail"]
    assert status(client, upload["id"], mallory).status_code == 404
    assert status(client, unknown, mallory).status_code == 404
    assert status(client, upload["id"], mallory).json()["detail"] == theirs.json()["detail"]
    # Mallory claiming to be Alice: her token is not Alice's.
    posing = complete(client, upload, {"id": alice["id"], "token": mallory["token"]})
    assert posing.status_code == 401
    assert (
        status(client, upload["id"], {"id": alice["id"], "token": mallory["token"]}).status_code
        == 401
    )
    # Neither attempt touched Alice's upload, and she completes it.
    assert pending_exists(store, alice["id"], upload["id"])
    assert converted(client, upload, alice)["id"]

    for path in ("not-a-uuid/complete", "not-a-uuid"):
        not_an_id = client.session.request(
            "POST" if path.endswith("complete") else "GET",
            f"{client.base_url}/records/uploads/{path}",
            headers={"Authorization": f"Bearer {alice['token']}"},
            params={"user": alice["id"]},
            timeout=30,
        )
        assert not_an_id.status_code == 422, (path, not_an_id.text)
        assert not_an_id.headers["Content-Type"] == "application/problem+json"


def test_completion_before_the_file_arrived_is_a_409(client: Client, store: Services) -> None:
    user = client.create_user("Early")
    upload = presign(client, user).json()
    early = complete(client, upload, user)
    assert early.status_code == 409, early.text
    problem = early.json()
    assert problem["type"].endswith(":upload-not-received")
    assert "has not arrived" in problem["detail"]
    # Nothing was queued: the client sends the file and completes again.
    assert status(client, upload["id"], user).json()["status"] == "uploading"
    send_to_bucket(upload, wavgen.wav(seconds=0.3))
    assert converted(client, upload, user)["duration_seconds"] == pytest.approx(0.3, abs=0.01)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"ID3\x03\x00" + bytes(4000), 415),
        (wavgen.riff(wavgen.fmt_chunk(tag=0x0055), wavgen.chunk(b"data", bytes(400))), 415),
        (wavgen.riff(wavgen.fmt_chunk(rate=4000), wavgen.chunk(b"data", bytes(400))), 422),
        (wavgen.riff(wavgen.fmt_chunk(), wavgen.chunk(b"data", b"")), 422),
    ],
)
def test_invalid_wav_job_fails_with_the_records_problem(
    client: Client, store: Services, content: bytes, expected: int
) -> None:
    user = client.create_user("Ivy")
    upload = presign(client, user).json()
    assert send_to_bucket(upload, content).status_code in (200, 201, 204)
    assert complete(client, upload, user).status_code == 202
    final = poll(client, upload["id"], user)[-1]
    assert final["status"] == "failed"
    assert "record" not in final
    over_http = client.upload(user, content)
    assert over_http.status_code == expected
    problem, reference = final["error"], over_http.json()
    for key in ("type", "title", "status", "detail"):
        assert problem[key] == reference[key], key
    assert problem["instance"] == f"/records/uploads/{upload['id']}"
    # A WAV that can never convert is not kept; completing again answers the stored problem.
    assert not pending_exists(store, user["id"], upload["id"])
    again = complete(client, upload, user)
    assert again.status_code == expected
    assert again.headers["Content-Type"] == "application/problem+json"
    assert again.json() == problem
    assert records_of(store, user["id"]) == []


def test_racing_completions_make_one_record(client: Client, store: Services) -> None:
    """Three completion calls at the same moment: one queues the job, none makes a second record."""
    user = client.create_user("Racer")
    upload = presign(client, user).json()
    send_to_bucket(upload, wavgen.wav(seconds=3.0))
    barrier = threading.Barrier(3)
    answers: list[requests.Response] = []

    def call() -> None:
        barrier.wait()
        answers.append(complete(client, upload, user))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    codes = sorted(a.status_code for a in answers)
    assert codes.count(202) == 1, [(a.status_code, a.text) for a in answers]
    for loser in (a for a in answers if a.status_code != 202):
        assert loser.status_code in (409, 200), loser.text
        if loser.status_code == 409:
            assert loser.headers["Location"] == f"/records/uploads/{upload['id']}"
            assert int(loser.headers["Retry-After"]) >= 1
    record = poll(client, upload["id"], user)[-1]["record"]
    for _ in range(2):
        late = complete(client, upload, user)
        assert late.status_code == 200
        assert late.json() == record
    assert records_of(store, user["id"]) == [record["id"]]
    assert record_objects(store, user["id"]) == [f"users/{user['id']}/records/{record['id']}.mp3"]


def queued_upload(client: Client, store: Services, user: dict[str, str], wav: bytes) -> str:
    """An upload queued on a queue the stack's worker does not poll (as if SQS carried it)."""
    upload = presign(client, user).json()
    send_to_bucket(upload, wav)
    queue = RecordingQueue()
    completion = direct_upload.complete_upload(
        store.db, store.storage, queue, store.settings,
        user_id=uuid.UUID(user["id"]), raw_upload_id=upload["id"],
    )  # fmt: skip
    assert completion.won
    assert queue.sent == [uuid.UUID(upload["id"])]
    return str(upload["id"])


def test_duplicate_delivery_makes_no_second_record(client: Client, store: Services) -> None:
    user = client.create_user("Twice")
    upload_id = uuid.UUID(queued_upload(client, store, user, wavgen.wav(seconds=1.0)))
    s = store.settings
    assert jobs.run_job(store.db, store.storage, s, upload_id) is jobs.Outcome.DONE
    assert jobs.run_job(store.db, store.storage, s, upload_id) is jobs.Outcome.SKIPPED
    (record_id,) = records_of(store, user["id"])
    assert status(client, str(upload_id), user).json()["record"]["id"] == record_id
    assert len(record_objects(store, user["id"])) == 1

    # A delivery while another holds the job's lease is told to come back (BUSY), no work.
    held = uuid.UUID(queued_upload(client, store, user, wavgen.wav(seconds=0.2)))
    store.db.execute(
        sql("UPDATE uploads SET status = 'converting', lease_until = now() + interval '1 hour' "
            "WHERE id = :id"), {"id": held},
    )  # fmt: skip
    assert jobs.run_job(store.db, store.storage, s, held) is jobs.Outcome.BUSY
    assert len(records_of(store, user["id"])) == 1


def test_attempts_are_bounded(client: Client, store: Services) -> None:
    """A job whose every attempt died: the next delivery fails it, and its WAV goes."""
    user = client.create_user("Crashy")
    s = store.settings
    dying = uuid.UUID(queued_upload(client, store, user, wavgen.wav(seconds=0.2)))
    store.db.execute(
        sql("UPDATE uploads SET status = 'converting', attempts = :n, "
            "lease_until = now() - interval '1 second' WHERE id = :id"),
        {"id": dying, "n": s.job_max_attempts},
    )  # fmt: skip
    assert jobs.run_job(store.db, store.storage, s, dying) is jobs.Outcome.FAILED
    final = status(client, str(dying), user).json()
    assert final["status"] == "failed"
    assert final["error"]["type"].endswith(":conversion-abandoned")
    assert not pending_exists(store, user["id"], str(dying))
    assert records_of(store, user["id"]) == []

    # No delivery comes after the last one (SQS moved it to the dead-letter queue): the
    # status read itself ends the job.
    stranded = uuid.UUID(queued_upload(client, store, user, wavgen.wav(seconds=0.2)))
    store.db.execute(
        sql("UPDATE uploads SET status = 'converting', attempts = :n, "
            "lease_until = now() - interval '1 second' WHERE id = :id"),
        {"id": stranded, "n": s.job_max_attempts},
    )  # fmt: skip
    seen = status(client, str(stranded), user).json()
    assert seen["status"] == "failed"
    assert seen["error"]["type"].endswith(":conversion-abandoned")
    stranded_url = f"{client.base_url}/records/uploads/{stranded}/complete"
    assert complete(client, {"complete_url": stranded_url}, user).status_code == 422


def test_store_refuses_a_file_over_the_policy_limit(stack: NativeStack, client: Client) -> None:
    """The presigned POST's content-length-range is enforced by SeaweedFS itself."""
    limit = 64 * 1024
    services = build_services(stack, max_direct_upload_bytes=limit)
    user = client.create_user("Max")
    user_id = uuid.UUID(user["id"])

    over = direct_upload.start_upload(services.db, services.storage, services.settings,
                                      user_id=user_id, filename=None)  # fmt: skip
    body = presigned_upload_body(over, client.base_url)
    refused = send_to_bucket(body, secrets.token_bytes(limit + 1))
    assert refused.status_code == 400, refused.text
    assert "EntityTooLarge" in refused.text
    assert not pending_exists(services, user["id"], str(over.id))

    at_limit = direct_upload.start_upload(services.db, services.storage, services.settings,
                                          user_id=user_id, filename=None)  # fmt: skip
    accepted = send_to_bucket(
        presigned_upload_body(at_limit, client.base_url), secrets.token_bytes(limit)
    )
    assert accepted.status_code in (200, 201, 204), accepted.text
    assert pending_exists(services, user["id"], str(at_limit.id))

    # The policy pins the key: the same signature cannot write under another user's prefix.
    other = {**body, "upload": {**body["upload"], "fields": {
        **body["upload"]["fields"], "key": f"uploads/{uuid.uuid4()}/{over.id}.wav"}}}  # fmt: skip
    assert send_to_bucket(other, b"RIFF").status_code == 403


def test_completion_rechecks_the_size(stack: NativeStack, client: Client) -> None:
    """For stores that ignore the policy: an oversized pending WAV is refused and removed."""
    services = build_services(stack, max_direct_upload_bytes=4096)
    user = client.create_user("Big")
    user_id = uuid.UUID(user["id"])
    started = direct_upload.start_upload(services.db, services.storage, services.settings,
                                         user_id=user_id, filename=None)  # fmt: skip
    key = direct_upload.pending_key(user_id, started.id)
    services.storage.client.put_object(
        Bucket=services.storage.bucket, Key=key, Body=wavgen.wav(seconds=0.1)
    )
    with pytest.raises(PayloadTooLarge):
        direct_upload.complete_upload(services.db, services.storage, services.queue,
                                      services.settings, user_id=user_id,
                                      raw_upload_id=str(started.id))  # fmt: skip
    assert not pending_exists(services, user["id"], str(started.id))
    final = status(client, str(started.id), user).json()
    assert final["status"] == "failed"
    assert final["error"]["status"] == 413


def test_store_outage_at_completion_is_a_503(stack: NativeStack, client: Client) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    services = build_services(stack, s3_endpoint_url=dead, s3_timeout_seconds=2.0)
    user_id = uuid.UUID(client.create_user("Outage")["id"])
    # Signing the form needs no store; looking for the WAV at completion does.
    started = direct_upload.start_upload(
        services.db, services.storage, services.settings, user_id=user_id, filename=None
    )
    with pytest.raises(DependencyUnavailable) as caught:
        direct_upload.complete_upload(
            services.db,
            services.storage,
            services.queue,
            services.settings,
            user_id=user_id,
            raw_upload_id=str(started.id),
        )
    assert caught.value.status == 503
    assert caught.value.retry_after


def test_presigned_for_the_public_endpoint(stack: NativeStack, client: Client) -> None:
    services = build_services(stack, s3_public_endpoint_url="https://media.example.com")
    user_id = uuid.UUID(client.create_user("Pub")["id"])
    upload = direct_upload.start_upload(
        services.db, services.storage, services.settings, user_id=user_id, filename="a.wav"
    )
    assert upload.url.startswith("https://media.example.com/")
    assert upload.fields["x-amz-meta-filename"] == "a.wav"


def test_bucket_lifecycle_expires_abandoned_uploads(store: Services) -> None:
    rules = store.storage.client.get_bucket_lifecycle_configuration(Bucket=store.storage.bucket)[
        "Rules"
    ]
    pending = [r for r in rules if r.get("Filter", {}).get("Prefix") == "uploads/"]
    assert pending, rules
    assert pending[0]["Status"] == "Enabled"
    assert pending[0]["Expiration"]["Days"] == bucket.EXPIRE_PENDING_UPLOADS_AFTER_DAYS


# --- long WAVs: progress, a worker killed mid-conversion, and memory ------------------------


def send_long_wav(client: Client, user: dict[str, str], seconds: float) -> dict[str, Any]:
    """A silent CD-quality WAV of ``seconds``, generated as it is sent to the bucket."""
    upload: dict[str, Any] = presign(client, user, filename="long take.wav").json()
    post = upload["upload"]
    size = 44 + int(seconds * 44100) * 4
    form = StreamingForm(
        post["fields"], "long take.wav", wavgen.silence_wav(seconds, channels=2), size
    )
    sent = requests.post(
        post["url"], data=form, headers={"Content-Type": form.content_type}, timeout=600
    )
    assert sent.status_code in (200, 201, 204), sent.text[:500]
    return upload


@pytest.mark.timeout(900)
def test_ten_minute_wav_shows_progress(client: Client, store: Services) -> None:
    user = client.create_user("Progress")
    upload = send_long_wav(client, user, 600.0)
    assert complete(client, upload, user).status_code == 202
    seen = poll(client, upload["id"], user, every=0.1)
    assert seen[-1]["status"] == "done"
    assert seen[-1]["record"]["duration_seconds"] == pytest.approx(600.0, abs=0.01)
    moving = [b["progress"] for b in seen if b["status"] == "converting"]
    assert moving == sorted(moving)  # never backwards within one attempt
    assert len(set(moving)) >= 3, moving
    assert all(0.0 <= p < 1.0 for p in moving)


@pytest.mark.timeout(900)
def test_worker_killed_mid_conversion_retries_into_one_record(
    stack: NativeStack, client: Client, store: Services
) -> None:
    """SIGKILL of the worker process (and its ffmpeg) halfway: the lease runs out, the job is
    taken again, and there is exactly one record and one MP3, with no multipart upload left."""
    stack.restart_worker({"JOB_LEASE_SECONDS": "3"})
    try:
        user = client.create_user("Killed")
        upload = send_long_wav(client, user, 600.0)
        assert complete(client, upload, user).status_code == 202
        deadline = time.monotonic() + 300
        while True:
            body = status(client, upload["id"], user).json()
            if body["status"] == "converting" and body["progress"] >= 0.2:
                break
            assert body["status"] in ("queued", "converting"), body
            assert time.monotonic() < deadline, body
            time.sleep(0.05)
        worker = stack.processes["upload_worker"]
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        row = store.db.execute(
            sql("SELECT status, attempts FROM uploads WHERE id = :id"),
            {"id": uuid.UUID(upload["id"])},
        )[0]
        assert (row.status, row.attempts) == ("converting", 1)  # left behind, lease running out
        stack.start_worker({"JOB_LEASE_SECONDS": "3"})
        final = poll(client, upload["id"], user)[-1]
    finally:
        stack.restart_worker()
    assert final["status"] == "done", final
    record = final["record"]
    attempts = store.db.execute(
        sql("SELECT attempts FROM uploads WHERE id = :id"), {"id": uuid.UUID(upload["id"])}
    )[0][0]
    assert attempts == 2
    assert records_of(store, user["id"]) == [record["id"]]
    key = f"users/{user['id']}/records/{record['id']}.mp3"
    assert record_objects(store, user["id"]) == [key]
    parts = store.storage.client.list_multipart_uploads(Bucket=store.storage.bucket, Prefix=key)
    assert not parts.get("Uploads"), parts["Uploads"]
    mp3 = client.session.get(record["url"], timeout=60)
    assert len(mp3.content) == record["size_bytes"]
    assert not pending_exists(store, user["id"], upload["id"])


# --- a 300 MB WAV, with the worker's memory watched -----------------------------------------


class StreamingForm:
    """A multipart/form-data body generated as it is sent, with its length known up front."""

    def __init__(self, fields: dict[str, str], filename: str, parts: Iterable[bytes], size: int):
        self.boundary = "----direct-upload-" + secrets.token_hex(12)
        head = b"".join(
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'.encode()
            + v.encode()
            + b"\r\n"
            for k, v in fields.items()
        )
        head += (
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{filename}"\r\nContent-Type: audio/wav\r\n\r\n'
        ).encode()
        self.head = head
        self.tail = f"\r\n--{self.boundary}--\r\n".encode()
        self.parts = parts
        self.length = len(head) + size + len(self.tail)

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        yield from self.parts
        yield self.tail


def process_tree_rss(root: int) -> dict[int, tuple[str, int]]:
    """{pid: (name, RSS bytes)} for ``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    result: dict[int, tuple[str, int]] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        result[pid] = (fields["Name"].strip(), rss)
        todo.extend(children.get(pid, []))
    return result


class RssSampler(threading.Thread):
    """Samples the function's RSS (its Python processes; ffmpeg is counted apart)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_python = 0
        self.peak_ffmpeg = 0
        self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            tree = process_tree_rss(self.pid)
            python = sum(rss for name, rss in tree.values() if name != "ffmpeg")
            ffmpeg = sum(rss for name, rss in tree.values() if name == "ffmpeg")
            self.peak_python = max(self.peak_python, python)
            self.peak_ffmpeg = max(self.peak_ffmpeg, ffmpeg)
            self.samples += 1
            self.stop.wait(0.05)


@pytest.mark.timeout(1200)
def test_300_mb_wav_with_flat_memory(stack: NativeStack, client: Client, store: Services) -> None:
    user = client.create_user("Long Take")
    # Warm the function up (imports, pools, first multipart upload) before the baseline.
    warm = presign(client, user).json()
    send_to_bucket(warm, wavgen.wav(seconds=1.0))
    converted(client, warm, user)

    function_pid = stack.processes["upload_worker"].pid
    baseline = sum(rss for name, rss in process_tree_rss(function_pid).values() if name != "ffmpeg")
    rate, channels = 44100, 2
    seconds = 300_000_000 / (rate * channels * 2)
    size = 44 + int(seconds * rate) * channels * 2
    assert size >= 300_000_000

    upload = presign(client, user, filename="long take.wav").json()
    post = upload["upload"]
    form = StreamingForm(
        post["fields"], "long take.wav", wavgen.silence_wav(seconds, channels=channels), size
    )
    started = time.monotonic()
    sent = requests.post(
        post["url"], data=form, headers={"Content-Type": form.content_type}, timeout=600
    )
    upload_seconds = time.monotonic() - started
    assert sent.status_code in (200, 201, 204), sent.text[:500]
    head = store.storage.client.head_object(Bucket=store.storage.bucket, Key=post["fields"]["key"])
    assert head["ContentLength"] == size

    sampler = RssSampler(function_pid)
    sampler.start()
    started = time.monotonic()
    try:
        record = converted(client, upload, user)
    finally:
        sampler.stop.set()
        sampler.join()
    convert_seconds = time.monotonic() - started
    assert record["duration_seconds"] == pytest.approx(seconds, abs=0.01)
    assert record["filename"] == "long take.mp3"
    growth = sampler.peak_python - baseline
    print(
        f"\n300 MB direct upload: sent in {upload_seconds:.1f}s, converted in "
        f"{convert_seconds:.1f}s; worker RSS baseline {baseline / 2**20:.1f} MiB, peak "
        f"{sampler.peak_python / 2**20:.1f} MiB (+{growth / 2**20:.1f} MiB) over "
        f"{sampler.samples} samples; ffmpeg peak {sampler.peak_ffmpeg / 2**20:.1f} MiB"
    )
    assert sampler.samples > 10
    # Flat: a few S3 parts and pipe buffers, never the WAV (300 MB) or the MP3 (~40 MB).
    assert growth < 64 * 2**20, growth
    assert not pending_exists(store, user["id"], upload["id"])
    # The MP3 is whole: its length matches, and a range from its end comes back.
    tail = client.session.get(record["url"], headers={"Range": "bytes=-1024"}, timeout=60)
    assert tail.status_code == 206
    assert tail.headers["Content-Range"].endswith(f"/{record['size_bytes']}")


def test_router_never_routes_task_pushes(client: Client) -> None:
    """/_tasks/convert is for Cloud Tasks on Cloud Run only; the router answers 404 for it."""
    for method in ("POST", "GET"):
        pushed = client.session.request(
            method, f"{client.base_url}/_tasks/convert", json={"upload_id": str(uuid.uuid4())},
            headers={"Authorization": "Bearer x"}, timeout=30,
        )  # fmt: skip
        assert pushed.status_code == 404, pushed.text


def test_sweep_sends_a_stalled_cloud_job_again(client: Client, store: Services) -> None:
    """A job queued on SQS whose message never arrived: the sweep enqueues it once more, and
    a job of the deployment's Postgres queue (the row is the message) is never re-sent."""
    user = client.create_user("Lost message")
    upload_id = uuid.UUID(queued_upload(client, store, user, wavgen.wav(seconds=0.2)))
    queue = RecordingQueue()
    on_sqs = dataclasses.replace(store.settings, job_queue=JobQueueKind.SQS)
    now = datetime.now(UTC)
    assert jobs.requeue_stalled(store.db, queue, on_sqs, cutoff=now - timedelta(hours=1)) == []
    assert upload_id in jobs.requeue_stalled(store.db, queue, on_sqs, cutoff=now)
    assert queue.sent.count(upload_id) == 1
    assert jobs.requeue_stalled(store.db, queue, store.settings, cutoff=now) == []
    # The second delivery converts it, as the first would have.
    assert jobs.run_job(store.db, store.storage, on_sqs, upload_id) is jobs.Outcome.DONE
    assert upload_id not in jobs.requeue_stalled(store.db, queue, on_sqs, cutoff=now)


def test_job_of_a_user_erased_meanwhile_leaves_nothing(client: Client, store: Services) -> None:
    """The user is erased after the job was queued: the job ends without a record, and
    neither its MP3 nor its WAV stays in the bucket."""
    user = client.create_user("Erased while queued")
    upload_id = uuid.UUID(queued_upload(client, store, user, wavgen.wav(seconds=0.5)))
    erased = client.session.delete(
        f"{client.base_url}/users/{user['id']}",
        headers={"Authorization": f"Bearer {user['token']}"},
        timeout=60,
    )
    assert erased.status_code == 204, erased.text
    outcome = jobs.run_job(store.db, store.storage, store.settings, upload_id)
    assert outcome is jobs.Outcome.SKIPPED
    assert records_of(store, user["id"]) == []
    assert record_objects(store, user["id"]) == []
    assert not pending_exists(store, user["id"], str(upload_id))


def test_sweep_forgets_uploads_never_completed(client: Client, store: Services) -> None:
    user = client.create_user("Never completed")
    upload = presign(client, user).json()
    send_to_bucket(upload, wavgen.wav(seconds=0.2))
    later = datetime.now(UTC) + timedelta(seconds=1)
    assert jobs.forget_abandoned_uploads(store.db, store.storage, cutoff=later) >= 1
    assert not pending_exists(store, user["id"], upload["id"])
    gone = status(client, upload["id"], user)
    assert gone.status_code == 404, gone.text
