"""The database engine (pg8000 driver) and the translation of outages into 503s."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from common.errors import DependencyUnavailable
from common.settings import Settings

log = logging.getLogger(__name__)


def make_engine(settings: Settings) -> Engine:
    return create_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_timeout=settings.db_connect_timeout_seconds,
        pool_pre_ping=True,  # a connection killed by a restart is detected, not used
        pool_recycle=1800,
        connect_args={"timeout": settings.db_connect_timeout_seconds},
    )


class Database:
    def __init__(self, engine: Engine, *, retry_after: int = 5) -> None:
        self.engine = engine
        self.retry_after = retry_after
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        return cls(make_engine(settings), retry_after=settings.retry_after_seconds)

    @contextmanager
    def translate_errors(self) -> Iterator[None]:
        try:
            yield
        except (OperationalError, InterfaceError, PoolTimeout) as exc:
            log.error("database unavailable: %s", exc)
            raise DependencyUnavailable("database", self.retry_after) from exc
        except DBAPIError as exc:
            if exc.connection_invalidated:
                log.error("database connection lost: %s", exc)
                raise DependencyUnavailable("database", self.retry_after) from exc
            raise

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction, committed on success; outages become 503."""
        with self.translate_errors(), self._sessions() as session, session.begin():
            yield session

    def check(self) -> None:
        with self.translate_errors(), self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
