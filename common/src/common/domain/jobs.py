"""The conversion job of a completed direct upload: claim, convert from the bucket, finish.

The ``uploads`` row is the job; a queue (:mod:`common.adapters.queue`) only says which row to
run, so a message delivered twice is harmless. A delivery claims the row with a lease (one
conditional UPDATE), converts the WAV under the record id fixed at completion while a
heartbeat renews the lease, and then writes the record and ``done`` in one transaction.
Undecodable WAVs end ``failed``; outages are left to the queue's retry. docs/direct-uploads.md,
"Jobs", has the steps and their guarantees.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple

from common.adapters.db import Database, is_foreign_key_violation, sql
from common.adapters.queue import JobQueue
from common.adapters.storage import ObjectMissing, Storage
from common.domain.encoding import EncodingOptions
from common.domain.new_records import INSERT_RECORD, store_mp3
from common.domain.records import ObjectKey, object_key
from common.errors import RequestTimeout, ServerStopping, ServiceError, UnprocessableContent
from common.settings import JobQueueKind, Settings

log = logging.getLogger(__name__)

# Progress is written at most this often (and the lease renewed with it).
HEARTBEAT_SECONDS = 0.5


class Outcome(StrEnum):
    DONE = "done"  # converted now: the record exists
    FAILED = "failed"  # ended as failed now (undecodable, or out of attempts)
    SKIPPED = "skipped"  # nothing to do: finished earlier, never completed, or gone
    BUSY = "busy"  # another worker holds the lease: deliver again later


class LeaseLost(Exception):
    """Another worker took the job over (this one's lease had expired)."""


class JobAbandoned(UnprocessableContent):
    """The job was started too many times without finishing: it is not tried again."""

    slug = "conversion-abandoned"
    title = "Conversion Abandoned"


class ConversionTimedOut(UnprocessableContent):
    """The job ran past JOB_TIMEOUT_SECONDS: it ends failed, not sent to another worker
    (a WAV that long would run out of time again)."""

    slug = "conversion-timed-out"
    title = "Conversion Timed Out"


class UploadGone(UnprocessableContent):
    slug = "upload-gone"
    title = "Upload Gone"


class ClaimedJob(NamedTuple):
    """A job's upload row, as a claim returns it."""

    id: uuid.UUID
    user_id: uuid.UUID
    object_key: str
    filename: str | None
    options: dict[str, Any]
    record_id: uuid.UUID
    attempts: int
    lease_token: uuid.UUID


# Take a job: queued, or converting with an expired lease (its worker died). A second run
# with the same token (its first reply was lost) takes the same job again, as one attempt.
# Otherwise round-robin across users: first the users with the fewest jobs converting now,
# then the one whose last job started longest ago (never: first), then that user's oldest
# job. One user's backlog delays another user's job by at most the job being converted.
_CLAIM_NEXT = sql(
    "UPDATE uploads SET status = 'converting', lease_token = :token, "
    "attempts = attempts + CASE WHEN lease_token = :token THEN 0 ELSE 1 END, "
    "lease_until = now() + make_interval(secs => :lease), started_at = now(), progress = 0 "
    "WHERE id = ("
    " SELECT u.id FROM uploads u WHERE u.queue = :queue"
    " AND (u.status = 'queued' OR (u.status = 'converting'"
    " AND (u.lease_until < now() OR u.lease_token = :token)))"
    " ORDER BY u.lease_token = :token IS TRUE DESC,"
    "  (SELECT count(*) FROM uploads c WHERE c.user_id = u.user_id"
    "   AND c.status = 'converting' AND c.lease_until >= now()),"
    "  (SELECT max(s.started_at) FROM uploads s WHERE s.user_id = u.user_id) NULLS FIRST,"
    "  u.queued_at"
    " LIMIT 1 FOR UPDATE OF u SKIP LOCKED"
    ") RETURNING id, user_id, object_key, filename, options, record_id, attempts, lease_token",
    ClaimedJob,
    idempotent=True,
)
_CLAIM_ONE = sql(
    "UPDATE uploads SET status = 'converting', lease_token = :token, "
    "attempts = attempts + CASE WHEN lease_token = :token THEN 0 ELSE 1 END, "
    "lease_until = now() + make_interval(secs => :lease), started_at = now(), progress = 0 "
    "WHERE id = :id AND (status = 'queued' OR (status = 'converting' "
    "AND (lease_until < now() OR lease_token = :token))) "
    "RETURNING id, user_id, object_key, filename, options, record_id, attempts, lease_token",
    ClaimedJob,
    idempotent=True,
)


class JobState(NamedTuple):
    status: str


class UploadId(NamedTuple):
    id: uuid.UUID


_STATUS = sql("SELECT status FROM uploads WHERE id = :id", JobState, idempotent=True)
# Jobs of a cloud queue still queued long after completion: their message was lost (the
# process died between the UPDATE and the send) or dropped; sending one again is harmless.
_STALLED = sql(
    "SELECT id FROM uploads WHERE status = 'queued' AND queue = :queue AND queued_at < :cutoff",
    UploadId,
    idempotent=True,
)
# Direct uploads never completed, whose presigned form expired long ago.
_ABANDONED_UPLOADS = sql(
    "DELETE FROM uploads WHERE status = 'uploading' AND created_at < :cutoff RETURNING object_key",
    ObjectKey,
)
_HEARTBEAT = sql(
    "UPDATE uploads SET progress = :progress, "
    "lease_until = now() + make_interval(secs => :lease) "
    "WHERE id = :id AND lease_token = :token AND status = 'converting' RETURNING id",
    UploadId,
    idempotent=True,
)
_DONE = sql(
    "UPDATE uploads SET status = 'done', progress = 1, error = NULL, lease_until = NULL, "
    "finished_at = now() WHERE id = :id"
)
_FAILED = sql(
    "UPDATE uploads SET status = 'failed', error = CAST(:error AS JSONB), lease_until = NULL, "
    "finished_at = now() WHERE id = :id AND status <> 'done'",
    idempotent=True,
)
_RELEASE = sql(
    "UPDATE uploads SET status = 'queued', lease_token = NULL, lease_until = NULL, "
    "attempts = GREATEST(attempts - 1, 0) WHERE id = :id AND lease_token = :token "
    "AND status = 'converting'",
    idempotent=True,  # a second run finds the job queued already: nothing to do
)


def claim_next(db: Database, settings: Settings) -> ClaimedJob | None:
    """The oldest runnable job of the PostgreSQL queue, claimed; None when there is none."""
    rows = db.execute(
        _CLAIM_NEXT,
        {"queue": JobQueueKind.POSTGRES.value, "token": uuid.uuid4(),
         "lease": settings.job_lease_seconds},
    )  # fmt: skip
    return rows[0] if rows else None


def run_job(db: Database, storage: Storage, settings: Settings, upload_id: uuid.UUID) -> Outcome:
    """Run the job of ``upload_id`` (a queue's message) unless it is finished or running."""
    rows = db.execute(
        _CLAIM_ONE, {"id": upload_id, "token": uuid.uuid4(), "lease": settings.job_lease_seconds}
    )
    if not rows:
        status = db.execute(_STATUS, {"id": upload_id})
        if status and status[0].status in ("queued", "converting"):
            return Outcome.BUSY
        log.info("job delivered again, nothing to do", extra={"upload_id": str(upload_id)})
        return Outcome.SKIPPED
    return run_claimed(db, storage, settings, rows[0])


def release(db: Database, job: ClaimedJob) -> None:
    """Give a claimed job back at once (a worker asked to stop): not counted as an attempt."""
    db.execute(_RELEASE, {"id": job.id, "token": job.lease_token})


def mark_failed(db: Database, upload_id: uuid.UUID, error: ServiceError) -> None:
    db.execute(_FAILED, {"id": upload_id, "error": json.dumps(error.to_problem())})


def run_claimed(
    db: Database,
    storage: Storage,
    settings: Settings,
    job: ClaimedJob,
    *,
    on_beat: Callable[[], None] | None = None,
) -> Outcome:
    """Run a claimed job; ``on_beat`` is called each time its lease is renewed (it progresses)."""
    extra = {"upload_id": str(job.id), "record_id": str(job.record_id), "attempt": job.attempts}
    if job.attempts > settings.job_max_attempts:
        log.error("conversion job abandoned", extra=extra)
        mark_failed(db, job.id, abandoned(settings.job_max_attempts))
        storage.discard(job.object_key)
        return Outcome.FAILED
    log.info("conversion job started", extra=extra)
    if job.attempts > 1:
        _abort_stale_parts(storage, job)
    try:
        stream = storage.open_read(job.object_key)
    except ObjectMissing:
        mark_failed(db, job.id, UploadGone("The uploaded WAV is no longer in the bucket."))
        return Outcome.FAILED
    heartbeat = _Heartbeat(db, settings, job, stream.length, on_beat)
    heartbeat.start()
    try:
        stored = store_mp3(
            storage,
            dataclasses.replace(settings, convert_timeout_seconds=settings.job_timeout_seconds),
            user_id=job.user_id,
            audio=heartbeat.counted(iter(stream)),
            filename=job.filename,
            options=EncodingOptions.from_json(job.options),
            record_id=job.record_id,
        )
    except LeaseLost:
        log.warning("conversion job taken over by another worker", extra=extra)
        return Outcome.SKIPPED
    except RequestTimeout:  # the conversion's deadline (a request's words, not a job's)
        log.warning("conversion job timed out", extra=extra)
        mark_failed(db, job.id, timed_out(settings.job_timeout_seconds))
        storage.discard(job.object_key)
        return Outcome.FAILED
    except ServerStopping:
        # The instance is going away (SIGTERM): give the job back now, so the queue's next
        # delivery (another instance) takes it at once instead of after the lease.
        _give_back(db, job, extra)
        raise
    except ServiceError as exc:
        if exc.status >= 500:
            raise  # an outage: the queue delivers the job again
        log.info("conversion job failed: %s", exc.detail, extra=extra)
        mark_failed(db, job.id, exc)
        storage.discard(job.object_key)
        return Outcome.FAILED
    finally:
        heartbeat.stop()
        stream.close()
    try:
        with db.transaction() as conn:  # the record and "done" land together, or neither does
            conn.execute(INSERT_RECORD, stored.row)
            conn.execute(_DONE, {"id": job.id})
    except Exception as exc:
        if not is_foreign_key_violation(exc):
            raise
        # The user was erased meanwhile: their rows, this job's included, are gone.
        log.info("conversion job of an erased user dropped", extra=extra)
        storage.discard(stored.key)
        storage.discard(job.object_key)
        return Outcome.SKIPPED
    storage.discard(job.object_key)
    log.info("conversion job done", extra={**extra, "mp3_bytes": stored.record.size_bytes})
    return Outcome.DONE


def _give_back(db: Database, job: ClaimedJob, extra: dict[str, Any]) -> None:
    try:
        release(db, job)
        log.info("conversion job given back to its queue", extra=extra)
    except Exception as exc:  # the lease runs out instead
        log.warning("could not give the job back: %s", exc, extra=extra)


def requeue_stalled(
    db: Database, queue: JobQueue, settings: Settings, *, cutoff: datetime
) -> list[uuid.UUID]:
    """Send again the jobs of this deployment's cloud queue that are queued since ``cutoff``."""
    if settings.job_queue is JobQueueKind.POSTGRES:
        return []  # the row is the message: nothing can be lost
    rows = db.execute(_STALLED, {"queue": settings.job_queue.value, "cutoff": cutoff})
    for (upload_id,) in rows:
        queue.enqueue(upload_id)
        log.warning("stalled conversion job queued again", extra={"upload_id": str(upload_id)})
    return [upload_id for (upload_id,) in rows]


def forget_abandoned_uploads(db: Database, storage: Storage, *, cutoff: datetime) -> int:
    """Remove direct uploads started before ``cutoff`` and never completed (rows and WAVs)."""
    rows = db.execute(_ABANDONED_UPLOADS, {"cutoff": cutoff})
    keys = [key for (key,) in rows]
    if keys:
        storage.delete_many(keys)
    return len(keys)


def abandoned(max_attempts: int) -> JobAbandoned:
    return JobAbandoned(
        f"The conversion was started {max_attempts} times without finishing (the worker "
        "stopped or ran out of time each time); it is not tried again."
    )


def timed_out(seconds: float) -> ConversionTimedOut:
    return ConversionTimedOut(
        f"The conversion did not finish within {seconds:g} seconds, the job's deadline; "
        "it is not tried again. Upload a shorter recording, or split it."
    )


class _Heartbeat(threading.Thread):
    """Writes the job's progress and renews its lease while the conversion runs."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        job: ClaimedJob,
        total: int,
        on_beat: Callable[[], None] | None = None,
    ) -> None:
        self.on_beat = on_beat
        super().__init__(name=f"job-heartbeat-{job.id}", daemon=True)
        self.db = db
        self.job = job
        self.lease = settings.job_lease_seconds
        self.renew_every = min(self.lease / 3, 10.0)
        self.total = max(total, 1)
        self.read = 0
        self.lost = False
        self._stopping = threading.Event()

    def counted(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            if self.lost:
                raise LeaseLost(str(self.job.id))
            self.read += len(chunk)
            yield chunk

    def run(self) -> None:
        written, last = -1.0, time.monotonic()
        while not self._stopping.wait(HEARTBEAT_SECONDS):
            progress = round(min(self.read / self.total, 0.99), 3)
            if progress == written and time.monotonic() - last < self.renew_every:
                continue
            try:
                rows = self.db.execute(
                    _HEARTBEAT,
                    {"id": self.job.id, "token": self.job.lease_token, "progress": progress,
                     "lease": self.lease},
                )  # fmt: skip
            except Exception as exc:  # the next beat tries again; the lease covers the gap
                log.warning("could not write the job's progress: %s", exc)
                continue
            if not rows:
                self.lost = True
                return
            written, last = progress, time.monotonic()
            if self.on_beat is not None:
                self.on_beat()

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()


def _abort_stale_parts(storage: Storage, job: ClaimedJob) -> None:
    """Abort the multipart uploads an earlier, killed attempt left under the record's key."""
    key = object_key(job.user_id, job.record_id)
    try:
        for upload in storage.multipart_uploads(prefix=key):
            if upload.key == key:
                storage.abort_multipart(upload)
                log.info("aborted an earlier attempt's multipart upload", extra={"key": key})
    except (ServiceError, ObjectMissing) as exc:  # the lifecycle rule and make sweep remain
        log.warning("could not list the earlier attempt's multipart uploads: %s", exc)
