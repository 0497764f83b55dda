"""Erasing a user: rows first (the token dies with them), then the objects, then the marker.

:func:`erase_user` (``DELETE /users/<id>``) deletes the user and inserts an erasure marker in
one transaction, then deletes the user's objects until ``ERASE_DEADLINE_SECONDS``;
:func:`continue_erasures` (``make sweep``) deletes what is left and then the marker. So a crash
before the commit changes nothing, and one after it leaves the marker for the sweep.
docs/lifecycle.md, "Erase a user", has the steps and the request limits.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from common.adapters.db import Database, sql
from common.adapters.storage import Storage
from common.domain.records import RECORD_PREFIX
from common.domain.uploads import PENDING_PREFIX
from common.domain.users import UserId
from common.errors import Unauthorized
from common.settings import Settings

log = logging.getLogger(__name__)

_MARK = sql("INSERT INTO erasures (user_id) VALUES (:id) ON CONFLICT (user_id) DO NOTHING")


class ErasureMarker(NamedTuple):
    user_id: uuid.UUID
    created_at: datetime


_DELETE_USER = sql("DELETE FROM users WHERE id = :id RETURNING id", UserId)
_MARKERS = sql(
    "SELECT user_id, created_at FROM erasures ORDER BY created_at", ErasureMarker, idempotent=True
)
_UNMARK = sql("DELETE FROM erasures WHERE user_id = :id", idempotent=True)


@dataclass(frozen=True, slots=True)
class Erased:
    user_id: uuid.UUID
    objects_deleted: int
    complete: bool  # False: the deadline came first, the sweep deletes the rest


def user_prefixes(user_id: uuid.UUID) -> tuple[str, str]:
    return f"{RECORD_PREFIX}{user_id}/", f"{PENDING_PREFIX}{user_id}/"


def erase_user(db: Database, storage: Storage, settings: Settings, user_id: uuid.UUID) -> Erased:
    """Erase an (authenticated) user: rows at once, objects until the deadline."""
    deadline = time.monotonic() + settings.erase_deadline_seconds
    with db.transaction() as conn:
        conn.execute(_MARK, {"id": user_id})
        if not conn.execute(_DELETE_USER, {"id": user_id}):
            # Erased concurrently: the other request won, and this token died with the user.
            raise Unauthorized("The user id and access token do not match.")
    deleted, complete = purge_objects(storage, user_id, deadline)
    log.info(
        "user erased",
        extra={"user_id": str(user_id), "objects_deleted": deleted, "complete": complete},
    )
    return Erased(user_id, deleted, complete)


def purge_objects(
    storage: Storage, user_id: uuid.UUID, deadline: float | None = None
) -> tuple[int, bool]:
    """Delete the user's objects, a listing page per DeleteObjects call; (count, all done)."""
    deleted = 0
    for prefix in user_prefixes(user_id):
        for keys in storage.list_keys(prefix):
            storage.delete_many(keys)
            deleted += len(keys)
            if deadline is not None and time.monotonic() > deadline:
                return deleted, False
    return deleted, True


def continue_erasures(
    db: Database, storage: Storage, settings: Settings, *, now: datetime | None = None
) -> list[uuid.UUID]:
    """The sweep's part: finish every erasure; the users whose marker could be removed."""
    settled_before = (now or datetime.now(UTC)) - timedelta(
        seconds=settings.presign_expires_seconds
    )
    finished: list[uuid.UUID] = []
    for marker in db.execute(_MARKERS):
        user_id, created_at = marker.user_id, marker.created_at
        deleted, _ = purge_objects(storage, user_id)
        if deleted:
            log.info("erasure continued", extra={"user_id": str(user_id), "deleted": deleted})
        if created_at < settled_before:
            db.execute(_UNMARK, {"id": user_id})
            finished.append(user_id)
    return finished
