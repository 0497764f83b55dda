"""One typed settings object, read from the environment once.

Every setting has a safe default for the local stack; each one is listed in the README.
Platform variables keep their platform's spelling (``PORT``, ``AWS_ACCESS_KEY_ID`` ...);
the project's own are plain upper-case names grouped by prefix (``S3_``, ``DB_``, ``MAX_``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from typing import TypeVar
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

DB_TLS_MODES = ("off", "require", "verify")

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


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str
    db_pool_size: int
    db_pool_overflow: int
    db_connect_timeout_seconds: float
    s3_endpoint_url: str | None
    s3_public_endpoint_url: str | None
    s3_region: str
    # boto3's own variable names; unset means its default chain (instance/task role, profile).
    aws_access_key_id: str | None = field(repr=False)
    aws_secret_access_key: str | None = field(repr=False)
    aws_session_token: str | None = field(repr=False)
    s3_bucket: str
    s3_part_size_bytes: int
    s3_timeout_seconds: float
    max_upload_bytes: int
    mp3_bitrate_kbps: int
    convert_timeout_seconds: float
    ffmpeg_binary: str
    download_mode: DownloadMode
    presign_expires_seconds: int
    public_base_url: str | None
    retry_after_seconds: int
    log_level: str
    max_direct_upload_bytes: int = 4 * 1024 * MIB
    google_cloud_project: str | None = None
    # AWS Secrets Manager secret with the database login (JSON: username, password ...).
    database_secret_arn: str | None = None
    # TLS to the database: off, require (encrypted, not verified) or verify (system CAs).
    db_tls: str = "off"
    # Named prepared statements (one round trip each); off behind a proxy that multiplexes
    # sessions per transaction (RDS Proxy, PgBouncer): it would pin each session instead.
    db_prepared_statements: bool = True
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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        settings = cls(
            database_url=normalise_database_url(e.get("DATABASE_URL", DEFAULT_DATABASE_URL)),
            db_pool_size=int_setting(e, "DB_POOL_SIZE", 10, minimum=1),
            db_pool_overflow=int_setting(e, "DB_POOL_OVERFLOW", 0),
            db_connect_timeout_seconds=_float(e, "DB_CONNECT_TIMEOUT_SECONDS", 5.0),
            s3_endpoint_url=_optional_url(e, "S3_ENDPOINT_URL"),
            s3_public_endpoint_url=_optional_url(e, "S3_PUBLIC_ENDPOINT_URL"),
            s3_region=e.get("S3_REGION", "us-east-1") or "us-east-1",
            aws_access_key_id=e.get("AWS_ACCESS_KEY_ID") or None,
            aws_secret_access_key=e.get("AWS_SECRET_ACCESS_KEY") or None,
            aws_session_token=e.get("AWS_SESSION_TOKEN") or None,
            s3_bucket=e.get("S3_BUCKET", "records") or "records",
            s3_part_size_bytes=int_setting(e, "S3_PART_SIZE_BYTES", 8 * MIB, minimum=5 * MIB),
            s3_timeout_seconds=_float(e, "S3_TIMEOUT_SECONDS", 10.0),
            max_upload_bytes=int_setting(e, "MAX_UPLOAD_BYTES", 256 * MIB, minimum=1024),
            mp3_bitrate_kbps=int_setting(e, "MP3_BITRATE_KBPS", 192, minimum=32),
            convert_timeout_seconds=_float(e, "CONVERT_TIMEOUT_SECONDS", 600.0),
            ffmpeg_binary=e.get("FFMPEG_BINARY", "") or _discover_ffmpeg(),
            download_mode=_choice(DownloadMode, e, "DOWNLOAD_MODE", DownloadMode.STREAM),
            presign_expires_seconds=int_setting(e, "PRESIGN_EXPIRES_SECONDS", 300, minimum=1),
            public_base_url=_optional_url(e, "PUBLIC_BASE_URL"),
            retry_after_seconds=int_setting(e, "RETRY_AFTER_SECONDS", 5, minimum=1),
            log_level=(e.get("LOG_LEVEL", "INFO") or "INFO").upper(),
            max_direct_upload_bytes=int_setting(
                e, "MAX_DIRECT_UPLOAD_BYTES", 4 * 1024 * MIB, minimum=1024
            ),
            google_cloud_project=e.get("GOOGLE_CLOUD_PROJECT", "").strip() or None,
            database_secret_arn=e.get("DATABASE_SECRET_ARN", "").strip() or None,
            db_tls=(e.get("DB_TLS", "off").strip().lower() or "off"),
            db_prepared_statements=bool_setting(e, "DB_PREPARED_STATEMENTS", True),
            idempotency_secret=_idempotency_secret(e),
            origin_verify_secret=_origin_verify_secret(e),
            idempotency_lease_seconds=int_setting(e, "IDEMPOTENCY_LEASE_SECONDS", 60, minimum=5),
            erase_deadline_seconds=_float(e, "ERASE_DEADLINE_SECONDS", 20.0),
            job_queue=_choice(JobQueueKind, e, "JOB_QUEUE", JobQueueKind.POSTGRES),
            job_queue_url=_optional_url(e, "JOB_QUEUE_URL"),
            cloud_tasks_queue=e.get("CLOUD_TASKS_QUEUE", "").strip() or None,
            tasks_target_url=_optional_url(e, "TASKS_TARGET_URL"),
            tasks_service_account=e.get("TASKS_SERVICE_ACCOUNT", "").strip() or None,
            tasks_audience=e.get("TASKS_AUDIENCE", "").strip() or None,
            tasks_certs_url=_optional_url(e, "TASKS_CERTS_URL") or GOOGLE_OIDC_CERTS_URL,
            job_wait_max_seconds=int_setting(e, "JOB_WAIT_MAX_SECONDS", 25),
            job_lease_seconds=int_setting(e, "JOB_LEASE_SECONDS", 60, minimum=2),
            job_max_attempts=int_setting(e, "JOB_MAX_ATTEMPTS", 3, minimum=1),
            job_timeout_seconds=_float(e, "JOB_TIMEOUT_SECONDS", 3300.0),
        )
        if settings.db_tls not in DB_TLS_MODES:
            raise SettingsError(f"DB_TLS must be one of {', '.join(DB_TLS_MODES)}")
        if settings.mp3_bitrate_kbps not in MP3_BITRATES_MPEG1:
            raise SettingsError(
                f"MP3_BITRATE_KBPS must be one of {', '.join(map(str, MP3_BITRATES_MPEG1))}"
            )
        if settings.presign_expires_seconds > 7 * 24 * 3600:
            raise SettingsError("PRESIGN_EXPIRES_SECONDS must be at most 604800 (7 days)")
        return settings


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


def _discover_ffmpeg() -> str:
    return shutil.which("ffmpeg") or "ffmpeg"


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
        if any(env.get(name) for name in CLOUD_MARKERS):
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
