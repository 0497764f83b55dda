"""Direct uploads: the WAV goes from the client straight to the bucket, then is converted there.

``POST /records/uploads`` gives a presigned POST for ``uploads/<user>/<upload>.wav`` and makes
the ``uploads`` row; completion moves the row from ``uploading`` to ``queued`` in one
conditional UPDATE, so exactly one caller enqueues the job (:mod:`common.domain.jobs`) and the
others are told its state. Only the caller's own uploads are visible: anyone else's is a 404.
Why the flow is shaped so, and every answer: docs/direct-uploads.md.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from common.adapters.db import Database, is_foreign_key_violation, sql
from common.adapters.queue import JobQueue
from common.adapters.storage import ObjectMissing, Storage
from common.domain.encoding import EncodingOptions
from common.domain.idempotency import AnswerHook
from common.domain.jobs import UploadId, abandoned
from common.domain.records import (
    FILENAME_MAX_LENGTH,
    NewRecord,
    ObjectKey,
    get_record,
    new_record,
)
from common.domain.users import user_gone
from common.errors import (
    InvalidField,
    NotFound,
    PayloadTooLarge,
    TooManyPendingUploads,
    Unauthorized,
    UploadNotReceived,
)
from common.settings import Settings

log = logging.getLogger(__name__)

PENDING_PREFIX = "uploads/"
WAV_CONTENT_TYPE = "audio/wav"
FILENAME_META = "filename"
# How often a completion that waits (Prefer: wait=N) looks at its job.
WAIT_POLL_SECONDS = 0.25


class UploadRow(NamedTuple):
    """An ``uploads`` row as the completion and the status read it."""

    id: uuid.UUID
    user_id: uuid.UUID
    object_key: str
    status: str
    progress: float
    record_id: uuid.UUID | None
    error: dict[str, Any] | None
    attempts: int
    lease_expired: bool | None  # None: no lease (not converting)


# Inserted only while the user has fewer than :cap uploads pending: queued or converting, or
# waiting for their WAV with a form that can still be used. A retried insert that had landed
# finds its own row (_UPLOAD_EXISTS).
_INSERT_UPLOAD = sql(
    "INSERT INTO uploads (id, user_id, object_key, filename, options) "
    "SELECT :id, :user_id, :object_key, :filename, :options "
    "WHERE (SELECT count(*) FROM uploads WHERE user_id = :user_id"
    " AND (status IN ('queued', 'converting') OR (status = 'uploading'"
    " AND created_at > now() - make_interval(secs => :form_seconds)))) < :cap "
    "ON CONFLICT (id) DO NOTHING RETURNING id",
    UploadId,
    idempotent=True,
)
# Of these WAV keys, those whose upload may still need its WAV.
_KEYS_STILL_NEEDED = sql(
    "SELECT object_key FROM uploads WHERE object_key = ANY(:keys) "
    "AND status IN ('uploading', 'queued', 'converting')",
    ObjectKey,
    idempotent=True,
)
_UPLOAD_EXISTS = sql("SELECT id FROM uploads WHERE id = :id", UploadId, idempotent=True)
_SELECT_UPLOAD = sql(
    "SELECT id, user_id, object_key, status, progress, record_id, error, attempts, "
    "lease_until < now() AS lease_expired FROM uploads WHERE id = :id AND user_id = :user_id",
    UploadRow,
    idempotent=True,
)
# The one promise: exactly one completion moves the row out of 'uploading'. That completion
# is known by the record id it chose: a second run of it (a lost reply, or the client's repeat
# with its Idempotency-Key) finds the row queued with that id and is the winner again.
_QUEUE = sql(
    "UPDATE uploads SET status = 'queued', record_id = :record_id, queue = :queue, "
    "queued_at = COALESCE(queued_at, now()) WHERE id = :id AND user_id = :user_id "
    "AND (status = 'uploading' OR (status = 'queued' AND record_id = :record_id)) "
    "RETURNING id",
    UploadId,
    idempotent=True,
)
_QUEUE_CLAIM_FAILED = sql(
    "UPDATE uploads SET status = 'failed', error = CAST(:error AS JSONB), finished_at = now() "
    "WHERE id = :id AND user_id = :user_id AND status = 'uploading' RETURNING id",
    UploadId,
)
_UNQUEUE = sql(
    "UPDATE uploads SET status = 'uploading', record_id = NULL, queue = NULL, queued_at = NULL "
    "WHERE id = :id AND status = 'queued'",
    idempotent=True,
)
_ABANDON = sql(
    "UPDATE uploads SET status = 'failed', error = CAST(:error AS JSONB), lease_until = NULL, "
    "finished_at = now() WHERE id = :id AND status = 'converting' AND lease_until < now()",
    idempotent=True,
)


def pending_key(user_id: uuid.UUID, upload_id: uuid.UUID) -> str:
    return f"{PENDING_PREFIX}{user_id}/{upload_id}.wav"


@dataclass(frozen=True, slots=True)
class PresignedUpload:
    id: uuid.UUID
    url: str
    fields: dict[str, str]
    max_bytes: int
    expires_at: datetime


def start_upload(
    db: Database,
    storage: Storage,
    settings: Settings,
    *,
    user_id: uuid.UUID,
    filename: str | None,
    options: EncodingOptions | None = None,
    within: AnswerHook[PresignedUpload] | None = None,
) -> PresignedUpload:
    """A presigned POST for a new pending upload of ``user_id``, and its ``uploads`` row.

    ``within`` stores the answer (an Idempotency-Key's) in the INSERT's transaction.
    """
    upload_id = uuid.uuid4()
    key = pending_key(user_id, upload_id)
    max_bytes = settings.max_direct_upload_bytes
    expires = settings.presign_expires_seconds
    name = _clean_filename(filename)
    post = storage.presigned_post(
        key,
        content_type=WAV_CONTENT_TYPE,
        metadata={FILENAME_META: name} if name else {},
        max_bytes=max_bytes,
        expires=expires,
    )
    upload = PresignedUpload(
        id=upload_id,
        url=post.url,
        fields=post.fields,
        max_bytes=max_bytes,
        expires_at=datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=expires),
    )
    cap = settings.max_pending_uploads_per_user
    params = {
        "id": upload_id, "user_id": user_id, "object_key": key, "filename": name,
        "options": (options or EncodingOptions()).to_json(), "form_seconds": expires, "cap": cap,
    }  # fmt: skip
    try:
        if within is None:  # autocommitted, retried if its reply was lost
            inserted = db.execute(_INSERT_UPLOAD, params)
            inserted = inserted or db.execute(_UPLOAD_EXISTS, {"id": upload_id})
        else:
            with db.transaction() as conn:
                inserted = conn.execute(_INSERT_UPLOAD, params)
                if inserted:
                    within(conn, upload)
    except Exception as exc:
        if is_foreign_key_violation(exc):  # the user was erased since it was authenticated
            raise Unauthorized("The user id and access token do not match.") from exc
        raise
    if not inserted:
        raise TooManyPendingUploads(cap, retry_after=settings.job_lease_seconds)
    log.info("direct upload started", extra={"upload_id": str(upload_id)})
    return upload


@dataclass(frozen=True, slots=True)
class JobStatus:
    """What ``GET /records/uploads/<id>`` shows of an upload and its conversion job."""

    id: uuid.UUID
    user_id: uuid.UUID
    status: str
    progress: float
    record: NewRecord | None = None
    error: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def pending(self) -> bool:
        """Queued or converting: the client should come back (Retry-After)."""
        return self.status in ("queued", "converting")


@dataclass(frozen=True, slots=True)
class Completion:
    """The answer to a completion call: ``won`` for the one call that queued the job."""

    won: bool
    job: JobStatus


FINISHED = ("done", "failed")


def complete_upload(
    db: Database,
    storage: Storage,
    queue: JobQueue,
    settings: Settings,
    *,
    user_id: uuid.UUID,
    raw_upload_id: str,
    within: AnswerHook[Completion] | None = None,
) -> Completion:
    """Queue the conversion of upload ``raw_upload_id``, unless an earlier call did.

    ``within`` stores the winner's answer (an Idempotency-Key's) in the transaction that
    queues the job.
    """
    upload_id = parse_upload_id(raw_upload_id)
    row = _find(db, user_id, upload_id)
    if row is None:
        raise _not_found(db, user_id)
    if row.status != "uploading":
        return Completion(won=False, job=_status_of(db, settings, row))
    try:
        size = storage.size(row.object_key)
    except ObjectMissing as exc:
        raise UploadNotReceived(
            "The upload's file has not arrived in the bucket: send it with the presigned POST "
            "first (before it expires), then complete the upload again."
        ) from exc
    if size > settings.max_direct_upload_bytes:
        too_large = PayloadTooLarge(
            f"The upload is larger than the limit of {settings.max_direct_upload_bytes} bytes."
        )
        error = json.dumps(too_large.to_problem())
        if db.execute(_QUEUE_CLAIM_FAILED, {"id": upload_id, "user_id": user_id, "error": error}):
            storage.discard(row.object_key)
            raise too_large
    else:
        params = {"id": upload_id, "user_id": user_id, "record_id": uuid.uuid4(),
                  "queue": queue.kind.value}  # fmt: skip
        queued = Completion(won=True, job=JobStatus(upload_id, user_id, "queued", 0.0))
        if within is not None:
            # The job is sent before COMMIT: a lost COMMIT reply leaves it queued, answered
            # and sent. A delivery meanwhile waits for the row's lock; after a rollback it
            # finds the upload not queued and does nothing.
            with db.transaction() as conn:
                if conn.execute(_QUEUE, params):
                    within(conn, queued)
                    queue.enqueue(upload_id)
                    won = True
                else:
                    won = False
            if won:
                _log_queued(upload_id, queue)
                return queued
        elif db.execute(_QUEUE, params):  # run again after a lost reply: still the winner
            try:
                queue.enqueue(upload_id)
            except BaseException:
                db.execute(_UNQUEUE, {"id": upload_id})  # the client's retry may win again
                raise
            _log_queued(upload_id, queue)
            return queued
    # Another call won the race between our read and our update.
    raced = _find(db, user_id, upload_id)
    if raced is None:
        raise _not_found(db, user_id)
    return Completion(won=False, job=_status_of(db, settings, raced))


def _log_queued(upload_id: uuid.UUID, queue: JobQueue) -> None:
    log.info(
        "conversion job queued", extra={"upload_id": str(upload_id), "queue": queue.kind.value}
    )


def upload_status(
    db: Database, settings: Settings, *, user_id: uuid.UUID, raw_upload_id: str
) -> JobStatus:
    row = _find(db, user_id, parse_upload_id(raw_upload_id))
    if row is None:
        raise _not_found(db, user_id)
    return _status_of(db, settings, row)


def wait_for_job(db: Database, settings: Settings, job: JobStatus, seconds: float) -> JobStatus:
    """``job`` again once it is finished, or after ``seconds`` (``Prefer: wait``)."""
    deadline = time.monotonic() + seconds
    while not job.finished and time.monotonic() < deadline:
        time.sleep(min(WAIT_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        row = _find(db, job.user_id, job.id)
        if row is None:
            break
        job = _status_of(db, settings, row)
    return job


def parse_upload_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError as exc:
        raise InvalidField("The upload id in the path must be a UUID.") from exc


def _find(db: Database, user_id: uuid.UUID, upload_id: uuid.UUID) -> UploadRow | None:
    rows = db.execute(_SELECT_UPLOAD, {"id": upload_id, "user_id": user_id})
    return rows[0] if rows else None


def _status_of(db: Database, settings: Settings, row: UploadRow) -> JobStatus:
    status, error = row.status, row.error
    if status == "converting" and row.lease_expired and row.attempts >= settings.job_max_attempts:
        # Its last attempt died and no queue will deliver it again (SQS: maxReceiveCount).
        error = abandoned(settings.job_max_attempts).to_problem()
        db.execute(_ABANDON, {"id": row.id, "error": json.dumps(error)})
        status = "failed"
    record = None
    if status == "done" and row.record_id is not None:
        found = get_record(db, row.record_id)
        record = new_record(found) if found is not None else None
    return JobStatus(
        id=row.id,
        user_id=row.user_id,
        status=status,
        progress=1.0 if status == "done" else float(row.progress),
        record=record,
        error=error if status == "failed" else None,
    )


def _clean_filename(raw: str | None) -> str | None:
    if not raw:
        return None
    name = "".join(ch for ch in raw if ch.isprintable()).strip()
    return name[:FILENAME_MAX_LENGTH] or None


def _not_found(db: Database, user_id: uuid.UUID) -> Unauthorized | NotFound:
    """The 404 of an upload not found, or the 401 of a user erased since it authenticated."""
    gone = user_gone(db, user_id)
    return gone or NotFound("No pending upload with this id exists for this user.")


def discard_spent_wavs(db: Database, storage: Storage, *, cutoff: datetime) -> list[str]:
    """Delete the WAVs under ``uploads/`` written before ``cutoff`` that no upload needs.

    A presigned form stays usable until it expires, also after its job is queued or done: a
    WAV sent with it again, or one whose upload is done or failed, or has no row, goes here.
    """
    keys = [obj.key for obj in storage.list_objects(PENDING_PREFIX) if obj.last_modified < cutoff]
    spent: list[str] = []
    for start in range(0, len(keys), 500):
        batch = keys[start : start + 500]
        needed = {row.object_key for row in db.execute(_KEYS_STILL_NEEDED, {"keys": batch})}
        spent += [key for key in batch if key not in needed]
    if spent:
        storage.delete_many(spent)
        log.info("deleted spent upload WAVs", extra={"count": len(spent)})
    return spent
