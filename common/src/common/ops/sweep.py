"""Cleanup of what a crash left behind: ``python -m common.ops.sweep`` (``make sweep``).

Removes record objects without a row and multipart uploads never finished, both older than
``SWEEP_GRACE_SECONDS`` (an upload in flight is never that old), and finishes what requests
leave to it: erasures not done within their request, expired idempotency keys, cloud-queue
jobs whose message was lost, and direct uploads never completed. Safe to run at any time and
repeatedly. docs/reliability.md (``make sweep``) has what each step covers.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from common.adapters.db import Database, sql
from common.domain.erasure import continue_erasures
from common.domain.idempotency import purge_expired
from common.domain.jobs import forget_abandoned_uploads, requeue_stalled
from common.domain.records import RECORD_PREFIX, ObjectKey
from common.domain.uploads import discard_spent_wavs
from common.platform.runtime import Services, get_services

log = logging.getLogger("common.ops.sweep")

RECORD_KEY = re.compile(r"^users/[0-9a-f-]{36}/records/[0-9a-f-]{36}\.mp3$")
_BATCH = 500
_KEYS_WITH_ROWS = sql(
    "SELECT object_key FROM records WHERE object_key = ANY(:keys)", ObjectKey, idempotent=True
)


@dataclass(frozen=True, slots=True)
class SweepResult:
    orphans_deleted: list[str]
    uploads_aborted: list[str]
    erasures_finished: list[str] = field(default_factory=list)
    idempotency_keys_purged: int = 0
    jobs_requeued: list[str] = field(default_factory=list)
    pending_uploads_forgotten: int = 0
    spent_wavs_deleted: list[str] = field(default_factory=list)


def _keys_with_rows(db: Database, keys: list[str]) -> set[str]:
    return {row.object_key for row in db.execute(_KEYS_WITH_ROWS, {"keys": keys})}


def sweep(services: Services, grace_seconds: int, *, now: datetime | None = None) -> SweepResult:
    """Remove orphan record objects and stale multipart uploads older than the grace period."""
    cutoff = (now or datetime.now(UTC)) - timedelta(seconds=grace_seconds)
    storage = services.storage
    deleted: list[str] = []
    aborted: list[str] = []
    # Erasures first: their objects are not orphans to wait a grace period for.
    erased = continue_erasures(services.db, storage, services.settings, now=now)
    purged = purge_expired(services.db)
    requeued = requeue_stalled(services.db, services.queue, services.settings, cutoff=cutoff)
    # A presigned form is usable for PRESIGN_EXPIRES_SECONDS; a day more covers a slow send.
    forgotten = forget_abandoned_uploads(
        services.db,
        storage,
        cutoff=cutoff - timedelta(seconds=services.settings.presign_expires_seconds + 86400),
    )
    spent = discard_spent_wavs(services.db, storage, cutoff=cutoff)
    candidates = [
        obj.key
        for obj in storage.list_objects(RECORD_PREFIX)
        if RECORD_KEY.match(obj.key) and obj.last_modified < cutoff
    ]
    for start in range(0, len(candidates), _BATCH):
        batch = candidates[start : start + _BATCH]
        referenced = _keys_with_rows(services.db, batch)
        orphans = [key for key in batch if key not in referenced]
        if orphans:
            storage.delete_many(orphans)
        for key in orphans:
            deleted.append(key)
            log.info("deleted orphan object", extra={"key": key})
    for upload in storage.multipart_uploads():
        if upload.initiated < cutoff:
            storage.abort_multipart(upload)
            aborted.append(upload.key)
            log.info("aborted stale multipart upload", extra={"key": upload.key})
    return SweepResult(
        orphans_deleted=deleted,
        uploads_aborted=aborted,
        erasures_finished=[str(user_id) for user_id in erased],
        idempotency_keys_purged=purged,
        jobs_requeued=[str(upload_id) for upload_id in requeued],
        pending_uploads_forgotten=forgotten,
        spent_wavs_deleted=spent,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--grace-seconds",
        type=int,
        default=None,
        help="only touch what is older than this (default: SWEEP_GRACE_SECONDS, 3600)",
    )
    args = parser.parse_args(argv)
    if args.grace_seconds is not None and args.grace_seconds < 0:
        parser.error("--grace-seconds must not be negative")
    services = get_services()
    grace = (
        services.settings.sweep_grace_seconds if args.grace_seconds is None else args.grace_seconds
    )
    result = sweep(services, grace)
    log.info(
        "sweep done",
        extra={
            "orphans_deleted": len(result.orphans_deleted),
            "uploads_aborted": len(result.uploads_aborted),
            "erasures_finished": len(result.erasures_finished),
            "idempotency_keys_purged": result.idempotency_keys_purged,
            "jobs_requeued": len(result.jobs_requeued),
            "pending_uploads_forgotten": result.pending_uploads_forgotten,
            "spent_wavs_deleted": len(result.spent_wavs_deleted),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
