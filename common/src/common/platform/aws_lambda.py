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
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from apig_wsgi import make_lambda_handler

from common.platform.entrypoint import function_source, function_target
from common.platform.memory import tune_malloc

LambdaHandler = Callable[[dict[str, Any], Any], dict[str, Any]]

_lock = threading.Lock()
_handler: LambdaHandler | None = None


def make_handler(target: str, source: str) -> LambdaHandler:
    """A Lambda handler serving ``target`` (defined in ``source``) through apig-wsgi."""
    import functions_framework

    app = functions_framework.create_app(target, source)  # type: ignore[no-untyped-call]
    return make_lambda_handler(app, binary_support=True)


def handler_from_env(env: Mapping[str, str] | None = None) -> LambdaHandler:
    e = os.environ if env is None else env
    target = function_target(e)
    return make_handler(target, function_source(target, e))


def _prepare_during_init() -> None:
    """On Lambda, build the app while the runtime initialises (full CPU, before any event)."""
    global _handler
    if os.environ.get("AWS_LAMBDA_RUNTIME_API") and os.environ.get("FUNCTION_TARGET"):
        tune_malloc()
        _handler = handler_from_env()


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """The Lambda entry point: built once per execution environment, on the first event."""
    global _handler
    if _handler is None:
        with _lock:
            if _handler is None:
                _handler = handler_from_env()
    return _handler(event, context)


_prepare_during_init()
