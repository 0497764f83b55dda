"""The generated client's flow (tests/support/generated_client.py) once through the compose
stack's router: the same document, client and assertions as the e2e tier, on the images.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from devstack import wavgen
from tests.support.generated_client import Generated, generate_client, run_flow

from .conftest import Compose

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def up(compose: Compose) -> Compose:
    compose.make("up")  # docker compose up --build -d --wait (the fixture's teardown: down -v)
    compose.wait_healthy()
    return compose


def test_generated_client_runs_the_whole_flow_through_the_router(
    up: Compose, tmp_path: Path
) -> None:
    generated = Generated(generate_client(tmp_path, package="record_service_client_compose"))
    run_flow(generated, up.base_url, wavgen.wav(seconds=1.0))
