"""Direct uploads: the WAV goes from the client straight to the bucket, then is converted there.

Platform request caps (Lambda 6 MB, Cloud Run HTTP/1 32 MiB) make ``POST /records`` useless
for long recordings, so a large WAV takes two authenticated calls instead:

1. ``POST /records/uploads`` -> a presigned POST for ``uploads/<user>/<upload>.wav``: the
   client sends the file to the object store itself. The POST policy pins the key, and its
   ``content-length-range`` makes the store refuse anything over ``MAX_DIRECT_UPLOAD_BYTES``
   (SeaweedFS and S3 both enforce it: the tests check). The URL is signed for
   ``S3_PUBLIC_ENDPOINT_URL``, like download redirects.
2. ``POST /records/uploads/<upload>/complete`` -> the WAV is streamed from the bucket
   (object body chunks -> ffmpeg -> multipart MP3 upload, never whole in memory), stored as a
   record exactly like ``POST /records`` stores one, and the same 201 body comes back. The WAV
   is deleted once converted, and also when it is refused as not convertible (415/422), since
   it never will be. Completion looks only under the caller's own prefix: someone else's
   upload id is simply "not found" (404), indistinguishable from one that never existed.

The size is checked again at completion (413) for stores that would not enforce the policy.
Abandoned uploads expire by the bucket lifecycle rule on ``uploads/`` (:mod:`common.ops.bucket`).
A completion repeated after success finds nothing (404): the WAV is gone by then.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, unquote

from botocore.exceptions import BotoCoreError, ClientError

from common.adapters.db import Database
from common.adapters.models import FILENAME_MAX_LENGTH
from common.adapters.storage import ObjectMissing, Storage
from common.domain.records import NewRecord, create_record
from common.errors import (
    DependencyUnavailable,
    NotFound,
    PayloadTooLarge,
    ServiceError,
)
from common.settings import Settings

log = logging.getLogger(__name__)

PENDING_PREFIX = "uploads/"
WAV_CONTENT_TYPE = "audio/wav"
# The form field that carries the WAV: in POST /records and in the presigned POST to the bucket.
FILE_FIELD = "file"
FILENAME_META = "filename"
UPLOADS_PATH = "/records/uploads"
_COMPLETE_PATH = re.compile(r"^/records/uploads/([^/]+)/complete/?$")


def pending_key(user_id: uuid.UUID, upload_id: uuid.UUID) -> str:
    return f"{PENDING_PREFIX}{user_id}/{upload_id}.wav"


def completion_target(path: str) -> str | None:
    """The upload id segment of a ``/records/uploads/<id>/complete`` path, else None."""
    match = _COMPLETE_PATH.match(path)
    return match.group(1) if match else None


@dataclass(frozen=True, slots=True)
class PresignedUpload:
    id: uuid.UUID
    url: str
    fields: dict[str, str]
    max_bytes: int
    expires_at: datetime

    def to_json(self, base_url: str) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "upload": {
                "method": "POST",
                "url": self.url,
                "fields": self.fields,
                "file_field": FILE_FIELD,
                "enctype": "multipart/form-data",
            },
            "max_bytes": self.max_bytes,
            "expires_at": self.expires_at.isoformat().replace("+00:00", "Z"),
            "complete_url": f"{base_url}{UPLOADS_PATH}/{self.id}/complete",
        }


def start_upload(
    storage: Storage, settings: Settings, *, user_id: uuid.UUID, filename: str | None
) -> PresignedUpload:
    """A presigned POST for a new pending upload of ``user_id``."""
    upload_id = uuid.uuid4()
    key = pending_key(user_id, upload_id)
    max_bytes = settings.max_direct_upload_bytes
    expires = settings.presign_expires_seconds
    fields = {"Content-Type": WAV_CONTENT_TYPE}
    name = _clean_filename(filename)
    if name:
        fields[f"x-amz-meta-{FILENAME_META}"] = quote(name, safe="")
    conditions: list[Any] = [
        ["content-length-range", 1, max_bytes],
        *({k: v} for k, v in fields.items()),
    ]
    try:
        post = storage.presign_client.generate_presigned_post(
            storage.bucket, key, Fields=fields, Conditions=conditions, ExpiresIn=expires
        )
    except (BotoCoreError, ClientError) as exc:  # no credentials to sign with
        log.error("could not presign an upload: %s", exc)
        raise DependencyUnavailable("object store", storage.retry_after) from exc
    log.info("direct upload started", extra={"upload_id": str(upload_id)})
    return PresignedUpload(
        id=upload_id,
        url=post["url"],
        fields={k: str(v) for k, v in post["fields"].items()},
        max_bytes=max_bytes,
        expires_at=datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=expires),
    )


def complete_upload(
    db: Database,
    storage: Storage,
    settings: Settings,
    *,
    user_id: uuid.UUID,
    raw_upload_id: str,
) -> NewRecord:
    """Convert the pending upload ``raw_upload_id`` of ``user_id`` into a record."""
    try:
        upload_id = uuid.UUID(raw_upload_id)
    except ValueError as exc:
        raise _not_found() from exc
    key = pending_key(user_id, upload_id)
    try:
        with storage.translate_errors():
            head = storage.client.head_object(Bucket=storage.bucket, Key=key)
    except ObjectMissing as exc:
        raise _not_found() from exc
    size = int(head["ContentLength"])
    if size > settings.max_direct_upload_bytes:
        storage.delete(key)
        raise PayloadTooLarge(
            f"The upload is larger than the limit of {settings.max_direct_upload_bytes} bytes."
        )
    filename = unquote(head.get("Metadata", {}).get(FILENAME_META, "")) or None
    try:
        stream = storage.open_read(key)
    except ObjectMissing as exc:  # completed concurrently and deleted in between
        raise _not_found() from exc
    try:
        record = create_record(
            db,
            storage,
            settings,
            user_id=user_id,
            audio=_translated(iter(stream), storage.retry_after),
            filename=filename,
        )
    except ServiceError as exc:
        if exc.status < 500:  # the WAV itself is refused: it will never convert
            _discard(storage, key)
        raise
    finally:
        stream.close()
    _discard(storage, key)
    log.info(
        "direct upload converted",
        extra={"upload_id": str(upload_id), "record_id": str(record.id), "wav_bytes": size},
    )
    return record


def _clean_filename(raw: str | None) -> str | None:
    if not raw:
        return None
    name = "".join(ch for ch in raw if ch.isprintable()).strip()
    return name[:FILENAME_MAX_LENGTH] or None


def _translated(chunks: Iterator[bytes], retry_after: int) -> Iterator[bytes]:
    """The WAV's chunks; a store failure mid-read becomes a 503, not a bug."""
    try:
        yield from chunks
    except (BotoCoreError, OSError) as exc:
        raise DependencyUnavailable("object store", retry_after) from exc


def _discard(storage: Storage, key: str) -> None:
    try:
        storage.delete(key)
    except (ServiceError, ObjectMissing) as exc:  # the lifecycle rule removes it later
        log.warning("could not delete the pending upload %s: %s", key, exc)


def _not_found() -> NotFound:
    return NotFound("No pending upload with this id exists for this user.")
