"""The router's /healthz is rate limited per client address, with a problem document."""

from __future__ import annotations

import time

import requests

from devstack import ScratchStack


def test_healthz_is_rate_limited(stack: ScratchStack) -> None:
    with requests.Session() as session:
        answers = [session.get(f"{stack.base_url}/healthz", timeout=10) for _ in range(40)]
    statuses = [answer.status_code for answer in answers]
    assert set(statuses) == {200, 429}, statuses
    assert statuses[:5] == [200] * 5
    limited = answers[statuses.index(429)]
    assert limited.headers["Content-Type"] == "application/problem+json"
    assert limited.headers["Retry-After"].isdigit()
    time.sleep(3)  # the limit refills for the next tests
