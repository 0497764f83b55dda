"""Records: convert an uploaded WAV to MP3, store object and row together, look them up."""

from __future__ import annotations

import logging
import os
import re
import unicodedata
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from sqlalchemy import bindparam, select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from common.adapters.db import Database
from common.adapters.models import FILENAME_MAX_LENGTH, Record
from common.adapters.storage import Storage
from common.domain.conversion import convert_wav_stream
from common.domain.encoding import EncodingOptions
from common.domain.users import parse_uuid
from common.errors import NotFound
from common.settings import Settings

log = logging.getLogger(__name__)

_UNSAFE_FILENAME = re.compile(r'[\\/:*?"<>|]+')

# Single statements on the lean path (Database.execute): no ORM unit of work per request.
_RECORD_COLUMNS = (
    "id", "user_id", "object_key", "filename", "size_bytes", "etag", "duration_seconds",
    "bitrate_kbps", "sample_rate", "channels", "vbr_quality", "tags",
)  # fmt: skip
# A retried insert that had landed finds its own row: nothing happens.
_INSERT_RECORD = pg_insert(Record).on_conflict_do_nothing(index_elements=["id"])
_SELECT_RECORD = select(*(Record.__table__.c[c] for c in _RECORD_COLUMNS)).where(
    Record.id == bindparam("id")
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


def object_key(user_id: uuid.UUID, record_id: uuid.UUID) -> str:
    return f"users/{user_id}/records/{record_id}.mp3"


def mp3_filename(uploaded: str | None, record_id: uuid.UUID, title: str | None = None) -> str:
    """The download name: the title when there is one, else the upload's own name, with an
    .mp3 extension, made safe."""
    if title:
        base = title.replace("/", "_").replace("\\", "_")
        stem = base  # a title has no extension to drop: "Op. 2" stays whole
    else:
        base = os.path.basename((uploaded or "").replace("\\", "/"))
        stem = os.path.splitext(base)[0]
    stem = "".join(ch for ch in stem if unicodedata.category(ch) not in ("Cc", "Cf", "Cs"))
    stem = _UNSAFE_FILENAME.sub("_", stem).strip(" .")
    if not stem:
        stem = str(record_id)
    return stem[: FILENAME_MAX_LENGTH - 4] + ".mp3"


def create_record(
    db: Database,
    storage: Storage,
    settings: Settings,
    *,
    user_id: uuid.UUID,
    audio: Iterator[bytes],
    filename: str | None,
    options: EncodingOptions | None = None,
    record_id: uuid.UUID | None = None,
) -> NewRecord:
    """Convert ``audio`` (a WAV, streamed) for an authenticated user and store the MP3.

    Either both the object and its row exist afterwards, or neither does. ``record_id`` is
    given by a caller that must land on the same record when it runs again (a retried job);
    otherwise a new one is drawn.
    """
    options = options or EncodingOptions()
    record_id = record_id or uuid.uuid4()
    key = object_key(user_id, record_id)
    writer = storage.open_writer(key)
    try:
        result = convert_wav_stream(
            audio,
            writer,
            ffmpeg=settings.ffmpeg_binary,
            bitrate_kbps=settings.mp3_bitrate_kbps,
            timeout_seconds=settings.convert_timeout_seconds,
            options=options,
        )
        stored = writer.complete()
        record = Record(
            id=record_id,
            user_id=user_id,
            object_key=key,
            # The title, when there is one, names the download better than the upload's name.
            filename=mp3_filename(filename, record_id, result.tags.get("title")),
            size_bytes=stored.size,
            etag=stored.etag,
            duration_seconds=result.duration_seconds,
            bitrate_kbps=result.bitrate_kbps,
            sample_rate=result.sample_rate,
            channels=result.channels,
            vbr_quality=result.vbr_quality,
            tags=dict(result.tags) or None,
        )
        db.execute(_INSERT_RECORD, {c: getattr(record, c) for c in _RECORD_COLUMNS})
    except BaseException:
        writer.abort()  # no row without its object, and no object without its row
        raise
    log.info("record stored", extra={"record_id": str(record_id), "bytes": stored.size})
    return NewRecord(
        id=record_id,
        user_id=user_id,
        duration_seconds=result.duration_seconds,
        size_bytes=stored.size,
        bitrate_kbps=result.bitrate_kbps,
        sample_rate=result.sample_rate,
        channels=result.channels,
        filename=record.filename,
        vbr_quality=result.vbr_quality,
        tags=dict(result.tags),
    )


def find_record(db: Database, raw_id: str | None, raw_user: str | None) -> Record:
    """The record ``raw_id`` of user ``raw_user``; NotFound for anyone else's or none."""
    record_id = parse_uuid(raw_id, "id")
    user_id = parse_uuid(raw_user, "user")
    rows = db.execute(_SELECT_RECORD, {"id": record_id})
    found = rows[0]._asdict() if rows else None
    if found is None or found["user_id"] != user_id:
        raise NotFound("No record with this id exists for this user.")
    return Record(**found)
