"""``docker stop -t 10`` (Cloud Run's grace) on the functions and the worker loses nothing.

upload_record is stopped with a short and a long, slow upload in flight (sent through the
router): the short one gets its 201, the long one a 503 with Retry-After, the container is
gone within the grace, and the user has one record. upload_worker is stopped mid-job: the job
is queued again at once (not counted as an attempt) and, after ``docker start``, ends as one
record.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import requests

from devstack import wavgen
from tests.compose.conftest import (
    Compose,
    completed,
    converting_direct_upload,
    create_user,
    download,
    job_row,
)
from tests.support.slow_clients import paced_upload

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]

GRACE = 10


def test_up(compose: Compose) -> None:
    compose.make("up")  # docker compose up --build -d --wait
    compose.wait_healthy()


def test_docker_stop_of_upload_record_mid_upload(compose: Compose) -> None:
    user = create_user(compose.base_url, "compose stopped")
    port = int(compose.base_url.rsplit(":", 1)[1])
    short: dict[str, Any] = {}
    long: dict[str, Any] = {}
    clients = [
        threading.Thread(
            target=paced_upload, args=(port, user, wavgen.wav(seconds=1.0), 3.0, short)
        ),
        threading.Thread(
            target=paced_upload, args=(port, user, wavgen.wav(seconds=60.0), 60.0, long)
        ),
    ]
    for client in clients:
        client.start()
    time.sleep(1.5)
    (container,) = compose.container_ids("upload_record")
    started = time.monotonic()
    compose.docker("stop", "-t", str(GRACE), container, timeout=30)
    stopped = time.monotonic() - started
    try:
        for client in clients:
            client.join(timeout=30)
        state = json.loads(compose.docker("inspect", container))[0]["State"]
        assert state["ExitCode"] == 0 and not state["OOMKilled"], state  # not SIGKILLed (137)
        assert stopped < GRACE, stopped
        assert short["status"] == 201, short
        assert long["status"] == 503, long
        assert int(long["headers"]["retry-after"]) >= 1
    finally:  # the module's next test needs it, whatever failed above
        compose.docker("start", container)
        compose.wait_healthy()
    auth = {"Authorization": f"Bearer {user['token']}"}
    listed = requests.get(
        f"{compose.base_url}/records", params={"user": user["id"]}, headers=auth, timeout=30
    )
    assert listed.status_code == 200, listed.text
    assert [r["id"] for r in listed.json()["records"]] == [json.loads(short["body"])["id"]]


def test_docker_stop_of_the_worker_mid_job(compose: Compose) -> None:
    job = converting_direct_upload(compose, "compose stopped worker")
    (worker,) = compose.container_ids("upload_worker")
    started = time.monotonic()
    compose.docker("stop", "-t", str(GRACE), worker, timeout=30)
    assert time.monotonic() - started < GRACE
    status, _, attempts = job_row(compose, job.upload_id)
    assert (status, attempts) == ("queued", 0)  # given back at once, not as an attempt
    compose.docker("start", worker)
    answer = completed(job)
    assert answer.status_code == 200, answer.text
    record = answer.json()
    assert job_row(compose, job.upload_id) == ("done", 1.0, 1)
    assert len(download(record["url"])) == int(record["size_bytes"])
    listed = requests.get(
        f"{compose.base_url}/records",
        params={"user": job.user["id"]},
        headers=job.auth,
        timeout=30,
    )
    assert [r["id"] for r in listed.json()["records"]] == [record["id"]]
