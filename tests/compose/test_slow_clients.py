"""Trickling clients against the compose stack: four times upload_record's threads in clients
that send a form field a byte a second, then as many with a wrong token that trickle on after
their 401. Other requests to the same function keep a p99 under 1 s, and each trickler ends by
its deadline (BODY_GRACE_SECONDS at the images' defaults). The native stack's twin is
tests/reliability/test_slow_clients.py; the figures, `make bench`'s figure 8."""

from __future__ import annotations

import statistics
import threading
import time
import uuid

import pytest
import requests
from common.settings import Settings

from tests.compose.conftest import Compose, create_user
from tests.support.slow_clients import answer_after, form_fields, form_head, wav_start

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]

THREADS = 8  # upload_record's default in the image (common.platform.serve.SERVER_DEFAULTS)
SLACK = 2.5  # a loaded 2-core machine


def test_up(compose: Compose) -> None:
    compose.make("up")  # docker compose up --build -d --wait
    compose.wait_healthy()


def _probe(base_url: str, user: dict[str, str], seconds: float) -> list[float]:
    """Status requests to upload_record, one after another, for ``seconds``: their latencies."""
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        start = time.monotonic()
        response = requests.get(
            f"{base_url}/records/uploads/{uuid.uuid4()}",
            params={"user": user["id"]},
            headers={"Authorization": f"Bearer {user['token']}"},
            timeout=30,
        )
        assert response.status_code == 404, response.text
        latencies.append(time.monotonic() - start)
        time.sleep(0.1)
    return latencies


def _trickle(port: int, head: bytes, on_for: float, seconds: float, base_url: str,
             user: dict[str, str]) -> tuple[list[float], list[tuple[float, int]]]:  # fmt: skip
    ends: list[tuple[float, int]] = []
    clients = [
        threading.Thread(target=answer_after, args=(port, head, True, ends, on_for))
        for _ in range(4 * THREADS)
    ]
    for thread in clients:
        thread.start()
    time.sleep(1.0)
    latencies = _probe(base_url, user, seconds)
    for thread in clients:
        thread.join()
    return latencies, ends


def test_trickling_clients_hold_no_function(compose: Compose) -> None:
    user = create_user(compose.base_url, "compose trickle")
    grace = Settings.from_env({}).body_grace_seconds
    head = form_head(b'--b\r\nContent-Disposition: form-data; name="user"\r\n\r\n')
    latencies, ends = _trickle(compose.port, head, 0.0, grace - 2.0, compose.base_url, user)
    assert statistics.quantiles(latencies, n=100)[98] < 1.0, latencies
    assert {status for _, status in ends} == {408}, sorted(ends)
    assert max(took for took, _ in ends) < grace + SLACK, sorted(ends)


def test_refused_clients_that_trickle_on_hold_no_function(compose: Compose) -> None:
    user = create_user(compose.base_url, "compose refused")
    head = form_head(form_fields(user, str(uuid.uuid4())) + wav_start())
    latencies, ends = _trickle(compose.port, head, 12.0, 10.0, compose.base_url, user)
    assert statistics.quantiles(latencies, n=100)[98] < 1.0, latencies
    assert {status for _, status in ends} == {401}, sorted(ends)
    assert max(took for took, _ in ends) < SLACK, sorted(ends)
