"""Shared fixtures. Three tiers (see README, "Tests"):

* unit: no servers; moto stands in for S3 where storage is needed.
* integration (``@pytest.mark.integration``): a real PostgreSQL and SeaweedFS, started once.
* end to end (``@pytest.mark.e2e``): the whole native stack, HTTP through nginx.

The servers come from the same :class:`NativeStack` that ``make dev`` runs, started once per
session in a temporary directory on free ports (``tests/stack.py``).
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

from common.platform.runtime import Services  # noqa: E402
from common.settings import Settings  # noqa: E402
from stack import ScratchStack, free_ports  # noqa: E402
from stack import make_data_dir as make_data_dir  # noqa: E402


@contextmanager
def running_stack(prefix: str, extra_env: dict[str, str] | None = None) -> Iterator[ScratchStack]:
    """A native stack of its own, on free ports in a new directory; stopped and removed after.

    KEEP_TEST_DATA=1 keeps the directory (logs, data) for a look after a failure.
    """
    data_dir = make_data_dir(prefix)
    native = ScratchStack(
        data_dir, ports=free_ports(), workers=1, threads=8, extra_env=dict(extra_env or {})
    )
    native.start(timeout=120)
    try:
        yield native
    finally:
        native.stop()
        if not os.environ.get("KEEP_TEST_DATA"):
            shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def stack() -> Iterator[ScratchStack]:
    with running_stack("records-test-") as native:
        yield native


@pytest.fixture(scope="session")
def stack_settings(stack: ScratchStack) -> Settings:
    return Settings.from_env(stack.app_env())


@pytest.fixture(scope="session")
def services(stack_settings: Settings) -> Services:
    """Real clients for the stack's Postgres and SeaweedFS (integration tier)."""
    return Services.from_settings(stack_settings)


@dataclass
class Client:
    """A user of the running service, speaking HTTP to the router."""

    base_url: str
    session: requests.Session

    def create_user(self, name: str = "Alice") -> dict[str, str]:
        response = self.session.post(f"{self.base_url}/users", json={"name": name}, timeout=10)
        assert response.status_code == 201, response.text
        body: dict[str, str] = response.json()
        return body

    def upload(
        self,
        user: dict[str, str],
        wav: bytes,
        filename: str = "take.wav",
        **kwargs: object,
    ) -> requests.Response:
        return self.session.post(
            f"{self.base_url}/records",
            data={"user": user["id"], "token": user["token"]},
            files={"file": (filename, wav, "audio/wav")},
            timeout=120,
            **kwargs,  # type: ignore[arg-type]
        )


@pytest.fixture
def client(stack: ScratchStack) -> Iterator[Client]:
    with requests.Session() as session:
        yield Client(stack.base_url, session)


@pytest.fixture
def random_id() -> str:
    return str(uuid.uuid4())
