"""Who is calling: the user id and access token of a request (Bearer header or body fields)."""

from __future__ import annotations

import uuid
from typing import Any

from werkzeug.wrappers import Request

from common.adapters.db import Database
from common.domain.users import authenticate
from common.errors import InvalidField
from common.http.request_body import read_fields


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if there is one."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def request_credentials(request: Request) -> tuple[str | None, str | None, dict[str, Any]]:
    """(user id, token, body fields) of a direct-upload call.

    The body is optional: a small JSON object or form (``user``, ``token``, ``filename``).
    The user may also come from the query string and the token from a Bearer header.
    """
    fields: dict[str, Any] = {}
    if request.content_length or request.headers.get("Transfer-Encoding"):
        fields = read_fields(request)
    for name in ("user", "token", "filename"):
        if name in fields and fields[name] is not None and not isinstance(fields[name], str):
            raise InvalidField(f"'{name}' must be a string.")
    user = fields.get("user") or request.args.get("user")
    token = bearer_token(request.headers.get("Authorization")) or fields.get("token")
    return user, token, fields


def authenticated_user(db: Database, request: Request) -> tuple[uuid.UUID, dict[str, Any]]:
    user, token, fields = request_credentials(request)
    return authenticate(db, user, token), fields


def bearer_user(db: Database, request: Request) -> uuid.UUID:
    """The user of a request without a body: ``user`` in the query, the token as Bearer."""
    return authenticate(
        db, request.args.get("user"), bearer_token(request.headers.get("Authorization"))
    )
