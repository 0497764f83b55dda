"""Container entry point: ``python -m common.platform.entrypoint``.

Serves the function named by ``FUNCTION_TARGET`` (create_user, upload_record or get_record)
from ``FUNCTION_SOURCE`` (default ``<app>/functions/<target>/main.py``). One image serves
every platform:

* on AWS Lambda (``AWS_LAMBDA_RUNTIME_API`` is set by the Lambda service) it runs the Runtime
  Interface Client, ``python -m awslambdaric common.platform.aws_lambda.handler``, which takes
  Function URL / HTTP API events (see :mod:`common.platform.aws_lambda`);
* everywhere else (Cloud Run, compose, a plain ``docker run``) it serves the functions-framework
  app on ``$PORT`` (default 8080) with :mod:`common.platform.serve`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from common.settings import SettingsError

TARGETS = ("create_user", "upload_record", "get_record")
APP_DIR = Path(os.environ.get("APP_DIR", "/app"))
LAMBDA_HANDLER = "common.platform.aws_lambda.handler"


def function_target(env: Mapping[str, str]) -> str:
    """The function this process serves; every way of starting one checks it here."""
    target = env.get("FUNCTION_TARGET", "")
    if target not in TARGETS:
        raise SettingsError(f"FUNCTION_TARGET must be one of {', '.join(TARGETS)}, got {target!r}")
    return target


def function_source(target: str, env: Mapping[str, str]) -> str:
    return env.get("FUNCTION_SOURCE") or str(APP_DIR / "functions" / target / "main.py")


def command(env: Mapping[str, str]) -> list[str]:
    """The argv this container runs, chosen by the platform it finds itself on."""
    try:
        function_target(env)  # refuse to start without a valid target, on every platform
    except SettingsError as exc:
        sys.exit(str(exc))
    if env.get("AWS_LAMBDA_RUNTIME_API"):
        return [sys.executable, "-m", "awslambdaric", LAMBDA_HANDLER]
    return [sys.executable, "-m", "common.platform.serve"]


def main() -> None:
    argv = command(os.environ)
    os.execv(argv[0], argv)  # noqa: S606 - fixed argv, no shell


if __name__ == "__main__":
    main()
