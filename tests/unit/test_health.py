"""The functions' /healthz: a pass is reused for a moment, a failure never is."""

from __future__ import annotations

import pytest
from common.errors import DependencyUnavailable
from common.http import responses


class _Dependency:
    def __init__(self) -> None:
        self.checks = 0
        self.down = False

    def check(self) -> None:
        self.checks += 1
        if self.down:
            raise DependencyUnavailable("down")


def test_a_burst_of_health_checks_checks_the_dependencies_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr("common.http.responses.time.monotonic", lambda: now[0])
    monkeypatch.setattr(responses, "_healthy_until", [0.0])
    db, storage = _Dependency(), _Dependency()
    for _ in range(50):
        assert responses.health_response(db, storage).status_code == 200  # type: ignore[arg-type]
    assert (db.checks, storage.checks) == (1, 1)
    now[0] += responses.HEALTH_CACHE_SECONDS
    db.down = True
    for _ in range(2):  # a failure is not remembered: each call checks again
        with pytest.raises(DependencyUnavailable):
            responses.health_response(db, storage)  # type: ignore[arg-type]
    assert db.checks == 3
