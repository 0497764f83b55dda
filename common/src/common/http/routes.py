"""The service's one route table: every path, its methods, and which function serves each.

Each function dispatches through :func:`route` with its own name. A path that exists with
other methods is 405 with an ``Allow`` listing every method of the path, whichever function
serves it; the router's own 405s use the same lists (infra/nginx, checked by a unit test).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from werkzeug.exceptions import MethodNotAllowed as NoSuchMethod
from werkzeug.exceptions import NotFound as NoSuchPath
from werkzeug.routing import Map, RequestRedirect, Rule

from common.errors import MethodNotAllowed, NotFound

USERS_PATH = "/users"
RECORD_PATH = "/record"
RECORDS_PATH = "/records"
UPLOADS_PATH = "/records/uploads"
HEALTH_PATH = "/healthz"
TASKS_PATH = "/_tasks/convert"
# Route templates: an Idempotency-Key is scoped to one of these (and its caller).
ROTATE_ROUTE = "/users/{id}/token"
COMPLETE_ROUTE = "/records/uploads/{id}/complete"

EVERY_FUNCTION = "*"  # /healthz: each function answers its own
ROUTER = "router"  # served by nginx itself (the API document and its page)


@dataclass(frozen=True, slots=True)
class Endpoint:
    function: str
    name: str


def _rule(path: str, methods: list[str], function: str, name: str) -> Rule:
    return Rule(path, methods=methods, endpoint=Endpoint(function, name))


# GET implies HEAD (werkzeug adds it).
ROUTES = Map(
    [
        _rule(USERS_PATH, ["POST"], "create_user", "create_user"),
        _rule("/users/<user_id>", ["DELETE"], "create_user", "erase_user"),
        _rule("/users/<user_id>/token", ["POST"], "create_user", "rotate_token"),
        _rule(RECORDS_PATH, ["POST"], "upload_record", "upload"),
        _rule(RECORDS_PATH, ["GET"], "get_record", "list_records"),
        _rule(UPLOADS_PATH, ["POST"], "upload_record", "start_upload"),
        _rule(UPLOADS_PATH + "/<upload_id>/complete", ["POST"], "upload_record", "complete"),
        _rule(UPLOADS_PATH + "/<upload_id>", ["GET"], "upload_record", "upload_status"),
        _rule(RECORD_PATH, ["GET"], "get_record", "download"),
        _rule(RECORD_PATH, ["DELETE"], "upload_record", "delete_record"),
        _rule(HEALTH_PATH, ["GET"], EVERY_FUNCTION, "health"),
        _rule(TASKS_PATH, ["POST"], "upload_record", "pushed_task"),  # never routed by nginx
        _rule("/openapi.yaml", ["GET"], ROUTER, "openapi"),
        _rule("/docs", ["GET"], ROUTER, "docs"),
        _rule("/docs/<path:asset>", ["GET"], ROUTER, "docs_asset"),
    ],
    merge_slashes=False,  # no redirects: a path is matched as sent, or not at all
)
_ADAPTER = ROUTES.bind("localhost")


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    args: dict[str, str]


def allowed_methods(path: str) -> list[str]:
    """Every method any function (or the router) serves on ``path``, sorted; [] if none."""
    return sorted(_ADAPTER.allowed_methods(path))


def route(function: str, path: str, method: str) -> Route:
    """The endpoint of ``function`` for this request: 404 for an unknown path (or one another
    function serves), 405 with ``Allow`` for a known path with another method."""
    try:
        endpoint, args = _ADAPTER.match(path, method=method)
    except NoSuchMethod as exc:
        raise MethodNotAllowed(method, tuple(sorted(set(exc.valid_methods or ())))) from None
    except (NoSuchPath, RequestRedirect):
        raise NotFound("No such endpoint: see /docs for the API.") from None
    assert isinstance(endpoint, Endpoint)
    if endpoint.function not in (function, EVERY_FUNCTION):
        raise NotFound(f"{method} {path} is not served by this function.")
    return Route(endpoint.name, {name: str(value) for name, value in args.items()})


def upload_path(upload_id: uuid.UUID) -> str:
    """The status URL's path of a direct upload (and its conversion job)."""
    return f"{UPLOADS_PATH}/{upload_id}"
