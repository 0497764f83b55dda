"""What each function's Lambda init imports: only what its routes use.

The init is what the image runs before the first event: awslambdaric, then
common.platform.aws_lambda, which (with AWS_LAMBDA_RUNTIME_API set) builds the function's app.
It runs here in a fresh interpreter with the repository as /app; nothing connects anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import ROOT

PROBE = (
    "import sys, json, awslambdaric.bootstrap, common.platform.aws_lambda as m; "
    "assert m._handler is not None; print(json.dumps(sorted(sys.modules)))"
)
# The services' pool is common.adapters.pool (only alembic uses SQLAlchemy); on Lambda the
# handler is a bare werkzeug app (functions-framework and Flask serve it everywhere else).
# The adapters use botocore's own session: boto3 would add s3transfer and multiprocessing.
NEVER = ("sqlalchemy", "flask", "functions_framework", "jinja2", "click", "boto3", "s3transfer")
BUCKET = ("boto3", "botocore", "common.adapters.storage", "common.domain.jobs")


def init_modules(target: str) -> set[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        "FUNCTION_TARGET": target,
        "AWS_LAMBDA_RUNTIME_API": "127.0.0.1:9",  # never reached: the init only builds the app
        "APP_DIR": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return set(json.loads(done.stdout))


def loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(f"{n}.") for n in names))


@pytest.mark.parametrize("target", ["create_user", "upload_record", "get_record"])
def test_no_function_imports_sqlalchemy_or_flask(target: str) -> None:
    assert loaded(init_modules(target), NEVER) == []


def test_create_user_imports_nothing_of_the_bucket_or_the_jobs() -> None:
    modules = init_modules("create_user")
    assert loaded(modules, BUCKET) == []
    assert "common.domain.users" in modules  # the probe did build create_user's app


def test_the_sqs_path_is_imported_only_by_its_first_job() -> None:
    modules = init_modules("get_record")
    assert loaded(modules, ("common.domain.jobs", "common.adapters.queue")) == []


def test_get_record_reads_records_without_the_conversion() -> None:
    """Reading, listing and downloading never convert: no ffmpeg pipeline, WAV gate or ID3."""
    modules = init_modules("get_record")
    assert loaded(modules, ("common.domain.conversion", "common.domain.wav", "mutagen")) == []
    assert "common.domain.records" in modules
