"""common.platform.serve: the server settings each function container starts with."""

from __future__ import annotations

from typing import Any

import pytest
from common.platform.serve import SERVER_DEFAULTS, ServerConfig
from common.settings import ServerSettings, SettingsError


def test_defaults_follow_the_function() -> None:
    small = ServerConfig.from_env({"FUNCTION_TARGET": "create_user"})
    upload = ServerConfig.from_env({"FUNCTION_TARGET": "upload_record"})
    assert (small.workers, small.threads) == SERVER_DEFAULTS["create_user"]
    assert (upload.workers, upload.threads) == SERVER_DEFAULTS["upload_record"]
    assert (small.host, small.port) == ("0.0.0.0", 8080)
    assert upload.source.endswith("/functions/upload_record/main.py")


def test_platform_variables_win() -> None:
    config = ServerConfig.from_env(
        {
            "FUNCTION_TARGET": "get_record",
            "FUNCTION_SOURCE": "/elsewhere/main.py",
            "PORT": "9090",
            "HOST": "127.0.0.1",
            "WORKERS": "3",
            "THREADS": "16",
        }
    )
    assert config == ServerConfig("get_record", "/elsewhere/main.py", "127.0.0.1", 9090, 3, 16, 7.0)


def test_the_shutdown_fits_in_cloud_runs_grace() -> None:
    """SIGTERM to SIGKILL is 10 s on Cloud Run (and `docker stop`'s default): the drain, then
    the abort of what still runs, must both end before it."""
    config = ServerConfig.from_env({"FUNCTION_TARGET": "upload_record"})
    assert config.drain_seconds == ServerSettings().shutdown_drain_seconds == 7.0
    assert config.kill_timeout == 9 < 10
    longer = ServerConfig.from_env(
        {"FUNCTION_TARGET": "upload_record", "SHUTDOWN_DRAIN_SECONDS": "25.5"}
    )
    assert longer.kill_timeout == 28


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "FUNCTION_TARGET must be one of"),
        ({"FUNCTION_TARGET": "delete_everything"}, "FUNCTION_TARGET must be one of"),
        ({"FUNCTION_TARGET": "create_user", "WORKERS": "two"}, "WORKERS must be an integer"),
        ({"FUNCTION_TARGET": "create_user", "THREADS": "0"}, "THREADS must be at least 1"),
        ({"FUNCTION_TARGET": "create_user", "PORT": "-1"}, "PORT must be at least 1"),
        (
            {"FUNCTION_TARGET": "create_user", "SHUTDOWN_DRAIN_SECONDS": "0"},
            "SHUTDOWN_DRAIN_SECONDS must be positive",
        ),
    ],
)
def test_bad_settings_are_refused_with_the_reason(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        ServerConfig.from_env(env)


@pytest.mark.parametrize(
    ("target", "made"),
    [("upload_record", ["internal", "public"]), ("get_record", ["internal", "public"]),
     ("create_user", [])],
)  # fmt: skip
def test_a_server_makes_the_bucket_clients_before_its_first_request(
    target: str, made: list[str]
) -> None:
    """settle: a function that uses the bucket makes its clients at start (then frozen out of
    the collector's reach); create_user, which never does, makes none."""
    from typing import cast

    from common.adapters.db import Database
    from common.adapters.storage import Storage
    from common.platform.runtime import Services, set_services
    from common.platform.serve import settle
    from common.settings import Settings

    calls: list[str] = []

    def factory(name: str) -> Any:
        def make() -> object:
            calls.append(name)
            return object()

        return make

    storage = Storage(factory("internal"), "records", part_size=5 << 20,
                      presign_client=factory("public"))  # fmt: skip
    set_services(Services(Settings(), cast(Database, object()), storage))
    try:
        settle(target)
    finally:
        set_services(None)
    assert calls == made
