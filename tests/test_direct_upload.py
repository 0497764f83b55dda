"""Direct uploads end to end: presign through the router, the WAV sent by a plain HTTP client
straight to SeaweedFS, conversion from the bucket, download; the size policy as the store
enforces it; someone else's upload; and a 300 MB WAV with the function's memory measured.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import wavgen
from botocore.exceptions import ClientError
from common.domain import uploads as direct_upload
from common.errors import DependencyUnavailable, PayloadTooLarge
from common.ops import bucket
from common.platform.runtime import Services
from conftest import Client
from devstack import NativeStack
from stack import free_port
from stack_clients import build_services

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


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


def complete(client: Client, upload: dict[str, Any], user: dict[str, str]) -> requests.Response:
    return client.session.post(
        upload["complete_url"],
        headers={"Authorization": f"Bearer {user['token']}"},
        params={"user": user["id"]},
        timeout=900,
    )


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
    # Signed for the public endpoint, under a pending key of this user.
    assert upload["upload"]["url"].startswith(store.settings.s3_public_endpoint_url or "-")
    assert upload["upload"]["fields"]["key"] == f"uploads/{user['id']}/{upload['id']}.wav"

    sent = send_to_bucket(upload, wav)
    assert sent.status_code in (200, 201, 204), sent.text
    assert pending_exists(store, user["id"], upload["id"])

    done = complete(client, upload, user)
    assert done.status_code == 201, done.text
    record = done.json()
    over_http = client.upload(user, wav, filename="Live at Ronnie\u2019s.wav").json()
    assert set(record) == set(over_http)
    for key in ("duration_seconds", "size_bytes", "bitrate_kbps", "sample_rate", "channels"):
        assert record[key] == over_http[key], key
    assert record["filename"] == over_http["filename"] == "Live at Ronnie\u2019s.mp3"
    assert record["url"] == f"{client.base_url}/record?id={record['id']}&user={user['id']}"
    assert done.headers["Location"] == record["url"]

    mp3 = client.session.get(record["url"], timeout=30)
    assert mp3.status_code == 200
    assert mp3.headers["Content-Type"] == "audio/mpeg"
    assert len(mp3.content) == record["size_bytes"]
    assert mp3.content == client.session.get(over_http["url"], timeout=30).content

    # The WAV is gone once converted, and completing again finds nothing.
    assert not pending_exists(store, user["id"], upload["id"])
    again = complete(client, upload, user)
    assert again.status_code == 404
    assert again.headers["Content-Type"] == "application/problem+json"


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
    for kwargs, status in cases:
        response = client.session.post(f"{client.base_url}/records/uploads", timeout=30, **kwargs)  # type: ignore[arg-type]
        assert response.status_code == status, (kwargs, response.text)
        if status >= 400:
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
    never_existed = complete(client, {**upload, "complete_url": upload["complete_url"].replace(
        upload["id"], str(uuid.uuid4()))}, mallory)  # fmt: skip
    assert never_existed.status_code == 404
    assert theirs.json()["detail"] == never_existed.json()["detail"]
    # Mallory claiming to be Alice: her token is not Alice's.
    posing = complete(client, upload, {"id": alice["id"], "token": mallory["token"]})
    assert posing.status_code == 401
    # Neither attempt touched Alice's upload, and she completes it.
    assert pending_exists(store, alice["id"], upload["id"])
    assert complete(client, upload, alice).status_code == 201

    not_an_id = client.session.post(
        f"{client.base_url}/records/uploads/not-a-uuid/complete",
        headers={"Authorization": f"Bearer {alice['token']}"},
        params={"user": alice["id"]},
        timeout=30,
    )
    assert not_an_id.status_code == 404


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b"ID3\x03\x00" + bytes(4000), 415),
        (wavgen.riff(wavgen.fmt_chunk(tag=0x0055), wavgen.chunk(b"data", bytes(400))), 415),
        (wavgen.riff(wavgen.fmt_chunk(rate=4000), wavgen.chunk(b"data", bytes(400))), 422),
        (wavgen.riff(wavgen.fmt_chunk(), wavgen.chunk(b"data", b"")), 422),
    ],
)
def test_invalid_wav_same_errors_as_records(
    client: Client, store: Services, content: bytes, status: int
) -> None:
    user = client.create_user("Ivy")
    upload = presign(client, user).json()
    assert send_to_bucket(upload, content).status_code in (200, 201, 204)
    done = complete(client, upload, user)
    over_http = client.upload(user, content)
    assert done.status_code == over_http.status_code == status
    problem, expected = done.json(), over_http.json()
    for key in ("type", "title", "status", "detail"):
        assert problem[key] == expected[key], key
    # A WAV that can never convert is not kept.
    assert not pending_exists(store, user["id"], upload["id"])


def test_store_refuses_a_file_over_the_policy_limit(stack: NativeStack, client: Client) -> None:
    """The presigned POST's content-length-range is enforced by SeaweedFS itself."""
    limit = 64 * 1024
    services = build_services(stack, max_direct_upload_bytes=limit)
    user = client.create_user("Max")
    user_id = uuid.UUID(user["id"])

    over = direct_upload.start_upload(services.storage, services.settings, user_id=user_id,
                                      filename=None)  # fmt: skip
    body = over.to_json(client.base_url)
    refused = send_to_bucket(body, secrets.token_bytes(limit + 1))
    assert refused.status_code == 400, refused.text
    assert "EntityTooLarge" in refused.text
    assert not pending_exists(services, user["id"], str(over.id))

    at_limit = direct_upload.start_upload(services.storage, services.settings, user_id=user_id,
                                          filename=None)  # fmt: skip
    accepted = send_to_bucket(at_limit.to_json(client.base_url), secrets.token_bytes(limit))
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
    user_id, upload_id = uuid.UUID(user["id"]), uuid.uuid4()
    key = direct_upload.pending_key(user_id, upload_id)
    services.storage.client.put_object(
        Bucket=services.storage.bucket, Key=key, Body=wavgen.wav(seconds=0.1)
    )
    with pytest.raises(PayloadTooLarge):
        direct_upload.complete_upload(services.db, services.storage, services.settings,
                                      user_id=user_id, raw_upload_id=str(upload_id))  # fmt: skip
    assert not pending_exists(services, user["id"], str(upload_id))


