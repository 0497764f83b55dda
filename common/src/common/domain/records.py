"""Records: look them up, list them (keyset pages with signed cursors), delete them."""

from __future__ import annotations

import hashlib
import hmac
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from itsdangerous import BadData, Signer
from itsdangerous.encoding import base64_decode, base64_encode
from itsdangerous.signer import SigningAlgorithm

from common.adapters.db import Database, sql
from common.adapters.storage import Storage
from common.domain.users import parse_uuid, user_gone
from common.errors import InvalidCursor, InvalidField, NotFound
from common.settings import Settings

log = logging.getLogger(__name__)

# records.filename is VARCHAR(255) (migrations/versions/0001).
FILENAME_MAX_LENGTH = 255


class StoredRecord(NamedTuple):
    """A ``records`` row, as new_records.INSERT_RECORD writes it and _SELECT_RECORD reads it."""

    id: uuid.UUID
    user_id: uuid.UUID
    object_key: str
    filename: str
    size_bytes: int
    etag: str
    duration_seconds: float
    bitrate_kbps: int
    sample_rate: int
    channels: int
    vbr_quality: int | None  # LAME -V quality of a VBR record; None for CBR
    tags: dict[str, str] | None  # the ID3v2.4 tags written into the MP3; None: none


class ListedRow(NamedTuple):
    """A row of the records list: what its JSON shows, and the keyset's created_at."""

    id: uuid.UUID
    user_id: uuid.UUID
    filename: str
    size_bytes: int
    duration_seconds: float
    bitrate_kbps: int
    sample_rate: int
    channels: int
    vbr_quality: int | None
    tags: dict[str, str] | None
    created_at: datetime


class ObjectKey(NamedTuple):
    object_key: str


_SELECT_RECORD = sql(
    "SELECT id, user_id, object_key, filename, size_bytes, etag, duration_seconds, "
    "bitrate_kbps, sample_rate, channels, vbr_quality, tags FROM records WHERE id = :id",
    StoredRecord,
    idempotent=True,
)


@dataclass(frozen=True, slots=True)
class NewRecord:
    id: uuid.UUID
    user_id: uuid.UUID
    duration_seconds: float
    size_bytes: int
    bitrate_kbps: int
    sample_rate: int
    channels: int
    filename: str
    vbr_quality: int | None = None
    tags: Mapping[str, str] = field(default_factory=dict)


RECORD_PREFIX = "users/"  # every object of a user's records is under users/<user>/


def object_key(user_id: uuid.UUID, record_id: uuid.UUID) -> str:
    return f"{RECORD_PREFIX}{user_id}/records/{record_id}.mp3"


def new_record(record: StoredRecord) -> NewRecord:
    """The 201 body's fields of a stored record."""
    return NewRecord(
        id=record.id,
        user_id=record.user_id,
        duration_seconds=record.duration_seconds,
        size_bytes=record.size_bytes,
        bitrate_kbps=record.bitrate_kbps,
        sample_rate=record.sample_rate,
        channels=record.channels,
        filename=record.filename,
        vbr_quality=record.vbr_quality,
        tags=dict(record.tags or {}),
    )


def get_record(db: Database, record_id: uuid.UUID) -> StoredRecord | None:
    rows = db.execute(_SELECT_RECORD, {"id": record_id})
    return rows[0] if rows else None


def find_record(db: Database, raw_id: str | None, raw_user: str | None) -> StoredRecord:
    """The record ``raw_id`` of user ``raw_user``; NotFound for anyone else's or none."""
    record_id = parse_uuid(raw_id, "id")
    user_id = parse_uuid(raw_user, "user")
    found = get_record(db, record_id)
    if found is None or found.user_id != user_id:
        raise NotFound("No record with this id exists for this user.")
    return found


# Listing: newest first, keyset on (created_at, id) — never OFFSET, which skips or repeats
# rows while others are inserted or deleted. The index ix_records_user_created_id serves it.
LIST_LIMIT_DEFAULT = 20
LIST_LIMIT_MAX = 100
_LIST_FIRST = sql(
    "SELECT id, user_id, filename, size_bytes, duration_seconds, bitrate_kbps, sample_rate, "
    "channels, vbr_quality, tags, created_at FROM records WHERE user_id = :user "
    "ORDER BY created_at DESC, id DESC LIMIT :limit",
    ListedRow,
    idempotent=True,
)
_LIST_AFTER = sql(
    "SELECT id, user_id, filename, size_bytes, duration_seconds, bitrate_kbps, sample_rate, "
    "channels, vbr_quality, tags, created_at FROM records WHERE user_id = :user "
    "AND (created_at, id) < (:created_at, :id) ORDER BY created_at DESC, id DESC LIMIT :limit",
    ListedRow,
    idempotent=True,
)
_RECORD_KEY = sql(
    "SELECT object_key FROM records WHERE id = :id AND user_id = :user", ObjectKey, idempotent=True
)
# A second run (its first reply was lost) deletes nothing more: the row was found before.
_DELETE_RECORD = sql("DELETE FROM records WHERE id = :id AND user_id = :user", idempotent=True)
_CURSOR_MAC_BYTES = 16
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class ListedRecord:
    record: NewRecord
    created_at: datetime


