"""PostgreSQL through pg8000's native API: prepared statements on one pool, outages as 503s.

Every connection comes from one :class:`common.adapters.pool.Pool` (``DB_POOL_SIZE`` +
``DB_POOL_OVERFLOW``; the services never import SQLAlchemy); each prepares a statement on its
first run and then runs it in one round trip, autocommitted outside :meth:`Database.transaction`.
Failures are classified by what happened (docs/reliability.md): a socket error or timeout
discards the connection and is a 503; the server's own refusals (a statement timeout, a full
server) are 503s on a connection kept; anything else is the caller's bug (500). A statement
runs again on a fresh connection only if it cannot have run, or is declared ``idempotent``.
"""

from __future__ import annotations

import logging
import ssl
from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Generic, NamedTuple, TypeVar, overload
from urllib.parse import parse_qsl, unquote, urlsplit

from pg8000 import native
from pg8000.native import DatabaseError, InterfaceError

from common.adapters.pool import Pool, PoolTimeout
from common.adapters.secrets import Credentials, SecretCredentials
from common.errors import DependencyUnavailable
from common.settings import DatabaseLogin, Settings

log = logging.getLogger(__name__)

# A pooled connection idle longer than this is pinged before use: a connection in steady use
# needs no round trip for it, and one that breaks anyway is retried by Database.execute.
PING_AFTER_IDLE_SECONDS = 5.0
RECYCLE_SECONDS = 1800
# SQLSTATEs that mean "the database can't serve now", not "this statement is wrong": 503.
# The session is gone: 08 connection exception, 57P01-03 shutdown, crash, not yet accepting,
# 25P03/57P05 a session the server timed out.
_SESSION_GONE_CLASS = "08"
_SESSION_GONE_CODES = ("57P01", "57P02", "57P03", "25P03", "57P05")
# The server ended the session before the statement could run (its transaction rolled back).
_NOT_RUN_CODES = ("57P01", "57P02", "57P03")
# The session is fine: 53 insufficient resources, 28 login refused, 57014 statement timeout,
# 55P03 lock not available, 40001/40P01 serialization failure, deadlock.
_BUSY_CLASSES = ("53", "28")
_BUSY_CODES = ("57014", "55P03", "40001", "40P01")
# pg8000's InterfaceErrors that mean the socket failed (others are the caller's mistakes).
_NETWORK_MESSAGES = ("network error", "connection is closed", "communication error")
AUTH_FAILED = "28P01"
FOREIGN_KEY_VIOLATION = "23503"
# A prepared statement whose table changed shape under it (a migration ran): prepare anew.
_PLAN_CHANGED = "0A000"

R = TypeVar("R")
C = TypeVar("C")


class ColumnsMismatch(Exception):
    """A statement returned other columns than its row type names: the code and the schema
    (or the SQL and its row type) are out of step. A bug, answered 500."""


class Statement(Generic[R]):
    """One SQL statement with ``:name`` parameters; its rows come back as named tuples.

    ``row``: the NamedTuple of its rows, whose fields are the statement's columns in order
    (checked when a connection first runs it). Without one, each row is a named tuple built
    from the columns the server names (the tests' ad-hoc statements). ``idempotent``: running
    it twice with the same parameters has the effect and the rows of running it once, so a
    connection lost under it may run it again.
    """

    __slots__ = ("_names", "_row", "idempotent", "row", "text")

    def __init__(self, text: str, row: type[R] | None = None, *, idempotent: bool = False) -> None:
        self.text = text
        self.row = row
        self.idempotent = idempotent
        self._names: tuple[str, ...] | None = None
        self._row: Callable[[list[Any]], R] | None = None

    def rows(self, raw: list[list[Any]] | None) -> list[R]:
        if not raw:
            return []
        assert self._row is not None, "rows before the statement's columns are known"
        return [self._row(values) for values in raw]

    def learn_columns(self, columns: list[dict[str, Any]] | None) -> None:
        names = tuple(column["name"] for column in columns or [])
        if names == self._names:
            return
        shape: Any = self.row or _untyped_row(names)
        if self.row is not None and names and names != shape._fields:
            raise ColumnsMismatch(
                f"{self!r} returns the columns {names}; its row type "
                f"{shape.__name__} names {shape._fields}"
            )
        self._names = names
        self._row = shape._make

    @property
    def columns_known(self) -> bool:
        return self._row is not None

    def __repr__(self) -> str:
        return f"sql({self.text!r})"


