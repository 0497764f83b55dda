"""End to end: the README's user journey, through nginx, against the running native stack."""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from common.platform.runtime import Services

from devstack import NativeStack, ScratchStack, wavgen
from tests.support import Client
from tests.support.probe import probe_mp3

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_health(stack: NativeStack) -> None:
    response = requests.get(f"{stack.base_url}/healthz", timeout=10)
    assert response.status_code == 200


def test_readme_journey_with_curl(stack: NativeStack, tmp_path: Path) -> None:
    """The three curl lines of the README, run as written (host and port aside)."""
    (tmp_path / "take.wav").write_bytes(wavgen.wav(seconds=3.0, channels=2, rate=44100))
    base = stack.base_url.replace("127.0.0.1", "localhost")

    def curl(*args: str) -> str:
        return subprocess.run(
            ["curl", "-s", *args], cwd=tmp_path, capture_output=True, text=True, check=True
        ).stdout

    import json

    user = json.loads(
        curl("-X", "POST", f"{base}/users", "-H", "Content-Type: application/json",
             "-d", '{"name":"Alice"}')
    )  # fmt: skip
    assert set(user) == {"id", "name", "token"}
    assert user["name"] == "Alice"
    assert UUID4.match(user["id"]) and UUID4.match(user["token"])

    record = json.loads(
        curl("-X", "POST", f"{base}/records", "-F", f"user={user['id']}",
             "-F", f"token={user['token']}", "-F", "file=@take.wav")
    )  # fmt: skip
    assert UUID4.match(record["id"])
    assert record["url"] == f"{base}/record?id={record['id']}&user={user['id']}"
    assert record["duration_seconds"] == 3.0
    assert record["bitrate_kbps"] == 192
    assert abs(record["size_bytes"] - 72000) < 2000  # 3 s at 192 kbit/s, whole frames

    (tmp_path / "take.wav").unlink()
    headers = curl("-OJ", "-D", "-", record["url"])
    assert headers.startswith("HTTP/1.1 200")
    assert "content-type: audio/mpeg" in headers.lower()
    assert 'filename="take.mp3"' in headers
    mp3 = (tmp_path / "take.mp3").read_bytes()
    assert len(mp3) == record["size_bytes"]
    info = probe_mp3(mp3)
    assert info.codec == "mp3" and info.sample_rate == 44100 and info.channels == 2
    assert abs(info.duration - 3.0) < 0.1


@pytest.mark.parametrize(
    ("bits", "tag", "extensible", "channels", "rate"),
    wavgen.ACCEPTED_VARIANTS,
    ids=wavgen.VARIANT_IDS,
)
def test_every_supported_variant_converts(
    client: Client, bits: int, tag: int, extensible: bool, channels: int, rate: int
) -> None:
    user = client.create_user("Variant")
    seconds = 1.5
    data = wavgen.wav(
        seconds=seconds, channels=channels, rate=rate, bits=bits, tag=tag, extensible=extensible
    )
    response = client.upload(user, data)
    assert response.status_code == 201, response.text
    record = response.json()
    assert record["duration_seconds"] == seconds
    assert record["channels"] == min(channels, 2)
    download = client.session.get(record["url"], timeout=30)
    assert download.status_code == 200
    info = probe_mp3(download.content)
    assert info.codec == "mp3"
    assert info.channels == min(channels, 2)
    expected_rate = {96000: 48000, 192000: 48000, 88200: 44100}.get(rate, rate)
    assert info.sample_rate == expected_rate == record["sample_rate"]
    # Duration within 0.1 s, encoder padding aside (LAME adds under two frames; a frame is
    # 1152 samples at 32 kHz and up, 576 below).
    frame = 1152 if expected_rate >= 32000 else 576
    padding = 2 * frame / expected_rate
    assert seconds - 0.1 <= info.duration <= seconds + 0.1 + padding
    assert record["bitrate_kbps"] == (
        192 if expected_rate >= 32000 else min(160, record["bitrate_kbps"])
    )


def test_location_header_and_bearer_token(client: Client) -> None:
    user = client.create_user("Bearer")
    response = client.session.post(
        f"{client.base_url}/records",
        data={"user": user["id"]},
        files={"file": ("b.wav", wavgen.wav(seconds=0.5), "audio/wav")},
        headers={"Authorization": f"Bearer {user['token']}"},
        timeout=60,
    )
    assert response.status_code == 201, response.text
    assert response.headers["Location"] == response.json()["url"]