@dataclass(frozen=True, slots=True)
class RecordPage:
    records: list[ListedRecord]
    next_cursor: str | None


def parse_limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return LIST_LIMIT_DEFAULT
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= LIST_LIMIT_MAX:
        raise InvalidField(f"'limit' must be an integer from 1 to {LIST_LIMIT_MAX}.")
    return int(raw)


class _PayloadHmac(SigningAlgorithm):
    """HMAC-SHA256 of the payload the base64 text carries, cut to 16 bytes: the signature the
    cursors had before itsdangerous signed them, so cursors handed out earlier stay valid."""

    def get_signature(self, key: bytes, value: bytes) -> bytes:
        return hmac.new(key, base64_decode(value), hashlib.sha256).digest()[:_CURSOR_MAC_BYTES]


def _cursor_signer(secret: str) -> Signer:
    key = hashlib.sha256(b"record-service list cursor v1\0" + secret.encode()).digest()
    return Signer(key, key_derivation="none", algorithm=_PayloadHmac())


def encode_cursor(
    secret: str, user_id: uuid.UUID, created_at: datetime, record_id: uuid.UUID
) -> str:
    """An opaque, signed position: (user, created_at in microseconds, id)."""
    micros = (created_at - _EPOCH) // _MICROSECOND
    payload = f"{user_id}|{micros}|{record_id}".encode()
    return _cursor_signer(secret).sign(base64_encode(payload)).decode("ascii")


def decode_cursor(secret: str, user_id: uuid.UUID, cursor: str) -> tuple[datetime, uuid.UUID]:
    """The position in ``cursor``; InvalidCursor (422) if unparsable, forged or someone else's."""
    try:
        payload = base64_decode(_cursor_signer(secret).unsign(cursor))
        owner, micros, record_id = payload.decode("ascii").split("|")
        if uuid.UUID(owner) != user_id:
            raise ValueError("another user's cursor")
        return _EPOCH + int(micros) * _MICROSECOND, uuid.UUID(record_id)
    except (BadData, ValueError, UnicodeDecodeError) as exc:
        raise InvalidCursor(
            "'cursor' is not one this service issued for this user: pass next_cursor as it is."
        ) from exc


def list_records(
    db: Database,
    settings: Settings,
    *,
    user_id: uuid.UUID,
    limit: int,
    cursor: str | None,
) -> RecordPage:
    """One page of ``user_id``'s records, newest first, and the cursor of the next one."""
    params: dict[str, object] = {"user": user_id, "limit": limit + 1}
    statement = _LIST_FIRST
    if cursor:
        params["created_at"], params["id"] = decode_cursor(
            settings.idempotency_secret, user_id, cursor
        )
        statement = _LIST_AFTER
    rows = db.execute(statement, params)
    if not rows and (gone := user_gone(db, user_id)):  # erased since it was authenticated
        raise gone
    listed = [
        ListedRecord(
            NewRecord(
                id=row.id,
                user_id=row.user_id,
                duration_seconds=row.duration_seconds,
                size_bytes=row.size_bytes,
                bitrate_kbps=row.bitrate_kbps,
                sample_rate=row.sample_rate,
                channels=row.channels,
                filename=row.filename,
                vbr_quality=row.vbr_quality,
                tags=dict(row.tags or {}),
            ),
            row.created_at,
        )
        for row in rows[:limit]
    ]
    next_cursor = None
    if len(rows) > limit:
        last = listed[-1]
        next_cursor = encode_cursor(
            settings.idempotency_secret, user_id, last.created_at, last.record.id
        )
    return RecordPage(listed, next_cursor)


def delete_record(
    db: Database, storage: Storage, *, user_id: uuid.UUID, raw_id: str | None
) -> None:
    """Delete the row, then the object: a crash between leaves only an orphan object,
    which ``make sweep`` removes; never a row without its object. NotFound for anyone else's.

    The row is found first, then deleted: a DELETE run again after its reply was lost (or a
    concurrent delete) finds nothing, and the answer is still that the record is gone.
    """
    record_id = parse_uuid(raw_id, "id")
    params = {"id": record_id, "user": user_id}
    rows = db.execute(_RECORD_KEY, params)
    if not rows:
        raise user_gone(db, user_id) or NotFound("No record with this id exists for this user.")
    db.execute(_DELETE_RECORD, params)
    storage.discard(rows[0].object_key)  # the row is gone already: the sweep removes a leftover
    log.info("record deleted", extra={"record_id": str(record_id)})
