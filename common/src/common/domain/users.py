"""Users: creation with a one-time token, and authentication of a user id + token pair."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

from common.adapters.db import Connection, Database, sql
from common.domain.text import first_control
from common.domain.tokens import hash_token, new_token, token_matches
from common.errors import InvalidField, Unauthorized

# users.name is VARCHAR(100) (migrations/versions/0001).
NAME_MAX_LENGTH = 100


@dataclass(frozen=True, slots=True)
class NewUser:
    id: uuid.UUID
    name: str
    token: str  # shown to the caller once, never stored


def validate_name(raw: object) -> str:
    if not isinstance(raw, str):
        raise InvalidField("'name' must be a string.")
    name = raw.strip()
    if not name:
        raise InvalidField("'name' must not be empty.")
    if len(name) > NAME_MAX_LENGTH:
        raise InvalidField(f"'name' must be at most {NAME_MAX_LENGTH} characters.")
    if first_control(name) is not None:
        raise InvalidField("'name' must not contain control characters.")
    return name


_INSERT_USER = sql(
    "INSERT INTO users (id, name, token_hash) VALUES (:id, :name, :token_hash) "
    "ON CONFLICT (id) DO NOTHING",  # a retried insert that had landed: the row is ours
    idempotent=True,
)


class TokenHash(NamedTuple):
    token_hash: bytes


class UserId(NamedTuple):
    id: uuid.UUID


class Found(NamedTuple):
    found: int


_SELECT_TOKEN_HASH = sql("SELECT token_hash FROM users WHERE id = :id", TokenHash, idempotent=True)


# How long a rotation's answer is replayed to a repeat with its Idempotency-Key (and the old
# token): long enough for a client to retry a lost answer, short for a leaked old token.
ROTATION_REPLAY_WINDOW = timedelta(minutes=5)

Within = Callable[[Connection], None]


def new_user(raw_name: object) -> NewUser:
    """A user not stored yet: its id and token are drawn before the INSERT, so the answer
    can be stored in the same transaction (an Idempotency-Key)."""
    return NewUser(id=uuid.uuid4(), name=validate_name(raw_name), token=new_token())


def create_user(
    db: Database,
    raw_name: object = None,
    *,
    user: NewUser | None = None,
    within: Within | None = None,
) -> NewUser:
    """Store a new user named ``raw_name`` (or ``user``, drawn by :func:`new_user`);
    ``within`` runs in the INSERT's transaction (it stores the answer)."""
    user = user or new_user(raw_name)
    params = {"id": user.id, "name": user.name, "token_hash": hash_token(user.token)}
    if within is None:  # one autocommitted INSERT (one round trip): the hot path
        db.execute(_INSERT_USER, params)
        return user
    with db.transaction() as conn:
        conn.execute(_INSERT_USER, params)
        within(conn)
    return user


def parse_uuid(raw: str | None, field: str) -> uuid.UUID:
    if raw is None or not raw.strip():
        raise InvalidField(f"'{field}' is required.")
    try:
        return uuid.UUID(raw.strip())
    except ValueError as exc:
        raise InvalidField(f"'{field}' must be a UUID.") from exc


_USER_EXISTS = sql("SELECT 1 AS found FROM users WHERE id = :id", Found, idempotent=True)


def user_gone(db: Database, user_id: uuid.UUID) -> Unauthorized | None:
    """The 401 for an authenticated user that no longer exists (erased since), or None.

    A query that found nothing for the user asks this before its 404: an erased user's
    token is refused everywhere alike."""
    if db.execute(_USER_EXISTS, {"id": user_id}):
        return None
    return Unauthorized("The user id and access token do not match.")


def authenticate(db: Database, raw_user_id: str | None, token: str | None) -> uuid.UUID:
    """The user's id if ``token`` is theirs; Unauthorized otherwise (same answer either way)."""
    user_id = parse_uuid(raw_user_id, "user")
    if not token:
        raise Unauthorized("An access token is required (form field 'token' or a Bearer header).")
    rows = db.execute(_SELECT_TOKEN_HASH, {"id": user_id})
    stored_hash = bytes(rows[0].token_hash) if rows else None
    if not token_matches(token, stored_hash):
        raise Unauthorized("The user id and access token do not match.")
    return user_id


# A second run finds its own result (the new hash): it matches again, and nothing changes.
_ROTATE_TOKEN = sql(
    "UPDATE users SET token_hash = :new_hash WHERE id = :id "
    "AND token_hash IN (:old_hash, :new_hash) RETURNING id",
    UserId,
    idempotent=True,
)


def rotate_token(
    db: Database,
    raw_user_id: str | None,
    token: str | None,
    new: str,
    *,
    within: Within | None = None,
) -> str:
    """Make ``new`` the user's token; the old one is refused from the moment this returns.

    One conditional UPDATE: of two rotations racing with the same old token, one wins and
    the other gets 401, so exactly one new token is ever valid. ``within`` runs in its
    transaction: the answer (the new token) is stored with the rotation, or neither is.
    """
    user_id = authenticate(db, raw_user_id, token)
    assert token is not None  # authenticate refuses a missing token
    params = {"id": user_id, "old_hash": hash_token(token), "new_hash": hash_token(new)}
    if within is None:
        rows = db.execute(_ROTATE_TOKEN, params)
    else:
        with db.transaction() as conn:
            rows = conn.execute(_ROTATE_TOKEN, params)
            if rows:
                within(conn)
    if not rows:
        raise Unauthorized("The user id and access token do not match.")
    return new
