"""AWS Lambda mode: the same function handlers behind Lambda's Runtime Interface Client.

:func:`handler` takes three kinds of event: HTTP (Function URL, API Gateway HTTP API 2.0), given
to the function's WSGI app through apig-wsgi after the CloudFront origin check; SQS (conversion
jobs, with ``batchItemFailures`` for the ones to deliver again); and, for the ``sweep`` and
``migrate`` targets, any event runs that job. Secrets named by ``<NAME>_ARN`` are read at init.
docs/deploy-aws.md ("What the handler takes") says why and how.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from apig_wsgi import make_lambda_handler

from common.errors import PROBLEM_CONTENT_TYPE, OriginNotVerified
from common.http import Request, Response
from common.http.origin import ORIGIN_VERIFY_HEADER, origin_verified
from common.http.responses import problem_headers
from common.platform.entrypoint import JOBS, function_source, function_target
from common.platform.memory import tune_malloc
from common.platform.runtime import get_services

log = logging.getLogger(__name__)

# Variables whose value is read at start from the Secrets Manager secret named by <NAME>_ARN.
SECRET_VARIABLES = ("IDEMPOTENCY_SECRET", "ORIGIN_VERIFY_SECRET")

LambdaHandler = Callable[[dict[str, Any], Any], dict[str, Any]]

_lock = threading.Lock()
_handler: LambdaHandler | None = None


def make_handler(target: str, source: str) -> LambdaHandler:
    """A Lambda handler serving ``target`` (defined in ``source``) through apig-wsgi."""
    return make_lambda_handler(function_app(target, source), binary_support=True)


def function_app(target: str, source: str) -> Callable[[dict[str, Any], Any], Iterable[bytes]]:
    """The function as a bare werkzeug WSGI app: the handler functions-framework serves
    elsewhere, loaded from ``source`` the way it loads it, without Flask (its import is a
    fifth of a cold start). Every path and method goes to the handler, which routes itself."""
    name = os.path.splitext(os.path.basename(source))[0]
    spec = importlib.util.spec_from_file_location(name, source)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the function from {source}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    handler: Callable[[Request], Response] = getattr(module, target)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        response: Iterable[bytes] = handler(Request(environ))(environ, start_response)
        return response

    return app


def make_job_handler(target: str) -> LambdaHandler:
    """A handler that runs the one-shot job ``target`` for each event it gets."""

    def run(_event: dict[str, Any], _context: Any) -> dict[str, Any]:
        if target == "sweep":
            # Loaded by name, as the container runs it (`python -m`): ops sits above platform.
            job = importlib.import_module(JOBS[target][0])
            job.main([])
        else:
            from alembic import command
            from alembic.config import Config

            from common.platform.entrypoint import APP_DIR

            command.upgrade(Config(str(APP_DIR / "alembic.ini")), "head")
        return {"target": target, "status": "done"}

    return run


def export_secrets(env: dict[str, str] | os._Environ[str]) -> None:
    """Put each secret of SECRET_VARIABLES that has an ``_ARN`` twin into ``env``."""
    for name in SECRET_VARIABLES:
        arn = env.get(f"{name}_ARN", "").strip()
        if arn and not env.get(name):
            from common.adapters.secrets import read_secret_string  # boto3: only with a secret

            env[name] = read_secret_string(arn)


def handler_from_env(env: Mapping[str, str] | None = None) -> LambdaHandler:
    e = os.environ if env is None else env
    target = function_target(e)
    if target in JOBS:
        return make_job_handler(target)
    return make_handler(target, function_source(target, e))


def _prepare_during_init() -> None:
    """On Lambda, build the app while the runtime initialises (full CPU, before any event)."""
    global _handler
    if os.environ.get("AWS_LAMBDA_RUNTIME_API") and os.environ.get("FUNCTION_TARGET"):
        tune_malloc()
        export_secrets(os.environ)
        _handler = handler_from_env()


def is_sqs_event(event: Mapping[str, Any]) -> bool:
    records = event.get("Records")
    return (
        isinstance(records, list)
        and bool(records)
        and all(isinstance(r, dict) and r.get("eventSource") == "aws:sqs" for r in records)
    )


def run_sqs_jobs(event: Mapping[str, Any]) -> dict[str, Any]:
    """Run the conversion job of each SQS message; the ones to deliver again, as SQS reads them."""
    # Imported on the first job: the HTTP routes of the function never load the job's code.
    from common.adapters.queue import parse_job_message
    from common.domain.jobs import Outcome, run_job

    services = get_services()
    failures: list[dict[str, str]] = []
    for message in event["Records"]:
        message_id = str(message.get("messageId", ""))
        extra = {
            "message_id": message_id,
            "receive_count": message.get("attributes", {}).get("ApproximateReceiveCount"),
        }
        try:
            upload_id = parse_job_message(message.get("body") or "")
        except ValueError:
            log.error("not a job message; dropped", extra=extra)  # retrying cannot mend it
            continue
        try:
            outcome = run_job(services.db, services.storage, services.settings, upload_id)
        except Exception:
            log.exception("job did not finish; SQS delivers it again", extra=extra)
            failures.append({"itemIdentifier": message_id})
            continue
        log.info("job message handled", extra={**extra, "outcome": outcome.value})
        if outcome is Outcome.BUSY:
            failures.append({"itemIdentifier": message_id})
    return {"batchItemFailures": failures}


def is_http_event(event: Mapping[str, Any]) -> bool:
    """A Function URL, API Gateway (payload 1.0 or 2.0) or ALB request."""
    return isinstance(event.get("requestContext"), dict)


def without_origin_header(event: dict[str, Any]) -> dict[str, Any]:
    """The event without the origin-verify header: the app never sees the secret."""
    stripped = dict(event)
    for key in ("headers", "multiValueHeaders"):
        if isinstance(event.get(key), dict):
            stripped[key] = {
                name: value
                for name, value in event[key].items()
                if name.lower() != ORIGIN_VERIFY_HEADER
            }
    return stripped


def origin_refused(event: Mapping[str, Any]) -> dict[str, Any]:
    """The 403 problem for an HTTP event that did not come through CloudFront."""
    error = OriginNotVerified()
    path = event.get("rawPath") or event.get("path") or None
    log.info("request without the origin header refused", extra={"path": path, "status": 403})
    return {
        "statusCode": error.status,
        "headers": {"Content-Type": PROBLEM_CONTENT_TYPE, **problem_headers(error)},
        "body": json.dumps(error.to_problem(path), ensure_ascii=False),
        "isBase64Encoded": False,
    }


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """The Lambda entry point: built once per execution environment, on the first event."""
    global _handler
    if is_sqs_event(event):
        return run_sqs_jobs(event)
    if _handler is None:
        with _lock:
            if _handler is None:
                export_secrets(os.environ)
                _handler = handler_from_env()
    if is_http_event(event):
        secret = get_services().settings.origin_verify_secret
        headers = event.get("headers")
        if not origin_verified(headers if isinstance(headers, dict) else {}, secret):
            return origin_refused(event)
        event = without_origin_header(event)
    return _handler(event, context)


_prepare_during_init()
