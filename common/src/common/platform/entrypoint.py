"""Container entry point: ``python -m common.platform.entrypoint``.

Serves the function named by ``FUNCTION_TARGET`` (create_user, upload_record or get_record)
from ``FUNCTION_SOURCE`` (default ``<app>/functions/<target>/main.py``). One image serves
every platform:

* on AWS Lambda (``AWS_LAMBDA_RUNTIME_API`` is set by the Lambda service) it runs the Runtime
  Interface Client, ``python -m awslambdaric common.platform.aws_lambda.handler``, which takes
  Function URL / HTTP API events (see :mod:`common.platform.aws_lambda`);
* everywhere else (Cloud Run, compose, a plain ``docker run``) it serves the functions-framework
  app on ``$PORT`` (default 8080) with :mod:`common.platform.serve`.

Two more targets run a one-shot job instead of serving (:data:`JOBS`): ``sweep``
(``python -m common.ops.sweep``, scheduled by EventBridge Scheduler or Cloud Scheduler) and
``migrate`` (``alembic upgrade head``, run by the deploy scripts before new code takes
traffic). On Lambda the handler runs them in-process; elsewhere the container runs the module.
:func:`check_target` is the one place a ``FUNCTION_TARGET`` is validated.
"""

from __future__ import annotations

import os
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
    os.execv(argv[0], argv)  # noqa: S606 - fixed argv, no shell


if __name__ == "__main__":
    main()
