"""AWS Lambda mode: the same function handlers behind Lambda's Runtime Interface Client.

The container's entry point (:mod:`common.platform.entrypoint`) runs
``python -m awslambdaric common.platform.aws_lambda.handler`` when Lambda's
``AWS_LAMBDA_RUNTIME_API`` is set. :func:`handler` receives Function URL and API Gateway
HTTP API (payload format 2.0) events and hands them to the very Flask app functions-framework
builds for ``FUNCTION_TARGET``
(``functions_framework.create_app``), translated by apig-wsgi: base64 request bodies are
decoded, query strings and headers pass as WSGI sees them, and responses come back with
``isBase64Encoded`` for binary content (the MP3) and plain text for JSON and problem+json.

Lambda caps a request and a response at 6 MB: large WAVs go through the direct upload
(:mod:`common.domain.uploads`) and downloads run with ``DOWNLOAD_MODE=redirect``.

With a job target (``FUNCTION_TARGET=sweep`` or ``migrate``, see
:data:`common.platform.entrypoint.JOBS`) the handler runs that job in-process for any event
(EventBridge Scheduler's, or the deploy script's ``aws lambda invoke``) and answers
``{"target": ..., "status": "done"}``; a failing job raises, so Lambda reports a FunctionError.

Secrets that are not rotated while a process runs (``IDEMPOTENCY_SECRET``,
``ORIGIN_VERIFY_SECRET``) are given as the ARN of a Secrets Manager secret (``<NAME>_ARN``) and
read into the process's environment at start (:func:`export_secrets`), never stored in the
function's configuration.

HTTP events must carry CloudFront's origin-verify header when ``ORIGIN_VERIFY_SECRET`` is set
(:mod:`common.http.origin`): one without it, or with another value, is answered ``403``
problem+json here, before the app sees it, so the HTTP API's own URL leads around CloudFront
and its WAF rate limit to no handler. The header is removed before the app gets the event.
SQS and scheduled events are not HTTP and are not checked.

SQS events (``JOB_QUEUE=sqs``: the job queue's event source mapping, batch size 1,
``ReportBatchItemFailures``) are conversion jobs, run by :func:`run_sqs_jobs` in the same
function: a message whose job could not run now (an outage, or another delivery holding it)
is reported in ``batchItemFailures``, so SQS delivers it again after the visibility timeout and
moves it to the dead-letter queue after maxReceiveCount deliveries. Jobs that finished, failed
for good or had nothing to do are acknowledged.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from apig_wsgi import make_lambda_handler

from common.errors import PROBLEM_CONTENT_TYPE, OriginNotVerified
from common.http.origin import ORIGIN_VERIFY_HEADER, origin_verified
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
    import functions_framework

    app = functions_framework.create_app(target, source)  # type: ignore[no-untyped-call]
    return make_lambda_handler(app, binary_support=True)


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
        "headers": {"Content-Type": PROBLEM_CONTENT_TYPE, **error.headers},
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
