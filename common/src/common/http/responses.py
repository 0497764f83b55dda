"""The HTTP edge shared by the three functions: problem responses, health, public URLs.

Handlers wrap themselves in :func:`function_handler`, which turns every ServiceError into its
problem document, any other exception into a logged, generic 500, keeps functions-framework
from reading an unread request body into memory after an error, and reads what is left of the
body once the answer is handed to the server, so an early refusal reaches the client.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Request, Response

from common.adapters.db import Database
from common.errors import (
    PROBLEM_CONTENT_TYPE,
    ConversionInProgress,
    InternalError,
    MethodNotAllowed,
    RangeNotSatisfiable,
    ServiceError,
    Unauthorized,
)
from common.http.context import REQUEST_HEADERS
from common.settings import Settings, get_settings

if TYPE_CHECKING:
    from common.adapters.storage import Storage

log = logging.getLogger(__name__)

# The challenge of every 401 (RFC 6750): the access token goes in a Bearer header.
BEARER_CHALLENGE = 'Bearer realm="records"'

Handler = Callable[[Request], Response]
# Reading what is left of a refused request body: the read size and the most time it may take.
DRAIN_READ_BYTES = 64 * 1024
DRAIN_SECONDS = 30.0
# True on the wsgi.input of a server that drains what the app leaves of a body itself,
# without a thread (common.platform.bridge): the app then does not drain.
BODY_DRAINED_BY_SERVER = "drained_by_server"
# Statuses without content: no Content-Type or Content-Length either (RFC 9110, 15.3.5, 15.4.5).
_NO_BODY = frozenset({204, 304})
# host[:port], or [IPv6]:port: anything else in a Host header is not put into a URL.
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def json_response(
    body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        json.dumps(body, ensure_ascii=False),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def problem_response(error: ServiceError, instance: str | None = None) -> Response:
    return Response(
        json.dumps(error.to_problem(instance), ensure_ascii=False),
        status=error.status,
        headers=problem_headers(error),
        content_type=PROBLEM_CONTENT_TYPE,
    )


def problem_headers(error: ServiceError) -> dict[str, str]:
    """The headers an error's answer carries besides its problem document: the one place the
    errors' fields are spelled as HTTP (every server and the Lambda adapter use it)."""
    headers: dict[str, str] = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = BEARER_CHALLENGE
    if isinstance(error, MethodNotAllowed):
        headers["Allow"] = ", ".join(error.allowed)
    if isinstance(error, RangeNotSatisfiable):
        headers["Content-Range"] = f"bytes */{error.size}"
    if isinstance(error, ConversionInProgress) and error.status_url:
        headers["Location"] = error.status_url
    return headers


class _HttpProblem(ServiceError):
    """A werkzeug HTTPException (raised by Flask itself) in the service's problem shape."""

    def __init__(self, exc: HTTPException) -> None:
        super().__init__(exc.description or exc.name)
        self.status = exc.code or 500  # type: ignore[misc]
        self.title = exc.name  # type: ignore[misc]
        self.slug = exc.name.lower().replace(" ", "-")  # type: ignore[misc]


def function_handler(func: Handler) -> Handler:
    @wraps(func)
    def wrapper(request: Request) -> Response:
        handled = REQUEST_HEADERS.set(request.headers)
        try:
            response = func(request)
        except ServiceError as exc:
            _log_problem(request, exc)
            response = problem_response(exc, request.path)
        except HTTPException as exc:
            response = problem_response(_HttpProblem(exc), request.path)
        except Exception:
            log.exception("unhandled error", extra={"path": request.path})
            response = problem_response(InternalError(), request.path)
        finally:
            REQUEST_HEADERS.reset(handled)
        response = _without_body_read(response)
        response.call_on_close(lambda: drain_body(request))
        return response

    return wrapper


def drain_body(request: Request) -> None:
    """Read and drop what the handler left of the request body (a refusal before the end).

    The server closes a connection whose request body is unread, and a router still sending
    that body then sees a reset before the answer (nginx: ``writev() failed (32: Broken
    pipe)`` and a 502). This runs when the answer has been handed over: the router reads it,
    stops sending, closes, and the read ends; a client sending straight to the function is
    read to the end of its body. Bounded by ``MAX_UPLOAD_BYTES`` (a longer declared body is
    left alone) and :data:`DRAIN_SECONDS`. Skipped where the server drains on its own
    (:data:`BODY_DRAINED_BY_SERVER`): there this would hold a thread for the whole drain.
    """
    length = request.content_length
    if getattr(request.stream, BODY_DRAINED_BY_SERVER, False):
        return
    if not length or length > get_settings().max_upload_bytes:
        return
    deadline = time.monotonic() + DRAIN_SECONDS
    try:
        while time.monotonic() < deadline and request.stream.read(DRAIN_READ_BYTES):
            pass
    except (OSError, ValueError, HTTPException, ServiceError):  # the peer went away or stalled
        log.debug("request body not drained", extra={"path": request.path})


def _log_problem(request: Request, exc: ServiceError) -> None:
    level = logging.WARNING if exc.status >= 500 else logging.INFO
    log.log(level, exc.detail, extra={"status": exc.status, "path": request.path})


def _without_body_read(response: Response) -> Response:
    """Keep functions-framework's after-request hook from reading the body into memory.

    It calls ``request.get_data()`` after every non-streamed response, which would buffer a
    rejected upload whole. A streamed response is skipped; the server then discards
    whatever is left of the body in fixed-size reads before the next request.
    """
    if response.status_code in _NO_BODY:
        response.response = iter(())
        for header in ("Content-Type", "Content-Length"):
            response.headers.pop(header, None)
        return response
    if not response.is_streamed:
        body = response.get_data()
        response.response = iter((body,))
        if body or "Content-Length" not in response.headers:  # HEAD keeps the GET's length
            response.headers["Content-Length"] = str(len(body))
    return response


# A passed health check is reused this long: a burst of /healthz calls costs the database and
# the bucket one check each, not one per call.
HEALTH_CACHE_SECONDS = 2.0
_healthy_until = [0.0]


def health_response(db: Database, storage: Storage) -> Response:
    """200 when the database and the bucket answer, else the 503 problem of the one that doesn't.

    A pass is remembered for :data:`HEALTH_CACHE_SECONDS`; a failure is never remembered.
    """
    if time.monotonic() >= _healthy_until[0]:
        db.check()
        storage.check()
        _healthy_until[0] = time.monotonic() + HEALTH_CACHE_SECONDS
    return json_response({"status": "ok"})


def public_base_url(request: Request, settings: Settings) -> str:
    """The scheme://host[:port] the client used: PUBLIC_BASE_URL, else the router's headers."""
    if settings.public_base_url:
        return settings.public_base_url
    proto = _first(request.headers.get("X-Forwarded-Proto")) or request.scheme
    if proto not in ("http", "https"):
        proto = "http"
    host = _first(request.headers.get("X-Forwarded-Host"))
    if not _HOST.fullmatch(host):
        host = request.host if _HOST.fullmatch(request.host) else "localhost"
    return f"{proto}://{host}"


def _first(value: str | None) -> str:
    return (value or "").split(",")[0].strip()


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII fallback name and the exact name in RFC 5987 form."""
    fallback = filename.encode("ascii", "replace").decode("ascii").replace('"', "_")
    fallback = "".join(ch if ch.isprintable() else "_" for ch in fallback).replace("?", "_")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"
