"""The PostgreSQL queue's worker: ``python -m common.platform.worker`` (make dev, compose).

It runs in the upload_record image: it claims the oldest runnable job (``FOR UPDATE SKIP
LOCKED``, so workers can run side by side), runs it (:mod:`common.domain.jobs`) and, with
nothing to do, polls every :data:`POLL_SECONDS`. A stop signal gives the job in hand back to the
queue; a worker killed outright leaves it to be taken again once its lease runs out. ``--check``
is the container's health check, on the file the polling loop touches. docs/direct-uploads.md,
"Jobs", and docs/configuration.md (``WORKER_ALIVE_FILE``) have the detail.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from common.domain.jobs import ClaimedJob, claim_next, release, run_claimed
from common.errors import ServiceError
from common.platform.memory import tune_malloc
from common.platform.runtime import Services, get_services
from common.settings import JobQueueKind, get_settings

log = logging.getLogger("common.worker")

POLL_SECONDS = 0.5


class Stopping(BaseException):
    """SIGTERM/SIGINT: leave the current job and exit (BaseException: nothing swallows it)."""


def run_once(services: Services) -> bool:
    """Claim and run one job; False when the queue had none."""
    job = claim_next(services.db, services.settings)
    if job is None:
        return False
    try:
        alive_file = Path(services.settings.worker_alive_file)
        outcome = run_claimed(
            services.db, services.storage, services.settings, job,
            on_beat=lambda: touch_alive_file(alive_file),
        )  # fmt: skip
        log.info("job finished", extra={"upload_id": str(job.id), "outcome": outcome.value})
    except Stopping:
        _give_back(services, job)
        raise
    except ServiceError as exc:  # an outage: the lease runs out and the job is taken again
        log.warning("job interrupted: %s", exc.detail, extra={"upload_id": str(job.id)})
    except Exception:
        log.exception("job crashed", extra={"upload_id": str(job.id)})
    return True


def _give_back(services: Services, job: ClaimedJob) -> None:
    try:
        release(services.db, job)
        log.info("job given back to the queue", extra={"upload_id": str(job.id)})
    except Exception as exc:  # the lease expires instead
        log.warning("could not give the job back: %s", exc)


def touch_alive_file(alive_file: Path) -> None:
    try:
        alive_file.touch()
    except OSError as exc:
        log.warning("cannot touch %s: %s", alive_file, exc)


def serve(services: Services, *, once: bool = False) -> None:
    alive_file = Path(services.settings.worker_alive_file)
    while True:
        touch_alive_file(alive_file)  # this loop is polling: it is alive
        try:
            worked = run_once(services)
        except ServiceError as exc:  # the database is down: keep trying
            log.warning("cannot poll the job queue: %s", exc.detail)
            worked = False
        except Exception:  # a bug must not end the worker: log it and poll again
            log.exception("polling the job queue failed")
            worked = False
        if once:
            return
        if not worked:
            time.sleep(POLL_SECONDS)


def _stop(signum: int, _frame: FrameType | None) -> None:
    # Once is enough: a second signal must not cut short the giving back of the job in hand.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Stopping(signal.Signals(signum).name)


def check_alive(alive_file: Path, max_age: float) -> int:
    """0 if the loop touched ``alive_file`` within ``max_age`` seconds (its lease), else 1."""
    try:
        age = time.time() - alive_file.stat().st_mtime
    except OSError:
        return 1
    return 0 if age < max_age else 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--check"]:
        settings = get_settings()
        return check_alive(Path(settings.worker_alive_file), settings.job_lease_seconds)
    tune_malloc()
    services = get_services()
    if services.settings.job_queue is not JobQueueKind.POSTGRES:
        log.warning("JOB_QUEUE is %s: this worker only serves the postgres queue",
                    services.settings.job_queue.value)  # fmt: skip
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("worker started", extra={"pid": os.getpid()})
    try:
        serve(services)
    except Stopping as exc:
        log.info("worker stopping (%s)", exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