def test_raw_wav_body_with_bearer(client: Client) -> None:
    user = client.create_user("Raw")
    response = client.session.post(
        f"{client.base_url}/records?user={user['id']}",
        data=wavgen.wav(seconds=0.5),
        headers={"Authorization": f"Bearer {user['token']}", "Content-Type": "audio/wav"},
        timeout=60,
    )
    assert response.status_code == 201, response.text
    assert response.json()["duration_seconds"] == 0.5


def test_chunked_upload_streams(client: Client) -> None:
    """A body without Content-Length (chunked), generated on the fly."""
    user = client.create_user("Chunked")
    boundary = "xyzzy"

    def part(headers: str) -> str:
        return f"--{boundary}\r\nContent-Disposition: form-data; {headers}\r\n\r\n"

    def body() -> Iterator[bytes]:
        yield (
            part('name="user"') + user["id"] + "\r\n"
            + part('name="token"') + user["token"] + "\r\n"
            + part('name="file"; filename="long.wav"')
        ).encode()  # fmt: skip
        yield from wavgen.silence_wav(20.0)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.session.post(
        f"{client.base_url}/records",
        data=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        timeout=120,
    )
    assert response.status_code == 201, response.text
    assert response.json()["duration_seconds"] == 20.0
    assert response.json()["filename"] == "long.mp3"


def test_function_honours_the_routers_forwarded_headers(client: Client, stack: NativeStack) -> None:
    user = client.create_user("Proxy")
    response = requests.post(
        f"http://127.0.0.1:{stack.ports.upload_record}/records",  # as the router calls it
        data={"user": user["id"], "token": user["token"]},
        files={"file": ("p.wav", wavgen.wav(seconds=0.2), "audio/wav")},
        headers={"X-Forwarded-Host": "records.example.com:9443", "X-Forwarded-Proto": "https"},
        timeout=60,
    )
    assert response.status_code == 201, response.text
    assert response.json()["url"].startswith("https://records.example.com:9443/record?id=")


def test_router_replaces_client_forwarded_headers(client: Client, stack: NativeStack) -> None:
    user = client.create_user("Spoofer")
    response = client.session.post(
        f"{client.base_url}/records",
        data={"user": user["id"], "token": user["token"]},
        files={"file": ("p.wav", wavgen.wav(seconds=0.2), "audio/wav")},
        headers={"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"},
        timeout=60,
    )
    assert response.status_code == 201, response.text
    assert response.json()["url"].startswith(f"http://127.0.0.1:{stack.ports.router}/record?")


@pytest.mark.parametrize("host", ["a b", "evil.com/x?", "<script>", "", "exa_mple:99999999"])
def test_strange_forwarded_hosts_never_reach_the_url(
    client: Client, stack: NativeStack, host: str
) -> None:
    user = client.create_user("Strange")
    response = requests.post(
        f"http://127.0.0.1:{stack.ports.upload_record}/records",
        data={"user": user["id"], "token": user["token"]},
        files={"file": ("p.wav", wavgen.wav(seconds=0.1), "audio/wav")},
        headers={"X-Forwarded-Host": host},
        timeout=60,
    )
    assert response.status_code == 201, response.text
    assert response.json()["url"].startswith(f"http://127.0.0.1:{stack.ports.upload_record}/")


def test_host_and_port_are_the_clients(client: Client, stack: NativeStack) -> None:
    user = client.create_user("Host")
    response = client.upload(user, wavgen.wav(seconds=0.2))
    assert response.json()["url"].startswith(f"http://127.0.0.1:{stack.ports.router}/record?id=")


@pytest.fixture(params=["accel", "stream"])
def download_mode(request: pytest.FixtureRequest, stack: ScratchStack) -> Iterator[str]:
    """get_record in each mode the router fronts: accel (the stack's default) and stream."""
    with stack.download_mode(request.param) as mode:
        yield mode


