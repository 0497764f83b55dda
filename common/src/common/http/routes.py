"""The paths the functions serve beyond their first one, and their path parameters."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from common.domain.users import parse_uuid

USERS_PATH = "/users"
RECORD_PATH = "/record"
RECORDS_PATH = "/records"
UPLOADS_PATH = "/records/uploads"
# Route templates: an Idempotency-Key is scoped to one of these (and its caller).
ROTATE_ROUTE = "/users/{id}/token"
COMPLETE_ROUTE = "/records/uploads/{id}/complete"
_USER_PATH = re.compile(r"^/users/([^/]+)(/token)?/?$")
_UPLOAD_PATH = re.compile(r"^/records/uploads/([^/]+)(/complete)?/?$")


@dataclass(frozen=True, slots=True)
class UserPath:
    user_id: uuid.UUID
    token: bool  # /users/<id>/token (rotate) rather than /users/<id> (erase)


def user_path(path: str) -> UserPath | None:
    """``/users/<id>`` or ``/users/<id>/token``; None for any other path; 422 for a bad id."""
    match = _USER_PATH.match(path)
    if match is None:
        return None
    return UserPath(parse_uuid(match.group(1), "user"), match.group(2) is not None)


def upload_target(path: str) -> tuple[str, bool] | None:
    """(upload id segment, is the completion) of ``/records/uploads/<id>[/complete]``, else None."""
    match = _UPLOAD_PATH.match(path)
    return (match.group(1), bool(match.group(2))) if match else None


def upload_path(upload_id: uuid.UUID) -> str:
    """The status URL's path of a direct upload (and its conversion job)."""
    return f"{UPLOADS_PATH}/{upload_id}"


def same_path(path: str, expected: str) -> bool:
    return path.rstrip("/") == expected
