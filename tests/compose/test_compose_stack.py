"""docker-compose.yml end to end, in the order a user lives it (the tests share one stack).

1. build every image from ./Dockerfile and ``up --build --wait``; the images meet their
   size and start-up targets;
2. the end-to-end path through the router on the published port, in both download modes,
   a direct upload from the host to the published storage port, converted by the
   upload_worker service, also when that worker is SIGKILLed mid-conversion, and the record
   lifecycle (list, delete, rotate, erase);
3. ``down`` (volumes kept) + ``up``: users, records and MP3s are all still there; then
   ``restart postgres`` alone: the same;
4. ``up --scale upload_record=3``: uploads spread over the three replicas (their logs say
   which stored what) and all succeed;
5. ``down -v`` leaves nothing of the project behind.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tempfile
import time
from urllib.parse import urlsplit

import pg8000.native
import pytest
import requests
from common.domain.encoding import mp3_sample_rate

from devstack import images as image_report
from devstack import wavgen
from tests.support import image_botocore_services

from .conftest import (
    ROOT,
    Compose,
    completed,
    converting_direct_upload,
    create_user,
    download,
    job_row,
)

pytestmark = [pytest.mark.compose, pytest.mark.timeout(2400)]

FUNCTIONS = ("create_user", "upload_record", "get_record")
# The services botocore finds models for in the image (each one's model must also load).
BOTOCORE_MODELS = (
    "import botocore.session as b; s = b.get_session(); names = s.get_available_services(); "
    "[s.get_service_model(n) for n in names]; print(*names)"
)
# (bits, channels, rate, tag, extensible): the formats users send, each through ffmpeg in the image
WAVS = [
    (16, 2, 44100, wavgen.PCM, False),
    (8, 1, 8000, wavgen.PCM, False),
    (24, 1, 96000, wavgen.PCM, False),
    (32, 6, 48000, wavgen.FLOAT, True),
]


def ffprobe(data: bytes) -> dict[str, str]:
    """codec, rate, channels and duration of an MP3 (from a file: a pipe has no duration)."""
    binary = shutil.which("ffprobe")
    assert binary, "ffprobe is needed on the host (make tools installs it)"
    with tempfile.NamedTemporaryFile(suffix=".mp3") as file:
        file.write(data)
        file.flush()
        result = subprocess.run(
            [binary, "-v", "error", "-of", "json",
             "-show_entries", "stream=codec_name,sample_rate,channels:format=duration", file.name],
            capture_output=True, check=True,
        )  # fmt: skip
    probed = json.loads(result.stdout)
    stream: dict[str, str] = {k: str(v) for k, v in probed["streams"][0].items()}
    stream["duration"] = str(probed["format"]["duration"])
    return stream


def upload(base_url: str, user: dict[str, str], wav: bytes, filename: str) -> dict[str, str]:
    response = requests.post(
        f"{base_url}/records",
        data={"user": user["id"], "token": user["token"]},
        files={"file": (filename, wav, "audio/wav")},
        timeout=120,
    )
    assert response.status_code == 201, response.text
    record: dict[str, str] = response.json()
    return record


def verify_all_downloadable(compose: Compose) -> None:
    """Every record made so far downloads byte for byte as before; its user still signs in."""
    assert compose.created, "the earlier tests created nothing to check"
    for item in compose.created:
        assert hashlib.sha256(download(item["url"])).hexdigest() == item["sha256"], item["url"]
    user = {"id": compose.created[0]["user"], "token": compose.created[0]["token"]}
    record = upload(compose.base_url, user, wavgen.wav(seconds=0.3), "again.wav")
    download(record["url"])


def test_build_and_up(compose: Compose) -> None:
    started = time.monotonic()
    compose.make("up")  # docker compose up --build -d --wait
    print(f"\n[compose] make up (build + up --wait): {time.monotonic() - started:.1f} s")
    for service in ("postgres", "storage", *FUNCTIONS, "upload_worker", "router"):
        (container,) = compose.container_ids(service)
        state = json.loads(compose.docker("inspect", container))[0]["State"]
        assert state["Health"]["Status"] == "healthy", (service, state)
    for one_shot in ("migrate", "bucket"):
        ps = json.loads(compose.run("ps", "-a", "--format", "json", one_shot).stdout or "[]")
        entries = ps if isinstance(ps, list) else [ps]
        assert [e["ExitCode"] for e in entries] == [0], entries
    compose.wait_healthy()


def test_images_are_small_non_root_and_start(compose: Compose) -> None:
    for function in FUNCTIONS:
        (container,) = compose.container_ids(function)
        info = json.loads(compose.docker("inspect", container))[0]
        config = info["Config"]
        assert config["User"] == "10001:10001"
        assert f"FUNCTION_TARGET={function}" in config["Env"]
        assert config["Healthcheck"]["Test"][0] == "CMD"
        assert info["HostConfig"]["ReadonlyRootfs"] is True
        has_ffmpeg = compose.docker("exec", container, "sh", "-c", "command -v ffmpeg || true")
        assert bool(has_ffmpeg.strip()) == (function == "upload_record"), function
        models = compose.docker("exec", container, "python", "-c", BOTOCORE_MODELS)
        assert set(models.split()) == image_botocore_services(), function
    # Sizes are exact, so they are checked here. Start-up time is a speed target: it is measured
    # and printed by the benchmark (make bench, which runs python -m devstack.images), not asserted
    # by a timed test on a shared machine.
    for r in image_report.report(compose.project, runs=1, env=compose.env):
        assert r.size_bytes <= image_report.MAX_IMAGE_BYTES, r
        assert r.start_seconds, r  # the container did start and answer 200


@pytest.mark.parametrize(("bits", "channels", "rate", "tag", "extensible"), WAVS)
def test_upload_and_download_through_the_router(
    compose: Compose, bits: int, channels: int, rate: int, tag: int, extensible: bool
) -> None:
    user = create_user(compose.base_url, f"compose {bits}-bit {channels}ch {rate} Hz")
    wav = wavgen.wav(
        seconds=1.5, channels=channels, rate=rate, bits=bits, tag=tag, extensible=extensible
    )
    record = upload(compose.base_url, user, wav, f"take-{bits}-{channels}-{rate}.wav")
    assert record["url"].startswith(f"{compose.base_url}/record?id={record['id']}")
    mp3 = download(record["url"])
    assert len(mp3) == int(record["size_bytes"])
    probed = ffprobe(mp3)
    assert probed["codec_name"] == "mp3"
    assert int(probed["sample_rate"]) == mp3_sample_rate(rate) == int(record["sample_rate"])
    assert int(probed["channels"]) == min(channels, 2)
    assert float(record["duration_seconds"]) == 1.5
    assert abs(float(probed["duration"]) - 1.5) < 0.25  # + encoder delay/padding frames
    compose.created.append(
        {
            "url": record["url"],
            "sha256": hashlib.sha256(mp3).hexdigest(),
            "user": user["id"],
            "token": user["token"],
        }
    )


def test_database_is_reachable_as_the_readme_says(compose: Compose) -> None:
    """Host 127.0.0.1, the published port, user/database/password from .env (local only)."""
    settings = dict(
        line.split("=", 1)
        for line in (ROOT / ".env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    connection = pg8000.native.Connection(
        settings["POSTGRES_USER"],
        password=settings["POSTGRES_PASSWORD"],
        database=settings["POSTGRES_DB"],
        host="127.0.0.1",
        port=compose.postgres_port,
        timeout=10,
    )
    try:
        ((users,),) = connection.run("SELECT count(*) FROM users")
        ((records,),) = connection.run("SELECT count(*) FROM records")
    finally:
        connection.close()
    assert users >= len(WAVS) and records >= len(WAVS)


def test_redirect_mode_presigns_for_the_host(compose: Compose) -> None:
    item = compose.created[0]
    expected = f"127.0.0.1:{compose.storage_port}"
    compose.run("up", "-d", "--wait", "get_record", extra_env={"DOWNLOAD_MODE": "redirect"})
    try:
        deadline = time.monotonic() + 60
        while True:  # the router follows get_record's new address within a few seconds
            response = requests.get(item["url"], allow_redirects=False, timeout=30)
            if response.status_code == 307 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert response.status_code == 307, response.text
        location = response.headers["Location"]
        assert urlsplit(location).netloc == expected, location
        assert "X-Amz-Signature=" in location
        mp3 = requests.get(location, timeout=30)  # straight from SeaweedFS's published port
        assert mp3.status_code == 200, mp3.text
        assert hashlib.sha256(mp3.content).hexdigest() == item["sha256"]
        assert ffprobe(mp3.content)["codec_name"] == "mp3"
    finally:
        compose.run("up", "-d", "--wait", "get_record")
    deadline = time.monotonic() + 60
    while requests.get(item["url"], allow_redirects=False, timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "get_record did not return to stream mode"
        time.sleep(0.5)


def test_direct_upload_to_the_published_storage_port(compose: Compose) -> None:
    """Presign through the router, POST the WAV from the host straight to SeaweedFS, complete."""
    user = create_user(compose.base_url, "compose direct")
    auth = {"Authorization": f"Bearer {user['token']}"}
    started = requests.post(
        f"{compose.base_url}/records/uploads",
        json={"user": user["id"], "filename": "direct.wav"},
        headers=auth,
        timeout=30,
    )
    assert started.status_code == 201, started.text
    upload = started.json()
    post = upload["upload"]
    assert urlsplit(post["url"]).netloc == f"127.0.0.1:{compose.storage_port}", post["url"]
    wav = wavgen.wav(seconds=1.0, channels=2, rate=48000)
    sent = requests.post(
        post["url"],
        data=post["fields"],
        files={post["file_field"]: ("direct.wav", wav, "audio/wav")},
        timeout=60,
    )
    assert sent.status_code in (200, 201, 204), sent.text
    # The upload_worker service converts it; the client waits up to 25 s for the 201.
    done = requests.post(
        upload["complete_url"],
        headers={**auth, "Prefer": "wait=25"},
        params={"user": user["id"]},
        timeout=120,
    )
    assert done.status_code == 201, done.text
    record = done.json()
    mp3 = download(record["url"])
    assert ffprobe(mp3)["codec_name"] == "mp3"
    assert len(mp3) == int(record["size_bytes"])
    compose.created.append(
        {
            "url": record["url"],
            "sha256": hashlib.sha256(mp3).hexdigest(),
            "user": user["id"],
            "token": user["token"],
        }
    )


def test_lifecycle_list_delete_rotate_erase_through_the_router(compose: Compose) -> None:
    """docs/lifecycle.md on the compose stack: its own users, so the records kept for the
    down/up checks below are not touched."""
    base = compose.base_url
    user = create_user(base, "compose lifecycle")
    auth = {"Authorization": f"Bearer {user['token']}"}
    made = [upload(base, user, wavgen.wav(seconds=0.3), f"l{i}.wav") for i in range(3)]
    listing = requests.get(
        f"{base}/records", params={"user": user["id"], "limit": "2"}, headers=auth, timeout=30
    )
    assert listing.status_code == 200, listing.text
    page = listing.json()
    assert [r["id"] for r in page["records"]] == [made[2]["id"], made[1]["id"]]
    rest = requests.get(
        f"{base}/records", params={"user": user["id"], "cursor": page["next_cursor"]},
        headers=auth, timeout=30,
    ).json()  # fmt: skip
    assert [r["id"] for r in rest["records"]] == [made[0]["id"]] and rest["next_cursor"] is None
    download(made[0]["url"])  # in the router's cache now
    gone = requests.delete(
        f"{base}/record", params={"id": made[0]["id"], "user": user["id"]}, headers=auth,
        timeout=30,
    )  # fmt: skip
    assert gone.status_code == 204, gone.text
    assert requests.get(made[0]["url"], timeout=30).status_code == 404
    key = "compose-" + hashlib.sha256(user["id"].encode()).hexdigest()[:20]
    rotate_url = f"{base}/users/{user['id']}/token"
    rotated = requests.post(rotate_url, headers={**auth, "Idempotency-Key": key}, timeout=30)
    assert rotated.status_code == 200, rotated.text
    replay = requests.post(rotate_url, headers={**auth, "Idempotency-Key": key}, timeout=30)
    assert replay.json() == rotated.json()
    old_list = requests.get(f"{base}/records", params={"user": user["id"]}, headers=auth,
                            timeout=30)  # fmt: skip
    assert old_list.status_code == 401
    new_auth = {"Authorization": f"Bearer {rotated.json()['token']}"}
    erased = requests.delete(f"{base}/users/{user['id']}", headers=new_auth, timeout=60)
    assert erased.status_code == 204, erased.text
    for record in made[1:]:
        assert requests.get(record["url"], timeout=30).status_code == 404
    assert requests.get(
        f"{base}/records", params={"user": user["id"]}, headers=new_auth, timeout=30
    ).status_code == 401  # fmt: skip
    assert requests.post(f"{base}/_tasks/convert", json={}, timeout=30).status_code == 404


def test_direct_upload_job_survives_a_killed_worker(compose: Compose) -> None:
    """docker kill -s KILL of upload_worker mid-conversion: once the lease runs out the job is
    taken again, and completing the upload then gives exactly one record."""
    lease = {"JOB_LEASE_SECONDS": "3"}
    compose.run("up", "-d", "--wait", "upload_worker", extra_env=lease)
    job = converting_direct_upload(compose, "compose killed worker")
    (worker,) = compose.container_ids("upload_worker")
    compose.docker("kill", "--signal", "KILL", worker)
    assert job_row(compose, job.upload_id)[0] == "converting"
    compose.run("up", "-d", "--wait", "upload_worker", extra_env=lease)
    answer = completed(job)
    assert answer.status_code == 200, answer.text
    record = answer.json()
    assert job_row(compose, job.upload_id) == ("done", 1.0, 2)
    assert float(record["duration_seconds"]) == 240.0
    mp3 = download(record["url"])
    assert len(mp3) == int(record["size_bytes"])
    compose.run("up", "-d", "--wait", "upload_worker")  # back to the default lease


def test_down_and_up_keeps_users_records_and_mp3s(compose: Compose) -> None:
    compose.make("down")  # docker compose down: volumes kept
    assert compose.resources()["containers"] == []
    # postgres-data and storage-data survive (and router-cache, the router's MP3 cache)
    volumes = {v.rsplit("_", 1)[-1] for v in compose.resources()["volumes"]}
    assert volumes == {"postgres-data", "storage-data", "router-cache"}
    compose.run("up", "-d", "--wait", "--wait-timeout", "300")
    compose.wait_healthy()
    verify_all_downloadable(compose)


def test_restart_of_postgres_alone_keeps_everything(compose: Compose) -> None:
    (before,) = compose.container_ids("postgres")
    compose.run("restart", "postgres")
    (after,) = compose.container_ids("postgres")
    assert before == after  # restarted, not recreated
    compose.wait_healthy()
    verify_all_downloadable(compose)


def test_scaled_uploads_spread_over_three_replicas(compose: Compose) -> None:
    compose.run("up", "-d", "--wait", "--scale", "upload_record=3")
    replicas = compose.container_ids("upload_record")
    assert len(replicas) == 3
    networks = [
        json.loads(compose.docker("inspect", c))[0]["NetworkSettings"]["Networks"] for c in replicas
    ]
    addresses = sorted(next(iter(n.values()))["IPAddress"] for n in networks)
    # The router reloads once it sees all three addresses behind the name upload_record.
    (router,) = compose.container_ids("router")
    deadline = time.monotonic() + 60
    while True:
        reloads = re.findall(r"upload_record=([0-9.,]+)", compose.logs_of(router))
        if reloads and sorted(filter(None, reloads[-1].split(","))) == addresses:
            break
        assert time.monotonic() < deadline, f"router never saw {addresses}: {reloads}"
        time.sleep(0.5)

    user = create_user(compose.base_url, "scale")
    wav = wavgen.wav(seconds=0.5)
    ids = [upload(compose.base_url, user, wav, f"scaled-{i}.wav")["id"] for i in range(9)]
    stored = {c: {i for i in ids if i in compose.logs_of(c)} for c in replicas}
    for container, records in stored.items():
        print(f"[scale] replica {container[:12]} stored {len(records)} of {len(ids)} uploads")
    assert set().union(*stored.values()) == set(ids)
    assert all(stored.values()), f"a replica got no upload: {stored}"
    for record_id in ids:
        download(f"{compose.base_url}/record?id={record_id}&user={user['id']}")


def test_down_v_leaves_nothing(compose: Compose) -> None:
    compose.run("down", "-v", "--remove-orphans")
    assert compose.resources() == {"containers": [], "volumes": [], "networks": []}


def test_compose_file_is_the_one_users_run() -> None:
    """CI swaps images through the four variables only: no override file, no other images."""
    text = (ROOT / "docker-compose.yml").read_text()
    for variable, default in (
        ("POSTGRES_IMAGE", "postgres:"),
        ("STORAGE_IMAGE", "chrislusf/seaweedfs:4.48"),
        ("NGINX_IMAGE", "nginx:"),
        ("PYTHON_IMAGE", "python:3.11-slim-bookworm"),
    ):
        assert f"${{{variable}:-{default}" in text, variable
    assert not [*ROOT.glob("docker-compose.*.y*ml"), *ROOT.glob("compose*.y*ml")]
