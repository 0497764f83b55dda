"""The worker's health file is touched by its polling loop itself: a hung loop turns unhealthy."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from common.platform import worker
from common.platform.runtime import Services


def fake_services(alive: Path) -> Services:
    return cast(Services, SimpleNamespace(settings=SimpleNamespace(worker_alive_file=str(alive))))


def test_a_loop_that_polls_is_healthy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    alive = tmp_path / "alive"
    monkeypatch.setattr(worker, "run_once", lambda _services: False)
    worker.serve(fake_services(alive), once=True)
    assert worker.check_alive(alive, 60) == 0


def test_a_hung_loop_turns_unhealthy_after_its_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alive = tmp_path / "alive"
    hung = threading.Event()
    release = threading.Event()

    def stuck(_services: Any) -> bool:
        hung.set()
        release.wait(30)  # a poll that never returns (a hung driver call, a deadlock)
        return False

    monkeypatch.setattr(worker, "run_once", stuck)
    loop = threading.Thread(
        target=worker.serve, args=(fake_services(alive),), kwargs={"once": True}
    )
    loop.start()
    try:
        assert hung.wait(10)
        stale = time.time() - 61
        os.utime(alive, (stale, stale))  # as it looks 61 s into the hang
        time.sleep(0.5)  # nothing else touches it meanwhile
        assert worker.check_alive(alive, 60) == 1
    finally:
        release.set()
        loop.join(10)