def _untyped_row(names: tuple[str, ...]) -> Any:
    return namedtuple("Row", names, rename=True)


@overload
def sql(text: str, *, idempotent: bool = False) -> Statement[Any]: ...
@overload
def sql(text: str, row: type[R], *, idempotent: bool = False) -> Statement[R]: ...
def sql(text: str, row: Any = None, *, idempotent: bool = False) -> Statement[Any]:
    """A statement with ``:name`` parameters, built once at import; ``row`` is the NamedTuple
    of its rows (every statement of the service that returns rows names one).

    Declare ``idempotent=True`` only for a statement that a second run with the same
    parameters leaves as one did (a read; an insert with ON CONFLICT DO NOTHING of a given
    key; an update to fixed values whose WHERE still matches its own result).
    """
    return Statement(text, row, idempotent=idempotent)


def is_outage(exc: BaseException) -> bool:
    """A server error that says the database can't serve now (as opposed to a bad statement)."""
    code = sqlstate(exc)
    return code is not None and (
        session_gone(exc) or code.startswith(_BUSY_CLASSES) or code in _BUSY_CODES
    )


def session_gone(exc: BaseException) -> bool:
    """A server error after which the connection can't be used again."""
    code = sqlstate(exc)
    return code is not None and (
        code.startswith(_SESSION_GONE_CLASS) or code in _SESSION_GONE_CODES
    )


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a server error: pg8000 carries the error's fields (C = code) in args[0]."""
    fields = exc.args[0] if isinstance(exc, DatabaseError) and exc.args else None
    code = fields.get("C") if isinstance(fields, dict) else None
    return code if isinstance(code, str) else None


def is_network_error(exc: BaseException) -> bool:
    """The socket failed under the driver: the protocol may be out of step."""
    if isinstance(exc, OSError):  # TimeoutError, ConnectionResetError, ssl.SSLError ...
        return True
    if isinstance(exc, InterfaceError) and not isinstance(exc, DatabaseError):
        message = str(exc.args[0]) if exc.args else ""
        return (
            isinstance(exc.__cause__, OSError)
            or message in _NETWORK_MESSAGES
            or message.startswith("Can't create a connection")
        )
    return False


def is_foreign_key_violation(exc: BaseException) -> bool:
    """SQLSTATE 23503: a row refers to one that is gone (its user was erased meanwhile)."""
    return sqlstate(exc) == FOREIGN_KEY_VIOLATION


