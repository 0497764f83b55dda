"""The list cursor, signed with itsdangerous in the format cursors had before it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from common.domain.records import decode_cursor, encode_cursor
from common.errors import InvalidCursor

SECRET = "a-secret-of-at-least-thirty-two-characters"
USER = uuid.UUID("11111111-2222-3333-4444-555555555555")
RECORD = uuid.UUID("66666666-7777-8888-9999-000000000000")
AT = datetime(2026, 12, 3, 18, 40, 1, 123456, tzinfo=UTC)
# Issued by the hand-written HMAC + base64 this replaces: a client may still hold one.
EARLIER = (
    "MTExMTExMTEtMjIyMi0zMzMzLTQ0NDQtNTU1NTU1NTU1NTU1fDE3OTYzMjMyMDExMjM0NTZ8NjY2NjY2NjYtNzc3"
    "Ny04ODg4LTk5OTktMDAwMDAwMDAwMDAw.UCrCOcJbxwDzbY4rrDAyzg"
)


def test_a_cursor_issued_before_still_reads_and_is_issued_the_same() -> None:
    assert decode_cursor(SECRET, USER, EARLIER) == (AT, RECORD)
    assert encode_cursor(SECRET, USER, AT, RECORD) == EARLIER


@pytest.mark.parametrize(
    "cursor",
    [
        EARLIER[:-2] + "AA",  # forged signature
        EARLIER.replace(".", ""),  # no signature
        EARLIER + ".x",
        "x",
        "",
        "é.é",
    ],
)
def test_a_cursor_not_issued_here_is_refused(cursor: str) -> None:
    with pytest.raises(InvalidCursor):
        decode_cursor(SECRET, USER, cursor)


def test_another_users_or_another_secrets_cursor_is_refused() -> None:
    with pytest.raises(InvalidCursor):
        decode_cursor(SECRET, uuid.uuid4(), EARLIER)
    with pytest.raises(InvalidCursor):
        decode_cursor(SECRET + "!", USER, EARLIER)
