"""The database engine (pg8000 driver) and the translation of outages into 503s."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pg8000.converters
import pg8000.exceptions
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from common.errors import DependencyUnavailable
from common.settings import Settings

log = logging.getLogger(__name__)

# A pooled connection idle for longer than this is pinged before use. Pinging on every
# checkout (pool_pre_ping) costs a round trip per request; a connection in steady use needs
# none, and one that breaks anyway is retried by Database.execute.
PING_AFTER_IDLE_SECONDS = 5.0
_LAST_USED = "last_used"
# pg8000's errors for a connection that is gone (server restart, network).
_CONNECTION_ERRORS = (pg8000.exceptions.InterfaceError, OSError)


def _is_disconnect(exc: BaseException) -> bool:
    """A network error, or the server ending the session (SQLSTATE 57P01 etc., class 08)."""
    if isinstance(exc, _CONNECTION_ERRORS):
        return True
    fields = exc.args[0] if exc.args else None
    code = str(fields.get("C", "")) if isinstance(fields, dict) else ""
    return code.startswith(("08", "57P"))


def make_engine(settings: Settings) -> Engine:
    engine = create_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_timeout=settings.db_connect_timeout_seconds,
        pool_recycle=1800,
        connect_args={"timeout": settings.db_connect_timeout_seconds},
    )
    _ping_idle_connections(engine)
    return engine


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
            dbapi_connection.rollback()
        except _CONNECTION_ERRORS as exc:
            raise DisconnectionError(str(exc)) from exc  # the pool connects afresh


# A named prepared statement: (name, result columns, their decoders), as pg8000 returns them.
_Prepared = tuple[bytes, Any, Any]


class _PreparedStatements:
    """The lean path's statements, prepared once per connection.

    pg8000's unnamed execution parses, describes and executes in three round trips; a named
    statement, once prepared, binds and executes in one, and PostgreSQL skips parsing and
    planning. Kept per driver connection (a reconnected one prepares afresh).
    """

    def __init__(self) -> None:
        self._by_connection: weakref.WeakKeyDictionary[Any, dict[str, _Prepared]]
        self._by_connection = weakref.WeakKeyDictionary()

    def run(self, dbapi: Any, statement: str, params: Sequence[Any]) -> Any:
        prepared = self._by_connection.setdefault(dbapi, {})
        entry = prepared.get(statement)
        if entry is None:
            entry = prepared[statement] = dbapi.prepare_statement(statement, ())
        name, columns, input_funcs = entry
        values = pg8000.converters.make_params(dbapi.py_types, params)
        return dbapi.execute_named(name, values, columns, input_funcs, statement)


class _LeanConnections:
    """The lean path's connections: a stack of its own, outside SQLAlchemy's pool.

    A checkout and checkin of SQLAlchemy's pool (events, reset on return, bookkeeping) cost
    about 50 us, a tenth of a small request's Python; this costs a lock and a list operation.
    Connections come from the engine (same URL, driver and connect arguments) and are detached
    from its pool. Up to ``keep`` idle ones are kept, the most recently used first; one older
    than ``recycle_seconds`` is closed instead of reused, as the pool's ``pool_recycle`` does.
    """

    def __init__(self, engine: Engine, keep: int, recycle_seconds: float = 1800.0) -> None:
        self._engine = engine
        self._keep = keep
        self._recycle = recycle_seconds
        self._idle: list[tuple[Any, float]] = []  # (detached connection, when it was opened)
        self._lock = threading.Lock()

    def acquire(self) -> tuple[Any, float]:
        now = time.monotonic()
        while True:
            with self._lock:
                if not self._idle:
                    break
                conn, born = self._idle.pop()
            if now - born < self._recycle:
                return conn, born
            _close_quietly(conn)
        conn = self._engine.raw_connection()
        conn.detach()
        return conn, now

    def release(self, conn: Any, born: float) -> None:
        with self._lock:
            if len(self._idle) < self._keep:
                self._idle.append((conn, born))
                return
        _close_quietly(conn)

    def discard_idle(self) -> None:
        """Close every idle connection (after one was found broken: the server restarted)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            _close_quietly(conn)


def _close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):  # a broken connection may fail to say goodbye
        conn.close()


class Database:
    def __init__(self, engine: Engine, *, retry_after: int = 5, keep_idle: int = 10) -> None:
        self.engine = engine
        self.retry_after = retry_after
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._prepared = _PreparedStatements()
        self._lean = _LeanConnections(engine, keep_idle)

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        return cls(
            make_engine(settings),
            retry_after=settings.retry_after_seconds,
            keep_idle=settings.db_pool_size,
        )

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

    def execute(self, statement: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        """Run one statement on its own (autocommitted, prepared: one round trip); its rows.

        Parameters are PostgreSQL's own ``$1``, ``$2`` ... placeholders.

        The lean path for the single-statement requests (create a user, look up a token or a
        record): no ORM, no BEGIN/COMMIT. A connection found broken is discarded and the
        statement retried once on a fresh one, so write statements must be idempotent (insert
        with a client-generated key and ON CONFLICT DO NOTHING).
        """
        for attempt in (1, 2):
            try:
                with self.translate_errors():
                    conn, born = self._lean.acquire()
            except _CONNECTION_ERRORS as exc:  # raw connects are not wrapped by SQLAlchemy
                log.error("database unavailable: %s", exc)
                raise DependencyUnavailable("database", self.retry_after) from exc
            dbapi: Any = conn.dbapi_connection  # (a detached connection has no driver_connection)
            try:
                # pg8000's own protocol calls: no DB-API cursor, no paramstyle rewriting, and
                # no BEGIN (outside a transaction block PostgreSQL commits the statement).
                context = self._prepared.run(dbapi, statement, params)
            except (*_CONNECTION_ERRORS, pg8000.exceptions.DatabaseError) as exc:
                if not _is_disconnect(exc):
                    self._lean.release(conn, born)  # a statement error leaves it usable
                    raise
                _close_quietly(conn)
                # A server restart breaks every connection at once: the retry starts afresh.
                self._lean.discard_idle()
                self.engine.dispose()
                if attempt == 2:
                    log.error("database unavailable: %s", exc)
                    raise DependencyUnavailable("database", self.retry_after) from exc
                continue
            except BaseException:
                _close_quietly(conn)  # interrupted mid-protocol: the connection's state is unknown
                raise
            self._lean.release(conn, born)
            rows: list[Sequence[Any]] = context.rows or []
            return rows
        raise AssertionError("unreachable")

    def check(self) -> None:
        """SELECT 1; a connection found broken is retried once (the pool is renewed then)."""
        for attempt in (1, 2):
            try:
                with self.translate_errors(), self.engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                return
            except DependencyUnavailable as exc:
                cause = exc.__cause__
                lost = isinstance(cause, DBAPIError) and cause.connection_invalidated
                if attempt == 2 or not lost:
                    raise
