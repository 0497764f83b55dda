"""Lambda Function URL / HTTP API (payload 2.0) events from the JSON fixtures in ``events/``.

The fixtures are real event payloads as the Lambda service delivers them; :func:`event` fills
in the parts a test varies (path, method, query string, headers, body) the way Lambda would:
a base64 body for fixtures that carry one (``isBase64Encoded``), text otherwise. The tests and
the benchmark both send them; the fixtures ship inside this package.
"""

from __future__ import annotations

import base64
import copy
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

EVENTS = Path(__file__).resolve().parent / "events"


@cache
def _fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((EVENTS / name).read_text())
    return loaded


def event_fixture(name: str) -> dict[str, Any]:
    """A fixture as stored (a deep copy): SQS and other non-HTTP events."""
    return copy.deepcopy(_fixture(name))


def event(
    name: str,
    *,
    path: str | None = None,
    method: str | None = None,
    query: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    drop_headers: tuple[str, ...] = (),
    body: bytes | str | None = None,
    path_parameters: dict[str, str] | None = None,
) -> dict[str, Any]:
    ev = copy.deepcopy(_fixture(name))
    http = ev["requestContext"]["http"]
    if path is not None:
        ev["rawPath"] = path
        http["path"] = path
    if method is not None:
        http["method"] = method
    if ev["routeKey"] != "$default":  # an HTTP API route: "METHOD /path" or a path template
        template = ev["routeKey"].split(" ", 1)[1]
        route = template if "{" in template else ev["rawPath"]
        ev["routeKey"] = ev["requestContext"]["routeKey"] = f"{http['method']} {route}"
    if path_parameters is not None:
        ev["pathParameters"] = dict(path_parameters)
    if query is not None:
        ev["rawQueryString"] = urlencode(query)
        if query:
            ev["queryStringParameters"] = dict(query)
        else:
            ev.pop("queryStringParameters", None)
    for key in drop_headers:
        ev["headers"].pop(key, None)
    ev["headers"].update({k.lower(): v for k, v in (headers or {}).items()})
    if body is not None:
        raw = body.encode() if isinstance(body, str) else body
        if ev["isBase64Encoded"]:
            ev["body"] = base64.b64encode(raw).decode("ascii")
        else:
            ev["body"] = raw.decode("utf-8")
        ev["headers"]["content-length"] = str(len(raw))
    return ev


@dataclass
class LambdaResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    base64: bool

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(result: dict[str, Any]) -> LambdaResponse:
    """A Lambda proxy response (payload 2.0) as the client would see it."""
    encoded = bool(result.get("isBase64Encoded"))
    raw = result.get("body") or ""
    body = base64.b64decode(raw) if encoded else raw.encode("utf-8")
    headers = {k.lower(): v for k, v in (result.get("headers") or {}).items()}
    return LambdaResponse(int(result["statusCode"]), headers, body, encoded)
