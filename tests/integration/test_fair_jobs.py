"""Fair jobs on the real database: the queue goes round-robin across users, and a user's
pending direct uploads are capped (MAX_PENDING_UPLOADS_PER_USER, then 429 + Retry-After)."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest
from common.adapters.db import sql
from common.domain import jobs
from common.domain.uploads import start_upload
from common.domain.users import create_user
from common.errors import TooManyPendingUploads
from common.platform.runtime import Services
from common.settings import Settings

pytestmark = pytest.mark.integration

_QUEUED = sql(
    "INSERT INTO uploads (id, user_id, object_key, status, queue, queued_at) "
    "VALUES (:id, :user_id, :key, 'queued', :queue, now() + make_interval(secs => :at))"
)
_DONE = sql("UPDATE uploads SET status = 'done' WHERE id = :id")


def test_one_users_backlog_does_not_delay_another_users_job(
    services: Services, stack_settings: Settings
) -> None:
    db = services.db
    queue = f"t{uuid.uuid4().hex[:12]}"  # a queue of this test's own: no worker polls it
    busy, other = create_user(db, "Busy").id, create_user(db, "Other").id
    for n in range(5):
        db.execute(_QUEUED, {"id": uuid.uuid4(), "user_id": busy, "key": f"k{n}", "queue": queue,
                             "at": n})  # fmt: skip
    db.execute(_QUEUED, {"id": uuid.uuid4(), "user_id": other, "key": "o", "queue": queue,
                         "at": 10})  # fmt: skip
    order = []
    for _ in range(6):
        rows = db.execute(
            jobs._CLAIM_NEXT,
            {"queue": queue, "token": uuid.uuid4(), "lease": stack_settings.job_lease_seconds},
        )
        order.append(rows[0].user_id)
        db.execute(_DONE, {"id": rows[0].id})
    # The busy user's oldest job first (it was queued first), then the other user's, although
    # four more of the busy user's are older.
    assert order == [busy, other, busy, busy, busy, busy]


def test_a_users_pending_direct_uploads_are_capped(
    services: Services, stack_settings: Settings
) -> None:
    settings = replace(stack_settings, max_pending_uploads_per_user=3)
    user = create_user(services.db, "Many").id

    def start() -> uuid.UUID:
        upload = start_upload(
            services.db, services.storage, settings, user_id=user, filename="a.wav"
        )
        return upload.id

    first = [start() for _ in range(3)]
    with pytest.raises(TooManyPendingUploads) as info:
        start()
    assert info.value.status == 429
    assert info.value.retry_after == settings.job_lease_seconds
    services.db.execute(_DONE, {"id": first[0]})  # one finishes: room for one more
    start()
    with pytest.raises(TooManyPendingUploads):
        start()
