"""Unit tests of the settings read from the environment (common.settings)."""

from __future__ import annotations

import ast
import dataclasses
import ssl
from pathlib import Path

import pytest
from common.settings import (
    DatabaseLogin,
    DownloadMode,
    ServerSettings,
    Settings,
    SettingsError,
    app_dir,
    normalise_database_url,
)

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_safe_for_the_local_stack() -> None:
    s = Settings.from_env({"FFMPEG_BINARY": "/usr/bin/ffmpeg"})
    assert s.database_url.startswith("postgresql+pg8000://")
    assert s.max_upload_bytes == 256 * 1024 * 1024
    assert s.mp3_bitrate_kbps == 192
    assert s.download_mode is DownloadMode.STREAM
    assert s.s3_bucket == "records"
    assert s.s3_endpoint_url is None  # AWS itself unless configured
    assert s.public_base_url is None
    assert s.db_prepared_statements is True


def test_values_are_read_and_typed() -> None:
    s = Settings.from_env(
        {
            "DATABASE_URL": "postgres://u:p@db:5432/x",
            "MAX_UPLOAD_BYTES": "1048576",
            "MP3_BITRATE_KBPS": "128",
            "DOWNLOAD_MODE": "Redirect",
            "S3_ENDPOINT_URL": "http://storage:8333/",
            "PUBLIC_BASE_URL": "https://records.example.com/",
            "FFMPEG_BINARY": "ffmpeg",
            "DB_PREPARED_STATEMENTS": "False",
        }
    )
    assert s.db_prepared_statements is False
    assert s.database_url == "postgresql+pg8000://u:p@db:5432/x"
    assert s.max_upload_bytes == 1048576
    assert s.mp3_bitrate_kbps == 128
    assert s.download_mode is DownloadMode.REDIRECT
    assert s.s3_endpoint_url == "http://storage:8333"
    assert s.public_base_url == "https://records.example.com"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MAX_UPLOAD_BYTES", "lots", "must be an integer"),
        ("MAX_UPLOAD_BYTES", "10", "at least"),
        ("MP3_BITRATE_KBPS", "100", "must be one of"),
        ("DOWNLOAD_MODE", "teleport", "'stream', 'redirect' or 'accel'"),
        ("S3_ENDPOINT_URL", "storage:8333", "http"),
        ("CONVERT_TIMEOUT_SECONDS", "-1", "positive"),
        ("DATABASE_URL", "mysql://x", "postgresql"),
        ("PRESIGN_EXPIRES_SECONDS", "999999999", "7 days"),
        ("DB_PREPARED_STATEMENTS", "sometimes", "true or false"),
    ],
)
def test_bad_values_refuse_to_start(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({name: value, "FFMPEG_BINARY": "ffmpeg"})


def test_database_url_driver_is_pg8000() -> None:
    assert normalise_database_url("postgresql://a@h/d") == "postgresql+pg8000://a@h/d"
    assert normalise_database_url("postgresql+pg8000://a@h/d") == "postgresql+pg8000://a@h/d"


def test_credentials_are_read_but_never_shown() -> None:
    s = Settings.from_env(
        {
            "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
            "AWS_SECRET_ACCESS_KEY": "s3cr3t",
            "FFMPEG_BINARY": "x",
        }
    )
    assert s.aws_access_key_id == "AKIAEXAMPLE"
    assert s.aws_secret_access_key == "s3cr3t"
    assert s.aws_session_token is None
    assert "s3cr3t" not in repr(s)
    assert "AKIAEXAMPLE" not in repr(s)


def test_idempotency_secret_is_required_in_the_clouds() -> None:
    local = Settings.from_env({"FFMPEG_BINARY": "ffmpeg"})
    assert local.idempotency_secret  # the dev default
    assert "idempotency_secret" not in repr(local)
    for marker in ("AWS_LAMBDA_FUNCTION_NAME", "K_SERVICE"):
        with pytest.raises(SettingsError, match="IDEMPOTENCY_SECRET"):
            Settings.from_env({"FFMPEG_BINARY": "ffmpeg", marker: "create-user"})
    secret = "x" * 32
    env = {"FFMPEG_BINARY": "ffmpeg", "K_SERVICE": "s", "IDEMPOTENCY_SECRET": secret}
    assert Settings.from_env(env).idempotency_secret == secret
    with pytest.raises(SettingsError, match="at least 32"):
        Settings.from_env({"FFMPEG_BINARY": "ffmpeg", "IDEMPOTENCY_SECRET": "short"})


def test_database_url_becomes_pg8000_connect_arguments() -> None:
    from common.adapters.db import connect_params

    url = "postgresql+pg8000://u:p%40ss@db.internal:6543/records?application_name=records"
    assert connect_params(url, tls="off", timeout=3.0) == {
        "user": "u",
        "password": "p@ss",
        "host": "db.internal",
        "port": 6543,
        "database": "records",
        "application_name": "records",
        "timeout": 3.0,
        "ssl_context": False,
    }
    verified = connect_params(url, tls="verify", timeout=None)["ssl_context"]
    assert verified.check_hostname and verified.verify_mode == ssl.CERT_REQUIRED
    unverified = connect_params(url, tls="require", timeout=None)["ssl_context"]
    assert not unverified.check_hostname and unverified.verify_mode == ssl.CERT_NONE


def test_db_tls_off_opens_a_plain_session_without_asking_for_tls() -> None:
    """DB_TLS=off sends the startup message first: no SSLRequest (and no CA bundle loaded)."""
    import socket
    import struct
    import threading

    from common.adapters.db import connect_params
    from pg8000 import native

    server = socket.create_server(("127.0.0.1", 0))
    first: list[int] = []

    def answer_once() -> None:
        peer, _ = server.accept()
        with peer:
            _length, code = struct.unpack("!ii", peer.recv(8, socket.MSG_WAITALL))
            first.append(code)
            # Refuse the login as a server would: an ErrorResponse, then close.
            fields = b"SFATAL\x00C28000\x00Mrefused by the test\x00\x00"
            peer.sendall(b"E" + struct.pack("!i", 4 + len(fields)) + fields)
            peer.recv(64)  # the client's Terminate

    thread = threading.Thread(target=answer_once)
    thread.start()
    port = server.getsockname()[1]
    url = f"postgresql+pg8000://u:p@127.0.0.1:{port}/records"
    with pytest.raises(native.DatabaseError, match="refused by the test"):
        native.Connection(**connect_params(url, tls="off", timeout=5.0))
    thread.join(5)
    server.close()
    assert first == [196608]  # protocol 3.0's StartupMessage; an SSLRequest is 80877103


def test_every_default_is_the_fields_own() -> None:
    """from_env of an empty environment is the dataclass's defaults: one value each, not two."""
    read = Settings.from_env({})
    assert read == dataclasses.replace(Settings(), ffmpeg_binary=read.ffmpeg_binary)


def test_migrations_read_the_database_login_with_the_same_rules() -> None:
    login = DatabaseLogin.from_env({"DATABASE_URL": "postgres://u:p@db/x", "DB_TLS": " Verify "})
    assert login == DatabaseLogin("postgresql+pg8000://u:p@db/x", "verify", None)
    settings = Settings.from_env({"DATABASE_URL": "postgres://u:p@db/x", "DB_TLS": "verify"})
    assert (settings.database_url, settings.db_tls) == (login.url, login.tls)
    with pytest.raises(SettingsError, match="DB_TLS"):
        DatabaseLogin.from_env({"DB_TLS": "sometimes"})


# The modules that may read the environment: settings, and the entry points' choice of target.
ENVIRONMENT_READERS = {
    "common/src/common/settings.py",
    "common/src/common/platform/entrypoint.py",
    "common/src/common/platform/aws_lambda.py",
    "common/src/common/platform/serve.py",
}


_READERS = {"environ", "getenv", "environb"}


def _reads_environment(source: str) -> bool:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in _READERS:
            return True
        names = {a.name for a in node.names} if isinstance(node, ast.ImportFrom) else set()
        if isinstance(node, ast.ImportFrom) and node.module == "os" and names & _READERS:
            return True
    return False


def test_only_settings_and_the_entry_points_read_the_environment() -> None:
    sources = [
        *(ROOT / "common" / "src").rglob("*.py"),
        *(ROOT / "functions").rglob("*.py"),
        *(ROOT / "migrations").rglob("*.py"),
    ]
    readers = {str(p.relative_to(ROOT)) for p in sources if _reads_environment(p.read_text())}
    assert readers <= ENVIRONMENT_READERS, readers - ENVIRONMENT_READERS
    assert _reads_environment("import os\nX = os.environ.get('A')\n")
    assert _reads_environment("from os import getenv\n")
    assert not _reads_environment("import os\nX = os.defpath\n")


def test_the_servers_deadlines_are_below_the_socket_timeout() -> None:
    from common.adapters.db import connect_params

    settings = Settings.from_env({"FFMPEG_BINARY": "ffmpeg"})
    assert settings.db_statement_timeout_seconds == 4.0  # 80 % of the 5 s socket timeout
    assert (
        Settings.from_env({"DB_CONNECT_TIMEOUT_SECONDS": "2"}).db_statement_timeout_seconds == 1.6
    )
    with pytest.raises(SettingsError, match="below DB_CONNECT_TIMEOUT_SECONDS"):
        Settings.from_env({"DB_CONNECT_TIMEOUT_SECONDS": "3", "DB_STATEMENT_TIMEOUT_SECONDS": "3"})
    params = connect_params(settings.database_url, tls="off", timeout=5.0, statement_timeout=4.0)
    assert params["startup_params"] == {
        "statement_timeout": "4000",
        "lock_timeout": "4000",
        "idle_in_transaction_session_timeout": "4000",
    }


def test_the_scheduled_jobs_need_no_idempotency_secret_on_lambda() -> None:
    """The template's SweepFunction has no IDEMPOTENCY_SECRET_ARN: its settings must load."""
    lambda_env = {"FFMPEG_BINARY": "ffmpeg", "AWS_LAMBDA_FUNCTION_NAME": "sweep"}
    for job in ("sweep", "migrate"):
        assert Settings.from_env({**lambda_env, "FUNCTION_TARGET": job}).idempotency_secret
    with pytest.raises(SettingsError, match="IDEMPOTENCY_SECRET"):
        Settings.from_env({**lambda_env, "FUNCTION_TARGET": "create_user"})


def test_server_settings_defaults_and_platform_names() -> None:
    assert ServerSettings.from_env({}) == ServerSettings(
        port=8080, host="0.0.0.0", workers=None, threads=None, app_dir="/app",
        shutdown_drain_seconds=7.0,
    )  # fmt: skip
    env = {"PORT": "9000", "HOST": "127.0.0.1", "WORKERS": "3", "THREADS": "4",
           "APP_DIR": "/srv/app", "SHUTDOWN_DRAIN_SECONDS": "2.5"}  # fmt: skip
    assert ServerSettings.from_env(env) == ServerSettings(9000, "127.0.0.1", 3, 4, "/srv/app", 2.5)
    assert app_dir(env) == "/srv/app"
    assert app_dir({}) == "/app"
    with pytest.raises(SettingsError, match="WORKERS must be at least 1"):
        ServerSettings.from_env({"WORKERS": "0"})
