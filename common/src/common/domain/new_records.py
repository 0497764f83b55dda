"""New records: convert an uploaded WAV to MP3, store the object, then insert its row.

Either both the object and its row exist afterwards, or neither does (docs/reliability.md).
Apart from :mod:`common.domain.records` so that reading records never loads the conversion.
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from common.adapters.db import Database, is_foreign_key_violation, sql
from common.adapters.storage import Storage
from common.domain.conversion import convert_wav_stream
from common.domain.encoding import EncodingOptions
from common.domain.idempotency import AnswerHook
from common.domain.records import (
    FILENAME_MAX_LENGTH,
    NewRecord,
    StoredRecord,
    new_record,
    object_key,
)
from common.errors import DependencyUnavailable, Unauthorized
from common.settings import Settings

log = logging.getLogger(__name__)

_UNSAFE_FILENAME = re.compile(r'[\\/:*?"<>|]+')
# A retried insert that had landed finds its own row: nothing happens.
INSERT_RECORD = sql(
    "INSERT INTO records (id, user_id, object_key, filename, size_bytes, etag, "
    "duration_seconds, bitrate_kbps, sample_rate, channels, vbr_quality, tags) "
    "VALUES (:id, :user_id, :object_key, :filename, :size_bytes, :etag, :duration_seconds, "
    ":bitrate_kbps, :sample_rate, :channels, :vbr_quality, :tags) ON CONFLICT (id) DO NOTHING",
    idempotent=True,
)


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


@dataclass(frozen=True, slots=True)
class StoredMp3:
    """An MP3 written to the bucket, and the records row that must go with it."""

    key: str
    row: dict[str, Any]
    record: NewRecord


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
    within: AnswerHook[NewRecord] | None = None,
) -> NewRecord:
    """Convert ``audio`` (a WAV, streamed) for an authenticated user and store the MP3.

    Either both the object and its row exist afterwards, or neither does; on an unknown
    outcome (503) the object stays. ``record_id`` is given by a caller that must land on the
    same record when it runs again; otherwise a new one is drawn. ``within`` stores the
    answer (an Idempotency-Key's) in the INSERT's transaction.
    """
    stored = store_mp3(
        storage, settings, user_id=user_id, audio=audio, filename=filename,
        options=options, record_id=record_id,
    )  # fmt: skip
    # Trailing chunks the conversion left unread are still the request (its fingerprint):
    # read them now, not while a transaction is open.
    for _ in audio:
        pass
    try:
        if within is None:  # one autocommitted INSERT, run again if its reply was lost
            db.execute(INSERT_RECORD, stored.row)
        else:
            with db.transaction() as conn:
                conn.execute(INSERT_RECORD, stored.row)
                within(conn, stored.record)
    except DependencyUnavailable as exc:
        if not exc.outcome_unknown:  # the INSERT never ran: no row will come of it
            storage.discard(stored.key)
            raise
        # The INSERT may have committed (its reply was lost): the object stays, so there is
        # never a row without its object; if no row came of it, the sweep removes the object.
        log.warning("record insert outcome unknown; object kept", extra={"key": stored.key})
        raise
    except BaseException as exc:
        storage.discard(stored.key)  # no object without its row
        if is_foreign_key_violation(exc):  # the user was erased while the upload streamed
            raise Unauthorized("The user was erased while this upload was converted.") from exc
        raise
    log.info(
        "record stored",
        extra={"record_id": str(stored.record.id), "bytes": stored.record.size_bytes},
    )
    return stored.record


def store_mp3(
    storage: Storage,
    settings: Settings,
    *,
    user_id: uuid.UUID,
    audio: Iterator[bytes],
    filename: str | None,
    options: EncodingOptions | None = None,
    record_id: uuid.UUID | None = None,
) -> StoredMp3:
    """Convert ``audio`` into the object of record ``record_id``; the caller inserts its row.

    Nothing is left in the bucket when this raises. A conversion job inserts the row
    (:data:`INSERT_RECORD`) in the transaction that marks its upload done.
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
    except BaseException:
        writer.abort()  # no object without its row
        raise
    record = StoredRecord(
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
    return StoredMp3(
        key=key,
        row=record._asdict(),
        record=new_record(record),
    )
