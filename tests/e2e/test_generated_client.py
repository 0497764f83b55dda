"""A client generated from api/openapi.yaml (openapi-python-client, in this session, its
output unedited) runs the whole flow against the native stack, through the router: create a
user, upload (the WAV typed as a File, with options and tags), download, list and follow the
cursor, delete, rotate and use the new token, a direct upload polled to done, erase.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from devstack.wavgen import wav

from devstack import ScratchStack
from tests.support.generated_client import Generated, generate_client, run_flow


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Generated:
    workdir: Path = tmp_path_factory.mktemp("generated-client")
    return Generated(generate_client(workdir))


def test_generated_client_runs_the_whole_flow(generated: Generated, stack: ScratchStack) -> None:
    run_flow(generated, stack.base_url, wav(seconds=1.0))
