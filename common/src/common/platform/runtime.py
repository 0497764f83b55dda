"""The clients a function needs, created lazily once per process and shared by its threads."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from common.adapters.db import Database
from common.adapters.queue import JobQueue, make_queue
from common.adapters.storage import Storage
from common.platform.logs import configure_logging
from common.settings import Settings, get_settings


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    db: Database
    storage: Storage
    queue: JobQueue  # where completed direct uploads' conversion jobs go (JOB_QUEUE)

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        return cls(
            settings,
            Database.from_settings(settings),
            make_storage(settings),
            make_queue(settings),
        )


def make_storage(settings: Settings) -> Storage:
    """The object store alone (the bucket setup needs no database)."""
    return Storage.from_settings(settings)


_lock = threading.Lock()
_services: Services | None = None


def get_services() -> Services:
    global _services
    if _services is None:
        with _lock:
            if _services is None:
                settings = get_settings()
                configure_logging(settings.log_level, project=settings.google_cloud_project)
                _services = Services.from_settings(settings)
    return _services


def set_services(services: Services | None) -> None:
    """Hand in other clients (tests); None returns to lazy creation from the environment."""
    global _services
    with _lock:
        _services = services
