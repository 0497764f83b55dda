"""One typed settings object, read from the environment once.

Every setting has a safe default for the local stack, written once: on its field. Each one is
listed in docs/configuration.md. Platform variables keep their platform's spelling (``PORT``,
``AWS_ACCESS_KEY_ID`` ...); the project's own are upper-case names grouped by prefix (``S3_``,
``DB_``, ``MAX_``). This is the only module that reads the environment, besides the entry
points' choice of what to run (``FUNCTION_TARGET``, ``AWS_LAMBDA_RUNTIME_API`` ...).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from functools import lru_cache
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

DEFAULT_DATABASE_URL = "postgresql+pg8000://records:records@127.0.0.1:55432/records"
# The local stacks' server secret (idempotency replies, list cursors). A cloud deployment
# (Lambda, Cloud Run) refuses to start with it: there IDEMPOTENCY_SECRET comes from the
# platform's secret store.
DEV_IDEMPOTENCY_SECRET = "dev-only-idempotency-secret-not-for-production"  # noqa: S105
IDEMPOTENCY_SECRET_MIN_LENGTH = 32
ORIGIN_VERIFY_SECRET_MIN_LENGTH = 32
# Variables the platforms set: a process that sees one runs in a cloud, not on a laptop.
CLOUD_MARKERS = ("AWS_LAMBDA_FUNCTION_NAME", "K_SERVICE")
MIB = 1024 * 1024

DB_TLS_MODES = ("off", "require", "verify")  # the first is the default

# The one table of MP3 (MPEG audio Layer III) bitrates, kbit/s, in the order of the frame
# header's bitrate index 1-14. It lives here because MP3_BITRATE_KBPS is checked against it at
# start; the conversion (frame headers) and the per-upload options import it from here.
MP3_BITRATES_MPEG1 = (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
MP3_BITRATES_MPEG2 = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)  # and 2.5


class DownloadMode(StrEnum):
    STREAM = "stream"  # the function streams the object from the store
    REDIRECT = "redirect"  # 307 to a presigned URL of the store's public endpoint
    ACCEL = "accel"  # the router (nginx) fetches and caches the object: X-Accel-Redirect


class SettingsError(ValueError):
    """A setting has a value the service cannot run with."""


class JobQueueKind(StrEnum):
    POSTGRES = "postgres"  # the uploads table itself (make dev, compose: python -m ...worker)
    SQS = "sqs"  # AWS: an SQS queue whose event source mapping invokes upload_record
    CLOUD_TASKS = "cloudtasks"  # Cloud Run: HTTP tasks pushed to upload_record's /_tasks/convert


_Choice = TypeVar("_Choice", bound=StrEnum)

GOOGLE_OIDC_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
# glibc reads these itself: the process tunes malloc only where the operator did not.
GLIBC_MALLOC_VARIABLES = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_")


@dataclass(frozen=True, slots=True)
class DatabaseLogin:
    """Where the database is and how to log in: all the migrations need of the settings (their
    Lambda function has none of the functions' secrets, which :class:`Settings` insists on)."""

    url: str = DEFAULT_DATABASE_URL
    # TLS to the database: off, require (encrypted, not verified) or verify (system CAs).
    tls: str = DB_TLS_MODES[0]
    # AWS Secrets Manager secret with the database login (JSON: username, password ...).
    secret_arn: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DatabaseLogin:
        e = os.environ if env is None else env
        tls = e.get("DB_TLS", "").strip().lower() or DB_TLS_MODES[0]
        if tls not in DB_TLS_MODES:
            raise SettingsError(f"DB_TLS must be one of {', '.join(DB_TLS_MODES)}")
        return cls(
            url=normalise_database_url(e.get("DATABASE_URL", "") or DEFAULT_DATABASE_URL),
            tls=tls,
            secret_arn=e.get("DATABASE_SECRET_ARN", "").strip() or None,
        )


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """How a function's container serves it (``common.platform.serve``, ``.entrypoint``).

    ``PORT`` keeps Cloud Run's spelling; ``WORKERS`` and ``THREADS`` functions-framework's.
    """

    port: int = 8080
    host: str = "0.0.0.0"
    # None: the function's own (common.platform.serve's SERVER_DEFAULTS).
    workers: int | None = None
    threads: int | None = None
    # Where the image keeps functions/ and alembic.ini.
    app_dir: str = "/app"
    # After SIGTERM, requests in flight get this long to finish; then uploads still running
    # are answered 503 and their partial MP3 discarded, and the server exits within
    # SHUTDOWN_DRAIN_SECONDS + 2 s: below Cloud Run's 10-s grace with the default.
    shutdown_drain_seconds: float = 7.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerSettings:
        e = os.environ if env is None else env
        d = _SERVER_DEFAULTS
        return cls(
            port=int_setting(e, "PORT", d["port"], minimum=1),
            host=e.get("HOST", "").strip() or d["host"],
            workers=_optional_int(e, "WORKERS"),
            threads=_optional_int(e, "THREADS"),
            app_dir=app_dir(e),
            shutdown_drain_seconds=_float(e, "SHUTDOWN_DRAIN_SECONDS", d["shutdown_drain_seconds"]),
        )


def app_dir(env: Mapping[str, str] | None = None) -> str:
    """``APP_DIR`` alone: what the entry point needs before anything else is read."""
    e = os.environ if env is None else env
    return e.get("APP_DIR", "") or str(_SERVER_DEFAULTS["app_dir"])


def _optional_int(env: Mapping[str, str], name: str) -> int | None:
    return int_setting(env, name, 0, minimum=1) if env.get(name, "") else None


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    db_pool_size: int = 10
    db_pool_overflow: int = 0
    db_connect_timeout_seconds: float = 5.0
    s3_endpoint_url: str | None = None
    s3_public_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    # boto3's own variable names; unset means its default chain (instance/task role, profile).
    aws_access_key_id: str | None = field(default=None, repr=False)
    aws_secret_access_key: str | None = field(default=None, repr=False)
    aws_session_token: str | None = field(default=None, repr=False)
    s3_bucket: str = "records"
    s3_part_size_bytes: int = 8 * MIB
    s3_timeout_seconds: float = 10.0
    max_upload_bytes: int = 256 * MIB
    mp3_bitrate_kbps: int = 192
    convert_timeout_seconds: float = 600.0
    ffmpeg_binary: str = "ffmpeg"  # from_env: FFMPEG_BINARY, else the ffmpeg on PATH
    download_mode: DownloadMode = DownloadMode.STREAM
    presign_expires_seconds: int = 300
    public_base_url: str | None = None
    retry_after_seconds: int = 5
    log_level: str = "INFO"
    max_direct_upload_bytes: int = 4 * 1024 * MIB
    google_cloud_project: str | None = None
    database_secret_arn: str | None = None  # DatabaseLogin
    db_tls: str = DB_TLS_MODES[0]  # DatabaseLogin
    # Named prepared statements (one round trip each); off behind a proxy that multiplexes
    # sessions per transaction (RDS Proxy, PgBouncer): it would pin each session instead.
    db_prepared_statements: bool = True
    # The server's own deadline for a statement, a lock wait and an idle transaction, below
    # the socket timeout (DB_CONNECT_TIMEOUT_SECONDS) so that the server cancels a slow
    # statement (a 503 on a healthy connection) before the socket gives up on it. Unset: 80 %
    # of the socket timeout (of the default 5 s: this default).
    db_statement_timeout_seconds: float = 4.0
    # Keys the stored idempotent replies (with each raw Idempotency-Key) and the list cursors.
    idempotency_secret: str = field(default=DEV_IDEMPOTENCY_SECRET, repr=False)
    # AWS: the value CloudFront puts in X-Origin-Verify; when set, the Lambda handler refuses
    # HTTP events without it (requests sent to the HTTP API around CloudFront and its WAF).
    origin_verify_secret: str | None = field(default=None, repr=False)
    # A running idempotent request renews its claim; one not renewed this long is taken over.
    idempotency_lease_seconds: int = 60
    # DELETE /users/<id> removes objects for at most this long, then leaves the rest to the
    # sweep (the rows, and with them the token, are gone before the first object).
    erase_deadline_seconds: float = 20.0
    # Conversion jobs of direct uploads (common.domain.jobs).
    job_queue: JobQueueKind = JobQueueKind.POSTGRES
    job_queue_url: str | None = None
    cloud_tasks_queue: str | None = None
    tasks_target_url: str | None = None
    tasks_service_account: str | None = None
    tasks_audience: str | None = None
    tasks_certs_url: str = GOOGLE_OIDC_CERTS_URL
    job_wait_max_seconds: int = 25
    job_lease_seconds: int = 60
    job_max_attempts: int = 3
    job_timeout_seconds: float = 3300.0
    # make sweep touches only what is older than this (an upload in flight never is).
    sweep_grace_seconds: int = 3600
    # The PostgreSQL queue's worker touches this file; its health check reads the age.
    worker_alive_file: str = "/tmp/upload-worker.alive"  # noqa: S108
    # The slowest request body accepted (common.platform.bridge): after the grace, at least
    # this many bytes per second on average; a slower one is cut off with 408.
    body_grace_seconds: float = 10.0
    body_min_bytes_per_second: int = 16 * 1024
    # However fast it starts, a request body must have arrived this long after its reading
    # began (a WAV of MAX_UPLOAD_BYTES at 1 MB/s takes about 270 s); then 408.
    body_deadline_seconds: float = 300.0
    # Direct uploads a user may have pending (form usable, queued or converting); over it 429.
    max_pending_uploads_per_user: int = 10

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        d = _DEFAULTS
        login = DatabaseLogin.from_env(e)
        settings = cls(
            database_url=login.url,
            db_pool_size=int_setting(e, "DB_POOL_SIZE", d["db_pool_size"], minimum=1),
            db_pool_overflow=int_setting(e, "DB_POOL_OVERFLOW", d["db_pool_overflow"]),
            db_connect_timeout_seconds=_float(
                e, "DB_CONNECT_TIMEOUT_SECONDS", d["db_connect_timeout_seconds"]
            ),
            s3_endpoint_url=_optional_url(e, "S3_ENDPOINT_URL"),
            s3_public_endpoint_url=_optional_url(e, "S3_PUBLIC_ENDPOINT_URL"),
            s3_region=e.get("S3_REGION", "") or d["s3_region"],
            aws_access_key_id=e.get("AWS_ACCESS_KEY_ID") or None,
            aws_secret_access_key=e.get("AWS_SECRET_ACCESS_KEY") or None,
            aws_session_token=e.get("AWS_SESSION_TOKEN") or None,
            s3_bucket=e.get("S3_BUCKET", "") or d["s3_bucket"],
            s3_part_size_bytes=int_setting(
                e, "S3_PART_SIZE_BYTES", d["s3_part_size_bytes"], minimum=5 * MIB
            ),
            s3_timeout_seconds=_float(e, "S3_TIMEOUT_SECONDS", d["s3_timeout_seconds"]),
            max_upload_bytes=int_setting(
                e, "MAX_UPLOAD_BYTES", d["max_upload_bytes"], minimum=1024
            ),
            mp3_bitrate_kbps=int_setting(e, "MP3_BITRATE_KBPS", d["mp3_bitrate_kbps"], minimum=32),
            convert_timeout_seconds=_float(
                e, "CONVERT_TIMEOUT_SECONDS", d["convert_timeout_seconds"]
            ),
            ffmpeg_binary=e.get("FFMPEG_BINARY", "") or _discover_ffmpeg(d["ffmpeg_binary"]),
            download_mode=_choice(DownloadMode, e, "DOWNLOAD_MODE", d["download_mode"]),
            presign_expires_seconds=int_setting(
                e, "PRESIGN_EXPIRES_SECONDS", d["presign_expires_seconds"], minimum=1
            ),
            public_base_url=_optional_url(e, "PUBLIC_BASE_URL"),
            retry_after_seconds=int_setting(
                e, "RETRY_AFTER_SECONDS", d["retry_after_seconds"], minimum=1
            ),
            log_level=(e.get("LOG_LEVEL", "") or d["log_level"]).upper(),
            max_direct_upload_bytes=int_setting(
                e, "MAX_DIRECT_UPLOAD_BYTES", d["max_direct_upload_bytes"], minimum=1024
            ),
            google_cloud_project=e.get("GOOGLE_CLOUD_PROJECT", "").strip() or None,
            database_secret_arn=login.secret_arn,
            db_tls=login.tls,
            db_prepared_statements=bool_setting(
                e, "DB_PREPARED_STATEMENTS", d["db_prepared_statements"]
            ),
            db_statement_timeout_seconds=_statement_timeout(e, d["db_statement_timeout_seconds"]),
            idempotency_secret=_idempotency_secret(e),
            origin_verify_secret=_origin_verify_secret(e),
            idempotency_lease_seconds=int_setting(
                e, "IDEMPOTENCY_LEASE_SECONDS", d["idempotency_lease_seconds"], minimum=5
            ),
            erase_deadline_seconds=_float(e, "ERASE_DEADLINE_SECONDS", d["erase_deadline_seconds"]),
            job_queue=_choice(JobQueueKind, e, "JOB_QUEUE", d["job_queue"]),
            job_queue_url=_optional_url(e, "JOB_QUEUE_URL"),
            cloud_tasks_queue=e.get("CLOUD_TASKS_QUEUE", "").strip() or None,
            tasks_target_url=_optional_url(e, "TASKS_TARGET_URL"),
            tasks_service_account=e.get("TASKS_SERVICE_ACCOUNT", "").strip() or None,
            tasks_audience=e.get("TASKS_AUDIENCE", "").strip() or None,
            tasks_certs_url=_optional_url(e, "TASKS_CERTS_URL") or d["tasks_certs_url"],
            job_wait_max_seconds=int_setting(e, "JOB_WAIT_MAX_SECONDS", d["job_wait_max_seconds"]),
            job_lease_seconds=int_setting(
                e, "JOB_LEASE_SECONDS", d["job_lease_seconds"], minimum=2
            ),
            job_max_attempts=int_setting(e, "JOB_MAX_ATTEMPTS", d["job_max_attempts"], minimum=1),
            job_timeout_seconds=_float(e, "JOB_TIMEOUT_SECONDS", d["job_timeout_seconds"]),
            sweep_grace_seconds=int_setting(e, "SWEEP_GRACE_SECONDS", d["sweep_grace_seconds"]),
            worker_alive_file=e.get("WORKER_ALIVE_FILE", "") or d["worker_alive_file"],
            body_grace_seconds=_float(e, "BODY_GRACE_SECONDS", d["body_grace_seconds"]),
            body_min_bytes_per_second=int_setting(
                e, "BODY_MIN_BYTES_PER_SECOND", d["body_min_bytes_per_second"], minimum=1
            ),
            body_deadline_seconds=_float(e, "BODY_DEADLINE_SECONDS", d["body_deadline_seconds"]),
            max_pending_uploads_per_user=int_setting(
                e, "MAX_PENDING_UPLOADS_PER_USER", d["max_pending_uploads_per_user"], minimum=1
            ),
        )
        if settings.db_statement_timeout_seconds >= settings.db_connect_timeout_seconds:
            raise SettingsError(
                "DB_STATEMENT_TIMEOUT_SECONDS must be below DB_CONNECT_TIMEOUT_SECONDS (the "
                "server must cancel a slow statement before the socket gives up on it)"
            )
        if settings.mp3_bitrate_kbps not in MP3_BITRATES_MPEG1:
            raise SettingsError(
                f"MP3_BITRATE_KBPS must be one of {', '.join(map(str, MP3_BITRATES_MPEG1))}"
            )
        if settings.presign_expires_seconds > 7 * 24 * 3600:
            raise SettingsError("PRESIGN_EXPIRES_SECONDS must be at most 604800 (7 days)")
        return settings


# Each field's default, as from_env falls back to it.
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Settings)}
_SERVER_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(ServerSettings)}


