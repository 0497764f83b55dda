"""The image's one-shot job targets (sweep, migrate): the entry point and the Lambda handler.

EventBridge Scheduler invokes the image's Lambda with FUNCTION_TARGET=sweep; the deploy script
invokes FUNCTION_TARGET=migrate before the functions switch to new code; Cloud Run jobs run the
same targets through the container's entry point.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from common.platform import aws_lambda, entrypoint
from common.platform.serve import ServerConfig
from common.settings import SettingsError, get_settings
from moto import mock_aws

from devstack import NativeStack
from tests.support import ROOT


def test_entrypoint_runs_jobs_as_modules_and_lambda_through_the_handler() -> None:
    assert entrypoint.command({"FUNCTION_TARGET": "sweep"}) == [
        sys.executable, "-m", "common.ops.sweep"
    ]  # fmt: skip
    migrate = entrypoint.command({"FUNCTION_TARGET": "migrate"})
    assert migrate[1:3] == ["-m", "alembic"] and migrate[-2:] == ["upgrade", "head"]
    on_lambda = {"FUNCTION_TARGET": "sweep", "AWS_LAMBDA_RUNTIME_API": "127.0.0.1:9001"}
    assert entrypoint.command(on_lambda)[1:] == ["-m", "awslambdaric", entrypoint.LAMBDA_HANDLER]
    with pytest.raises(SystemExit, match="FUNCTION_TARGET must be one of"):
        entrypoint.command({"FUNCTION_TARGET": "nope"})


def test_one_check_for_the_target() -> None:
    with pytest.raises(SettingsError, match="got 'nope'"):
        entrypoint.check_target({"FUNCTION_TARGET": "nope"})
    # The HTTP server serves functions only: a job target is refused by the same check.
    with pytest.raises(SettingsError, match="got 'sweep'"):
        ServerConfig.from_env({"FUNCTION_TARGET": "sweep"})


@pytest.fixture
def stack_environment(stack: NativeStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in stack.app_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(entrypoint, "APP_DIR", Path(ROOT))
    get_settings.cache_clear()
    loggers = [
        lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    enabled = [lg for lg in loggers if not lg.disabled]
    yield
    get_settings.cache_clear()
    for logger in enabled:  # alembic's fileConfig disables the loggers it does not name
        logger.disabled = False


@pytest.mark.integration
@pytest.mark.parametrize("target", ["sweep", "migrate"])
def test_lambda_runs_the_job_for_any_event(
    target: str, stack_environment: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FUNCTION_TARGET", target)
    handler = aws_lambda.handler_from_env()
    scheduler_event: dict[str, object] = {}  # EventBridge Scheduler sends the Input given
    assert handler(scheduler_event, None) == {"target": target, "status": "done"}


def test_secrets_named_by_arn_are_read_into_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        client = boto3.client("secretsmanager", region_name="eu-west-1")
        arn = client.create_secret(Name="records/idem", SecretString="k" * 43)["ARN"]
        env = {"IDEMPOTENCY_SECRET_ARN": arn}
        aws_lambda.export_secrets(env)
        assert env["IDEMPOTENCY_SECRET"] == "k" * 43
        given = {"IDEMPOTENCY_SECRET_ARN": arn, "IDEMPOTENCY_SECRET": "set"}
        aws_lambda.export_secrets(given)  # a value already given wins
        assert given["IDEMPOTENCY_SECRET"] == "set"