def test_store_outage_at_completion_is_a_503(stack: NativeStack) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    services = build_services(stack, s3_endpoint_url=dead, s3_timeout_seconds=2.0)
    with pytest.raises(DependencyUnavailable) as caught:
        direct_upload.complete_upload(
            services.db,
            services.storage,
            services.settings,
            user_id=uuid.uuid4(),
            raw_upload_id=str(uuid.uuid4()),
        )
    assert caught.value.status == 503
    assert caught.value.headers["Retry-After"]


def test_presigned_for_the_public_endpoint(stack: NativeStack) -> None:
    services = build_services(stack, s3_public_endpoint_url="https://media.example.com")
    upload = direct_upload.start_upload(
        services.storage, services.settings, user_id=uuid.uuid4(), filename="a.wav"
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


# --- a 300 MB WAV, with the function's memory watched --------------------------------------


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
    assert complete(client, warm, user).status_code == 201

    function_pid = stack.processes["upload_record"].pid
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
        done = complete(client, upload, user)
    finally:
        sampler.stop.set()
        sampler.join()
    convert_seconds = time.monotonic() - started
    assert done.status_code == 201, done.text
    record = done.json()
    assert record["duration_seconds"] == pytest.approx(seconds, abs=0.01)
    assert record["filename"] == "long take.mp3"
    growth = sampler.peak_python - baseline
    print(
        f"\n300 MB direct upload: sent in {upload_seconds:.1f}s, converted in "
        f"{convert_seconds:.1f}s; function RSS baseline {baseline / 2**20:.1f} MiB, peak "
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
