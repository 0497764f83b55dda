"""Shared fixtures. The folder is the tier (docs/development.md, "Tests"): unit, integration,
e2e, reliability and compose; each test gets its folder's marker, so ``-m`` selects tiers too.

The servers come from the same :class:`devstack.NativeStack` that ``make dev`` runs, started once
per session in a temporary directory on free ports (:mod:`devstack.scratch`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from common.platform.runtime import Services
from common.settings import Settings

from devstack import ScratchStack
from tests.support import Client
from tests.support.stacks import running_stack

TESTS = Path(__file__).resolve().parent
# folder -> marker; unit tests carry none (-m "not integration and not e2e" selects them too)
TIERS = {"integration": "integration", "e2e": "e2e", "reliability": "reliability"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        folder = item.path.relative_to(TESTS).parts[0]
        if folder in TIERS:
            item.add_marker(TIERS[folder])


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


@pytest.fixture
def client(stack: ScratchStack) -> Iterator[Client]:
    with requests.Session() as session:
        yield Client(stack.base_url, session)


@pytest.fixture
def random_id() -> str:
    return str(uuid.uuid4())