def test_download_features(client: Client, download_mode: str) -> None:
    user = client.create_user("Ranges")
    record = client.upload(user, wavgen.wav(seconds=2.0)).json()
    url = record["url"]
    full = client.session.get(url, timeout=30)
    size = record["size_bytes"]
    assert full.status_code == 200 and len(full.content) == size
    assert full.headers["Content-Length"] == str(size)
    assert full.headers["Accept-Ranges"] == "bytes"
    etag = full.headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"')

    head = client.session.head(url, timeout=30)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == str(size) and head.headers["ETag"] == etag

    part = client.session.get(url, headers={"Range": "bytes=100-199"}, timeout=30)
    assert part.status_code == 206
    assert part.content == full.content[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{size}"

    tail = client.session.get(url, headers={"Range": "bytes=-50"}, timeout=30)
    assert tail.status_code == 206 and tail.content == full.content[-50:]

    open_end = client.session.get(url, headers={"Range": f"bytes={size - 10}-"}, timeout=30)
    assert open_end.status_code == 206 and open_end.content == full.content[-10:]

    beyond = client.session.get(url, headers={"Range": f"bytes={size + 10}-"}, timeout=30)
    assert beyond.status_code == 416
    assert beyond.headers["Content-Range"] == f"bytes */{size}"
    assert beyond.headers["Content-Type"] == "application/problem+json"

    cached = client.session.get(url, headers={"If-None-Match": etag}, timeout=30)
    assert cached.status_code == 304 and cached.content == b""

    stale = client.session.get(
        url, headers={"Range": "bytes=0-9", "If-Range": '"other"'}, timeout=30
    )
    assert stale.status_code == 200 and stale.content == full.content

    fresh = client.session.get(url, headers={"Range": "bytes=0-9", "If-Range": etag}, timeout=30)
    assert fresh.status_code == 206 and fresh.content == full.content[:10]

    assert head.headers["Accept-Ranges"] == "bytes"  # (a 206 need not repeat it)
    for response in (full, part, head):
        assert response.headers["Content-Type"] == "audio/mpeg"
        assert response.headers["Cache-Control"] == "private, no-cache"
        assert 'filename="take.mp3"' in response.headers["Content-Disposition"]
        # Nothing of the store or the router's internals reaches the client.
        leaked = [
            h for h in response.headers if h.lower().startswith(("x-amz", "seaweed", "x-accel"))
        ]
        assert leaked == []


def test_router_serves_the_same_bytes_as_the_store(
    client: Client, stack: NativeStack, services: Services
) -> None:
    user = client.create_user("Bytes")
    record = client.upload(user, wavgen.wav(seconds=3.0)).json()
    key = f"users/{user['id']}/records/{record['id']}.mp3"
    stored = services.storage.client.get_object(Bucket="records", Key=key)["Body"].read()
    for _ in range(2):  # a miss, then a hit of the router's cache
        downloaded = client.session.get(record["url"], timeout=30)
        assert downloaded.status_code == 200 and downloaded.content == stored


def test_the_routers_store_location_is_internal(client: Client, stack: NativeStack) -> None:
    user = client.create_user("Internal")
    record = client.upload(user, wavgen.wav(seconds=1.0)).json()
    key = f"users/{user['id']}/records/{record['id']}.mp3"
    for path in (f"/_store/records/{key}", f"/_store/records/{key}?X-Amz-Signature=0"):
        direct = client.session.get(client.base_url + path, timeout=30)
        assert direct.status_code == 404
        assert direct.headers["Content-Type"] == "application/problem+json"
        assert not direct.content.startswith(b"\xff")  # no MP3 frames


def test_a_record_whose_object_is_gone_is_a_404_problem(
    client: Client, stack: NativeStack, services: Services
) -> None:
    user = client.create_user("Gone")
    record = client.upload(user, wavgen.wav(seconds=1.0)).json()
    services.storage.delete(f"users/{user['id']}/records/{record['id']}.mp3")
    missing = client.session.get(record["url"], timeout=30)
    assert missing.status_code == 404
    assert missing.headers["Content-Type"] == "application/problem+json"
    assert missing.json()["detail"] == "The record's audio is missing from storage."


def test_redirect_mode(stack: ScratchStack, client: Client) -> None:
    user = client.create_user("Redirect")
    record = client.upload(user, wavgen.wav(seconds=1.0), filename="song.wav").json()
    streamed = client.session.get(record["url"], timeout=30).content
    stack.restart_function(
        "get_record", {"DOWNLOAD_MODE": "redirect", "PRESIGN_EXPIRES_SECONDS": "120"}
    )
    try:
        redirect = client.session.get(record["url"], allow_redirects=False, timeout=30)
        assert redirect.status_code == 307
        location = redirect.headers["Location"]
        assert location.startswith(f"{stack.s3_url}/records/users/{user['id']}/records/")
        assert "X-Amz-Expires=120" in location and "X-Amz-Signature=" in location
        followed = requests.get(location, timeout=30)
        assert followed.status_code == 200
        assert followed.content == streamed
        assert "song.mp3" in followed.headers["Content-Disposition"]
        # Only the owner's link redirects.
        other = client.session.get(
            f"{client.base_url}/record?id={record['id']}&user={uuid.uuid4()}",
            allow_redirects=False,
            timeout=30,
        )
        assert other.status_code == 404
    finally:
        stack.restart_function("get_record")
    assert client.session.get(record["url"], timeout=30).status_code == 200


def test_curl_is_available() -> None:
    assert shutil.which("curl"), "the README's examples use curl"
