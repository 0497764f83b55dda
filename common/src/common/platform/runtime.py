"""The clients a function needs, created lazily once per process and shared by its threads."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from common.adapters.db import Database
from common.platform.logs import configure_logging
from common.settings import Settings, get_settings

if TYPE_CHECKING:
    from common.adapters.queue import JobQueue
    from common.adapters.storage import Storage


class Services:
    """The settings and the database, and the store and the job queue made on first use.

    A function whose request never touches the bucket (most of create_user's) never imports
    botocore; the first request that does pays for it once per process.
    """

    __slots__ = ("_lock", "_queue", "_storage", "db", "settings")

    def __init__(
        self,
        settings: Settings,
        db: Database,
        storage: Storage | None = None,
        queue: JobQueue | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self._storage = storage
        self._queue = queue  # where completed direct uploads' conversion jobs go (JOB_QUEUE)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        return cls(settings, Database.from_settings(settings))

    def replace(
        self,
        *,
        settings: Settings | None = None,
        db: Database | None = None,
        storage: Storage | None = None,
        queue: JobQueue | None = None,
    ) -> Services:
        """A copy with some clients swapped (tests); the others are shared with this one."""
        return Services(
            settings or self.settings, db or self.db, storage or self.storage, queue or self.queue
        )

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            with self._lock:
                if self._storage is None:
                    self._storage = make_storage(self.settings)
        return self._storage

    @property
    def queue(self) -> JobQueue:
        if self._queue is None:
            with self._lock:
                if self._queue is None:
                    from common.adapters.queue import make_queue

                    self._queue = make_queue(self.settings)
        return self._queue


def make_storage(settings: Settings) -> Storage:
    """The object store alone (the bucket setup needs no database)."""
    from common.adapters.storage import Storage

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
