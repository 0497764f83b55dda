"""PostgreSQL through one SQLAlchemy engine (pg8000 DB-API driver), and outages as 503s.

Every connection a process opens comes from the engine's one pool, capped at
``DB_POOL_SIZE`` + ``DB_POOL_OVERFLOW``. The engine runs in autocommit mode, so the
single-statement requests (create a user, check a token, find a record) cost one statement
and no BEGIN/COMMIT; :meth:`Database.transaction` and :meth:`Database.session` open a real
transaction for work that spans statements. Statements are SQLAlchemy Core constructs
(``text()`` with ``:name`` parameters, or ``select``/``insert``) built once at import, so
each is compiled once and then found in the engine's compiled cache.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, Executable, Row, TextClause, create_engine, event, text
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from common.adapters.secrets import Credentials, SecretCredentials
from common.errors import DependencyUnavailable
from common.settings import Settings

log = logging.getLogger(__name__)

# A pooled connection idle longer than this is pinged before use: a connection in steady use
# needs no round trip for it, and one that breaks anyway is retried by Database.execute.
PING_AFTER_IDLE_SECONDS = 5.0
_LAST_USED = "last_used"
# The isolation level of multi-statement work (the engine itself autocommits).
TRANSACTION_ISOLATION = "READ COMMITTED"
# PostgreSQL's SQLSTATE for a refused password (invalid_password).
AUTH_FAILED = "28P01"


def make_engine(settings: Settings, credentials: SecretCredentials | None = None) -> Engine:
    """The process's one engine; with ``credentials``, every new connection takes its login
    from them (``DATABASE_SECRET_ARN``) instead of from ``DATABASE_URL``."""
    engine = create_engine(
        settings.database_url,
        isolation_level="AUTOCOMMIT",
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_overflow,
        pool_timeout=settings.db_connect_timeout_seconds,
        pool_recycle=1800,
        connect_args={
            "timeout": settings.db_connect_timeout_seconds,
            **tls_connect_args(settings.db_tls),
        },
    )
    _ping_idle_connections(engine)
    if credentials is not None:
        use_credentials(engine, credentials)
    return engine


def tls_connect_args(mode: str) -> dict[str, Any]:
    """pg8000's ssl_context for DB_TLS (RDS for PostgreSQL 15+ refuses plain connections)."""
    if mode == "off":
        return {}
    context = ssl.create_default_context()
    if mode == "require":  # encrypted; the server's certificate is not checked
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return {"ssl_context": context}


def credentials_from_settings(settings: Settings) -> SecretCredentials | None:
    """The secret named by DATABASE_SECRET_ARN, read now (at start); None without one."""
    if not settings.database_secret_arn:
        return None
    return SecretCredentials(settings.database_secret_arn)


def use_credentials(engine: Engine, credentials: SecretCredentials) -> None:
    """Connect with the secret's current login; after a refused password, re-read it once.

    SQLAlchemy's documented ``do_connect`` event: the listener makes the DB-API connection
    itself. Connections already in the pool keep working across a rotation (PostgreSQL
    checks the password only at login); a new one that the server refuses with 28P01 makes
    the secret be read again and the connection tried once more with what it holds now.
    """

    @event.listens_for(engine, "do_connect")
    def connect(dialect: Any, _record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        used = credentials.current()
        try:
            return dialect.dbapi.connect(*cargs, **{**cparams, **used.connect_params()})
        except dialect.dbapi.DatabaseError as exc:
            if not _auth_failed(exc):
                raise
            fresh: Credentials = credentials.refresh(used)
            log.warning("database login refused; connecting with the secret read again")
        try:
            return dialect.dbapi.connect(*cargs, **{**cparams, **fresh.connect_params()})
        except dialect.dbapi.DatabaseError as exc:
            if not _auth_failed(exc):
                raise
            # Refused with the secret's newest login too: the database is unusable (503).
            raise dialect.dbapi.OperationalError(*exc.args) from exc


def _auth_failed(exc: BaseException) -> bool:
    """pg8000 carries the server's error fields (C = SQLSTATE) in its first argument."""
    fields = exc.args[0] if exc.args else None
    return isinstance(fields, dict) and fields.get("C") == AUTH_FAILED


def _ping_idle_connections(engine: Engine) -> None:
    """pool_pre_ping, but only for connections idle longer than PING_AFTER_IDLE_SECONDS."""

    @event.listens_for(engine, "checkin")
    def on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info[_LAST_USED] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        last_used = record.info.get(_LAST_USED)
        if last_used is not None and time.monotonic() - last_used < PING_AFTER_IDLE_SECONDS:
            return
        try:
            cursor = dbapi_connection.cursor()
            cursor.execute("SELECT 1")
            cursor.fetchall()
        except Exception as exc:
            raise DisconnectionError(str(exc)) from exc  # the pool connects afresh


def sql(statement: str) -> TextClause:
    """A statement with ``:name`` parameters, built once at import (cached when compiled)."""
    return text(statement)


class Database:
    def __init__(self, engine: Engine, *, retry_after: int = 5) -> None:
        self.engine = engine
        self.retry_after = retry_after
        self._transactional = engine.execution_options(isolation_level=TRANSACTION_ISOLATION)
        self._sessions = sessionmaker(self._transactional, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        engine = make_engine(settings, credentials_from_settings(settings))
        return cls(engine, retry_after=settings.retry_after_seconds)

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

    def execute(
        self, statement: Executable, params: Mapping[str, Any] | None = None
    ) -> Sequence[Row[Any]]:
        """Run one autocommitted statement; its rows (empty for a statement without any).

        A connection found broken is discarded and the statement retried once on a fresh
        one, so write statements must be idempotent (an insert with a client-generated key
        and ON CONFLICT DO NOTHING, an update to a fixed value).
        """
        for attempt in (1, 2):
            try:
                with self.translate_errors(), self.engine.connect() as conn:
                    result = conn.execute(statement, dict(params or {}))
                    return result.all() if result.returns_rows else []
            except DependencyUnavailable as exc:
                if attempt == 2 or not _connection_lost(exc):
                    raise
        raise AssertionError("unreachable")

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A Core connection in a transaction, committed on success; outages become 503."""
        with self.translate_errors(), self._transactional.begin() as conn:
            yield conn

    @contextmanager
    def session(self) -> Iterator[Session]:
        """An ORM session in a transaction, committed on success; outages become 503."""
        with self.translate_errors(), self._sessions() as session, session.begin():
            yield session

    def check(self) -> None:
        """SELECT 1 (the health check); a connection found broken is retried once."""
        self.execute(_SELECT_ONE)


_SELECT_ONE = sql("SELECT 1")


def _connection_lost(exc: DependencyUnavailable) -> bool:
    cause = exc.__cause__
    return isinstance(cause, DBAPIError) and cause.connection_invalidated


def is_foreign_key_violation(exc: BaseException) -> bool:
    """SQLSTATE 23503: a row refers to one that is gone (its user was erased meanwhile).

    pg8000 reports it as a ProgrammingError, not an IntegrityError: read the code itself.
    """
    if not isinstance(exc, DBAPIError):
        return False
    fields = exc.orig.args[0] if exc.orig is not None and exc.orig.args else None
    return isinstance(fields, dict) and fields.get("C") == "23503"