def glibc_malloc_overrides(env: Mapping[str, str] | None = None) -> frozenset[str]:
    """The names of GLIBC_MALLOC_VARIABLES that the environment sets."""
    e = os.environ if env is None else env
    return frozenset(name for name in GLIBC_MALLOC_VARIABLES if e.get(name))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once on first use."""
    return Settings.from_env()


def normalise_database_url(url: str) -> str:
    """Point plain ``postgres://`` / ``postgresql://`` URLs at the pg8000 driver.

    A unix socket (Cloud SQL on Cloud Run mounts ``/cloudsql/PROJECT:REGION:INSTANCE``) is
    given as pg8000's ``?unix_sock=/cloudsql/.../.s.PGSQL.5432``; libpq's spelling,
    ``?host=/cloudsql/...`` (a directory), is translated to it.
    """
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            url = "postgresql+pg8000://" + url[len(prefix) :]
            break
    if not url.startswith("postgresql+pg8000://"):
        raise SettingsError("DATABASE_URL must be a postgresql:// URL")
    return _libpq_socket_to_pg8000(url)


def _libpq_socket_to_pg8000(url: str) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    hosts = [value for key, value in query if key == "host"]
    if not hosts or not hosts[0].startswith("/"):
        return url
    if any(key == "unix_sock" for key, _ in query):
        raise SettingsError("DATABASE_URL: give either ?host=/dir or ?unix_sock=/path, not both")
    port = parts.port or 5432
    sock = f"{hosts[0].rstrip('/')}/.s.PGSQL.{port}"
    rest = [(key, value) for key, value in query if key != "host"]
    return urlunsplit(parts._replace(query=urlencode([*rest, ("unix_sock", sock)], safe="/:")))


def _discover_ffmpeg(name: str) -> str:
    return shutil.which(name) or name


def int_setting(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    """The integer ``env[name]`` (``default`` when unset or empty), refused below ``minimum``."""
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from exc
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def bool_setting(env: Mapping[str, str], name: str, default: bool) -> bool:
    """``true``/``false`` (also 1/0, yes/no, on/off) in ``env[name]``; ``default`` when unset."""
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("true", "1", "yes", "on"):
        return True
    if raw in ("false", "0", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def _statement_timeout(env: Mapping[str, str], default: float) -> float:
    """DB_STATEMENT_TIMEOUT_SECONDS; unset, 80 % of DB_CONNECT_TIMEOUT_SECONDS if that is set."""
    if env.get("DB_CONNECT_TIMEOUT_SECONDS"):
        default = round(_float(env, "DB_CONNECT_TIMEOUT_SECONDS", 0.0) * 0.8, 3)
    return _float(env, "DB_STATEMENT_TIMEOUT_SECONDS", default)


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from exc
    if not value > 0:
        raise SettingsError(f"{name} must be positive, got {raw!r}")
    return value


def _optional_url(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SettingsError(f"{name} must be an http(s) URL, got {raw!r}")
    return raw.rstrip("/")


def _idempotency_secret(env: Mapping[str, str]) -> str:
    raw = env.get("IDEMPOTENCY_SECRET", "")
    if not raw:
        # The one-shot jobs sign nothing (the template gives the sweep no such secret).
        job = env.get("FUNCTION_TARGET") in ("sweep", "migrate")
        if any(env.get(name) for name in CLOUD_MARKERS) and not job:
            raise SettingsError(
                "IDEMPOTENCY_SECRET must be set on Lambda and Cloud Run (from the secret store)"
            )
        return DEV_IDEMPOTENCY_SECRET
    if len(raw) < IDEMPOTENCY_SECRET_MIN_LENGTH:
        raise SettingsError(
            f"IDEMPOTENCY_SECRET must be at least {IDEMPOTENCY_SECRET_MIN_LENGTH} characters"
        )
    return raw


def _origin_verify_secret(env: Mapping[str, str]) -> str | None:
    raw = env.get("ORIGIN_VERIFY_SECRET", "")
    if raw and len(raw) < ORIGIN_VERIFY_SECRET_MIN_LENGTH:
        raise SettingsError(
            f"ORIGIN_VERIFY_SECRET must be at least {ORIGIN_VERIFY_SECRET_MIN_LENGTH} characters"
        )
    return raw or None


def _choice(kind: type[_Choice], env: Mapping[str, str], name: str, default: _Choice) -> _Choice:
    """The member of ``kind`` that ``env[name]`` names (case-insensitive; unset: ``default``)."""
    raw = env.get(name, "")
    try:
        return kind(raw.strip().lower() or default.value)
    except ValueError as exc:
        values = [f"'{member.value}'" for member in kind]
        listed = f"{', '.join(values[:-1])} or {values[-1]}"
        raise SettingsError(f"{name} must be {listed}, got {raw!r}") from exc