class ConnectionLost(Exception):
    """The connection broke under a statement; ``may_have_run``: its effect is unknown."""

    def __init__(self, error: BaseException, *, may_have_run: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.may_have_run = may_have_run


class Connection:
    """One pooled pg8000 connection and the statements prepared on it.

    The pool closes it with ``close``; ``ping`` is its check after a while idle.
    """

    def __init__(self, raw: native.Connection, *, prepare: bool = True) -> None:
        self.raw = raw
        self.prepare = prepare  # False: every statement unnamed (DB_PREPARED_STATEMENTS)
        self._prepared: dict[str, native.PreparedStatement] = {}
        # Set when a call into the driver ended in a way that may leave the protocol out of
        # step (a socket error, an exit half-way through a reply): the pool discards it.
        self.broken = False

    def execute(self, statement: Statement[R], params: Mapping[str, Any] | None = None) -> list[R]:
        """Run ``statement``; its rows (empty for a statement that returns none).

        A socket failure raises :class:`ConnectionLost` (the statement may or may not have
        run); a server error raises pg8000's DatabaseError, the connection still in step.
        """
        values = dict(params or {})
        try:
            try:
                return self._execute(statement, values)
            except DatabaseError as exc:
                if sqlstate(exc) != _PLAN_CHANGED:
                    raise
                return self._prepare_again(statement, values)
        except BaseException as exc:
            judged = self._judge(exc)
            if judged is exc:
                raise
            raise judged from exc

    def _execute(self, statement: Statement[R], values: dict[str, Any]) -> list[R]:
        if not self.prepare or not statement.columns_known:  # the first run names its columns
            return self._run_and_learn(statement, values)
        prepared = self._prepared.get(statement.text)
        if prepared is None:
            prepared = self._prepared[statement.text] = self.raw.prepare(statement.text)
        return statement.rows(prepared.run(**values))

    def _prepare_again(self, statement: Statement[R], values: dict[str, Any]) -> list[R]:
        """Run ``statement`` whose table changed shape (a migration): its columns anew."""
        prepared = self._prepared.pop(statement.text, None)
        if prepared is not None:
            prepared.close()
        return self._run_and_learn(statement, values)

    def _run_and_learn(self, statement: Statement[R], values: dict[str, Any]) -> list[R]:
        rows = self.raw.run(statement.text, **values)
        statement.learn_columns(self.raw.columns)  # the same names again: nothing to do
        return statement.rows(rows)

    def _judge(self, exc: BaseException) -> BaseException:
        """What a failure inside the driver means for this connection, and for the caller."""
        if session_gone(exc):  # the server ended the session (it said so)
            self.broken = True
            return ConnectionLost(exc, may_have_run=sqlstate(exc) not in _NOT_RUN_CODES)
        if sqlstate(exc) is not None or isinstance(exc, ColumnsMismatch):  # still in step
            return exc
        if is_network_error(exc):
            self.broken = True
            # EPIPE: the server had closed before this write, so what it carried never ran.
            # Any other failure (a read's timeout, reset or end) may follow a commit.
            root = exc if isinstance(exc, OSError) else exc.__cause__
            return ConnectionLost(exc, may_have_run=not isinstance(root, BrokenPipeError))
        if not isinstance(exc, InterfaceError):  # e.g. an exit in the middle of a reply
            self.broken = True
        return exc  # InterfaceError: a bad statement or parameter, found before sending

    def run_plain(self, text: str) -> None:
        """BEGIN, COMMIT, ROLLBACK, SET ...: a statement without parameters or rows."""
        try:
            self.raw.run(text)
        except BaseException as exc:
            judged = self._judge(exc)
            if judged is exc:
                raise
            raise judged from exc

    def commit(self) -> None:
        self.run_plain("COMMIT")

    def rollback(self) -> None:
        self.run_plain("ROLLBACK")

    def close(self) -> None:
        self.raw.close()

    def ping(self) -> None:
        self.raw.run("SELECT 1")


DbPool = Pool[Connection]


def tls_connect_args(mode: str) -> dict[str, Any]:
    """pg8000's ssl_context for DB_TLS (RDS for PostgreSQL 15+ refuses plain connections)."""
    if mode == "off":
        # False, not None: None makes pg8000 load the system's CAs and ask for TLS all the same.
        return {"ssl_context": False}
    context = ssl.create_default_context()
    if mode == "require":  # encrypted; the server's certificate is not checked
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return {"ssl_context": context}


def connect_params(
    database_url: str,
    *,
    tls: str,
    timeout: float | None,
    statement_timeout: float | None = None,
) -> dict[str, Any]:
    """pg8000 ``connect()`` keyword arguments from DATABASE_URL and DB_TLS.

    ``timeout`` is the socket's (connecting, and every read). ``statement_timeout`` (below
    it) becomes the session's own deadlines, sent with the login: the server cancels a slow
    statement, a lock wait or an idle transaction itself, and answers while the socket still
    waits, so the connection stays in step.
    """
    parts = urlsplit(database_url)
    given = {
        "host": parts.hostname,
        "port": parts.port,
        "database": unquote(parts.path.lstrip("/")),
        "user": unquote(parts.username or ""),
        "password": unquote(parts.password or ""),
    }
    params: dict[str, Any] = {key: value for key, value in given.items() if value}
    params.update(parse_qsl(parts.query))  # e.g. unix_sock=/cloudsql/.../.s.PGSQL.5432
    params.update(tls_connect_args(tls))
    params["timeout"] = timeout
    if statement_timeout is not None:
        millis = str(max(1, round(statement_timeout * 1000)))
        params["startup_params"] = {
            "statement_timeout": millis,
            "lock_timeout": millis,
            "idle_in_transaction_session_timeout": millis,
        }
    return params


def credentials_from_settings(settings: Settings) -> SecretCredentials | None:
    """The secret named by DATABASE_SECRET_ARN, read now (at start); None without one."""
    if not settings.database_secret_arn:
        return None
    return SecretCredentials(settings.database_secret_arn)


def login(
    connect: Callable[..., C], params: Mapping[str, Any], credentials: SecretCredentials | None
) -> C:
    """``connect(**params)``, with the secret's current login when there is a secret.

    Connections already open keep working across a rotation (PostgreSQL checks the password
    only at login); a new one that the server refuses with 28P01 makes the secret be read
    again and the login tried once more with what it holds now. Used by the pool here and
    by the migrations' engine.
    """
    if credentials is None:
        return connect(**params)
    used = credentials.current()
    try:
        return connect(**{**params, **used.connect_params()})
    except DatabaseError as exc:
        if sqlstate(exc) != AUTH_FAILED:
            raise
        fresh: Credentials = credentials.refresh(used)
        log.warning("database login refused; connecting with the secret read again")
    return connect(**{**params, **fresh.connect_params()})


def migration_connector(login_to: DatabaseLogin) -> Callable[[], Any]:
    """Alembic's connections: pg8000's DB-API with the functions' login, and no socket
    timeout (a migration may wait long for a lock)."""
    import pg8000.dbapi

    params = connect_params(login_to.url, tls=login_to.tls, timeout=None)
    credentials = SecretCredentials(login_to.secret_arn) if login_to.secret_arn else None
    return lambda: login(pg8000.dbapi.connect, params, credentials)


def make_pool(settings: Settings, credentials: SecretCredentials | None = None) -> DbPool:
    """The process's one pool of connections."""
    params = connect_params(
        settings.database_url,
        tls=settings.db_tls,
        timeout=settings.db_connect_timeout_seconds,
        statement_timeout=settings.db_statement_timeout_seconds,
    )

    def create() -> Connection:
        raw = login(native.Connection, params, credentials)
        return Connection(raw, prepare=settings.db_prepared_statements)

    # Every transaction ends before its connection goes back: the pool resets nothing.
    return Pool(
        create,
        size=settings.db_pool_size,
        overflow=settings.db_pool_overflow,
        timeout=settings.db_connect_timeout_seconds,
        recycle=RECYCLE_SECONDS,
        ping=Connection.ping,
        ping_after=PING_AFTER_IDLE_SECONDS,
    )


class Database:
    def __init__(self, pool: DbPool, *, retry_after: int = 5) -> None:
        self.pool = pool
        self.retry_after = retry_after

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        pool = make_pool(settings, credentials_from_settings(settings))
        return cls(pool, retry_after=settings.retry_after_seconds)

    def unavailable(
        self, exc: BaseException, what: str, *, outcome_unknown: bool = False
    ) -> DependencyUnavailable:
        """The 503 for ``exc`` (logged); the caller raises it ``from`` the driver's error.

        ``outcome_unknown``: the statement may have run (and committed) before the failure.
        """
        log.error("database %s: %s", what, exc)
        return DependencyUnavailable("database", self.retry_after, outcome_unknown=outcome_unknown)

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        """A pooled connection, discarded if a failure may have left it out of step.

        Raises ConnectionLost (for the caller to retry or not), the 503 of an outage the
        server reports, or the caller's and the driver's other errors unchanged.
        """
        try:
            lease = self.pool.acquire()
        except (PoolTimeout, DatabaseError, InterfaceError, OSError) as exc:
            if isinstance(exc, DatabaseError) and not is_outage(exc):
                raise
            raise self.unavailable(exc, "unreachable") from exc
        try:
            yield lease.connection
        except DatabaseError as exc:  # the server answered: the connection is in step
            if is_outage(exc):  # e.g. a statement timeout: the connection stays in use
                raise self.unavailable(exc, "unavailable") from exc
            raise
        finally:
            broken = lease.connection.broken
            self.pool.release(lease, discard=broken)
            if broken:
                # A connection lost to the network or ended by the server: its pooled peers
                # most likely went with it (a restart, a failover). Connect afresh, so the
                # retry and the next requests don't each meet one of them.
                self.pool.dispose()

    def execute(self, statement: Statement[R], params: Mapping[str, Any] | None = None) -> list[R]:
        """Run one autocommitted statement; its rows (empty for a statement without any).

        A connection lost under it is discarded. The statement runs again on a fresh one
        only if it cannot have run (the server had ended the session) or is declared
        ``idempotent``; otherwise its outcome is unknown and the answer is a 503.
        """
        may_have_run = False
        for attempt in (1, 2):
            try:
                with self._connection() as conn:
                    return conn.execute(statement, params)
            except ConnectionLost as lost:
                may_have_run = may_have_run or lost.may_have_run
                if attempt == 2 or (lost.may_have_run and not statement.idempotent):
                    raise self.unavailable(
                        lost.error, "connection lost", outcome_unknown=may_have_run
                    ) from lost.error
            except DependencyUnavailable as exc:
                # No connection for the retry: what the first run did is still unknown.
                exc.outcome_unknown = exc.outcome_unknown or may_have_run
                raise
        raise AssertionError("unreachable")

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A connection in a transaction, committed on success; outages become 503.

        Only a BEGIN that fails is tried again (on a fresh connection): once the body has
        run, a connection lost, even at COMMIT, leaves the outcome unknown (a 503), so a
        caller's repeat must find its own earlier effect.
        """
        try:
            with self._begun() as conn:
                try:
                    yield conn
                except BaseException as exc:
                    if not conn.broken:
                        try:
                            conn.rollback()
                        except Exception as failed:
                            raise failed from exc  # the connection is judged by this error
                    raise
                conn.commit()
        except ConnectionLost as lost:
            # Once the body ran, even a COMMIT's lost reply may follow a commit. A BEGIN lost
            # twice is judged like any statement (unknown unless the write certainly failed):
            # the safe side, as nothing of the body was sent.
            raise self.unavailable(
                lost.error, "connection lost", outcome_unknown=lost.may_have_run
            ) from lost.error

    @contextmanager
    def _begun(self) -> Iterator[Connection]:
        for attempt in (1, 2):
            with self._connection() as conn:
                try:
                    conn.run_plain("BEGIN")
                except ConnectionLost:
                    if attempt == 2:
                        raise
                    continue
                yield conn
                return
        raise AssertionError("unreachable")

    def check(self) -> None:
        """SELECT 1 (the health check); a connection found broken is retried once."""
        self.execute(_SELECT_ONE)

    def dispose(self) -> None:
        """Close every pooled connection (tests; a fork)."""
        self.pool.dispose()


class _Alive(NamedTuple):
    alive: int


_SELECT_ONE = sql("SELECT 1 AS alive", _Alive, idempotent=True)
