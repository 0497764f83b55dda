"""A conversion job stopped because its instance is going away (SIGTERM): it is given back
to its queue at once, so the queue's next delivery (another instance) takes it."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from common.adapters.db import sql
from common.domain import conversion, jobs
from common.domain.uploads import pending_key
from common.domain.users import create_user
from common.errors import ServerStopping
from common.platform.runtime import Services

from devstack import wavgen

pytestmark = pytest.mark.integration

_QUEUED = sql(
    "INSERT INTO uploads (id, user_id, object_key, status, queue, queued_at, record_id) "
    "VALUES (:id, :user_id, :key, 'queued', :queue, now(), :record_id)"
)
_STATE = sql("SELECT status, attempts, lease_token FROM uploads WHERE id = :id")


def _stop_once_converting(deadline: float) -> None:
    while time.monotonic() < deadline:
        if conversion.stop_conversions(ServerStopping()):
            return
        time.sleep(0.02)


def test_a_job_stopped_by_a_shutdown_goes_back_to_its_queue(services: Services) -> None:
    db, storage = services.db, services.storage
    user = create_user(db, "Stopped").id
    upload_id = uuid.uuid4()
    key = pending_key(user, upload_id)
    storage.client.put_object(Bucket=storage.bucket, Key=key, Body=wavgen.wav(seconds=60.0))
    # A queue of this test's own: no worker of the stack polls it.
    queue = f"t{uuid.uuid4().hex[:12]}"
    row = {"id": upload_id, "user_id": user, "key": key, "queue": queue}
    db.execute(_QUEUED, {**row, "record_id": uuid.uuid4()})
    stopper = threading.Thread(target=_stop_once_converting, args=(time.monotonic() + 30,))
    stopper.start()
    try:
        with pytest.raises(ServerStopping):
            jobs.run_job(db, storage, services.settings, upload_id)
    finally:
        stopper.join(30)
    (state,) = db.execute(_STATE, {"id": upload_id})
    assert (state.status, state.attempts, state.lease_token) == ("queued", 0, None)
    assert list(storage.multipart_uploads(f"users/{user}/")) == []  # no half-made MP3
    # The next delivery takes it as a first attempt and finishes it.
    assert jobs.run_job(db, storage, services.settings, upload_id) is jobs.Outcome.DONE
