"""Idempotency-Key on every POST: replays, mismatches, in-flight repeats, leases, scopes, and
what a database dump shows (common.domain.idempotency, common.http.idempotency).

"""

from __future__ import annotations

import uuid

import pytest
from common.adapters.db import sql
from common.domain import idempotency
from common.domain.idempotency import Scope, StoredReply
from common.errors import IdempotencyKeyReused, InvalidField

SECRET = "s" * 40
_ALL_ROWS = sql(
    "SELECT key_hash, user_id, fingerprint, state, response FROM idempotency_keys "
    "WHERE user_id = :user OR user_id IS NULL"
)


def test_sealed_reply_needs_the_raw_key_and_the_secret() -> None:
    reply = StoredReply(201, {"Location": "/x"}, b'{"token": "secret-token"}')
    hashed = idempotency.key_hash(Scope("anonymous", "POST", "/users"), "k" * 20)
    sealed = idempotency.seal(reply, secret=SECRET, key="k" * 20, hashed=hashed)
    assert b"secret-token" not in sealed
    assert idempotency.unseal(sealed, secret=SECRET, key="k" * 20, hashed=hashed) == reply
    for secret, key in ((SECRET, "k" * 21), ("t" * 40, "k" * 20)):
        with pytest.raises(IdempotencyKeyReused):
            idempotency.unseal(sealed, secret=secret, key=key, hashed=hashed)


def test_scopes_never_share_a_key_hash() -> None:
    key = "same-key"
    scopes = [
        Scope(str(uuid.uuid4()), "POST", "/records"),
        Scope(str(uuid.uuid4()), "POST", "/records"),
        Scope("anonymous", "POST", "/users"),
        Scope(scopes_user := str(uuid.uuid4()), "POST", "/records/uploads"),
        Scope(scopes_user, "POST", "/records"),
    ]
    assert len({idempotency.key_hash(s, key) for s in scopes}) == len(scopes)


@pytest.mark.parametrize(
    ("raw", "anonymous"),
    [("", False), ("   ", False), ("x" * 256, False), ("a\x01b", False), ("short", True)],
)
def test_bad_keys_are_refused(raw: str, anonymous: bool) -> None:
    with pytest.raises(InvalidField):
        idempotency.validate_key(raw, anonymous=anonymous)


def test_good_keys() -> None:
    assert idempotency.validate_key("x" * 255) == "x" * 255
    assert idempotency.validate_key(str(uuid.uuid4()), anonymous=True)


def test_a_non_ascii_key_is_told_what_is_wrong() -> None:
    with pytest.raises(InvalidField, match="ASCII"):
        idempotency.validate_key("ключ-ключ-ключ-ключ")
