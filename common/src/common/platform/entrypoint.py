"""Container entry point: ``python -m common.platform.entrypoint``.

One image serves every platform: it runs the function named by ``FUNCTION_TARGET`` from
``FUNCTION_SOURCE``, under the Lambda Runtime Interface Client (in this interpreter) when
``AWS_LAMBDA_RUNTIME_API`` is set (:mod:`common.platform.aws_lambda`), else on ``$PORT`` with
:mod:`common.platform.serve` (Cloud Run, compose, a plain ``docker run``). The one-shot
targets of :data:`JOBS` (``sweep``, ``migrate``) run their module instead of serving.
:func:`check_target` is the one place a ``FUNCTION_TARGET`` is validated.
docs/configuration.md and docs/deploy-aws.md have the detail.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Mapping
from pathlib import Path

from common.settings import SettingsError, app_dir

TARGETS = ("create_user", "upload_record", "get_record")  # the HTTP functions
APP_DIR = Path(app_dir())
# One-shot jobs the same image runs: target -> the module and arguments of `python -m`.
JOBS: dict[str, tuple[str, ...]] = {
    "sweep": ("common.ops.sweep",),
    "migrate": ("alembic", "-c", str(APP_DIR / "alembic.ini"), "upgrade", "head"),
}
LAMBDA_HANDLER = "common.platform.aws_lambda.handler"


def check_target(env: Mapping[str, str], allowed: tuple[str, ...] = (*TARGETS, *JOBS)) -> str:
    """``FUNCTION_TARGET``, refused (SettingsError) unless it is one of ``allowed``."""
    target = env.get("FUNCTION_TARGET", "")
    if target not in allowed:
        raise SettingsError(f"FUNCTION_TARGET must be one of {', '.join(allowed)}, got {target!r}")
    return target


def function_target(env: Mapping[str, str]) -> str:
    """The function or job to run; exits with the reason when there is none."""
    try:
        return check_target(env)
    except SettingsError as exc:
        sys.exit(str(exc))


def function_source(target: str, env: Mapping[str, str]) -> str:
    return env.get("FUNCTION_SOURCE") or str(APP_DIR / "functions" / target / "main.py")


def command(env: Mapping[str, str]) -> list[str]:
    """The argv this container runs, chosen by the platform it finds itself on."""
    target = function_target(env)  # refuse to start without a valid target, on every platform
    if env.get("AWS_LAMBDA_RUNTIME_API"):
        return [sys.executable, "-m", "awslambdaric", LAMBDA_HANDLER]
    if target in JOBS:
        return [sys.executable, "-m", *JOBS[target]]
    return [sys.executable, "-m", "common.platform.serve"]


def main() -> None:
    argv = command(os.environ)
    if argv[1:3] == ["-m", "awslambdaric"]:
        # Lambda's runtime client runs in this interpreter, as `python -m` would run it: a
        # second interpreter (execv) would add its start to every cold start.
        sys.argv = [argv[0], *argv[3:]]
        runpy.run_module("awslambdaric", run_name="__main__", alter_sys=True)
        return
    os.execv(argv[0], argv)  # noqa: S606 - fixed argv, no shell


if __name__ == "__main__":
    main()
