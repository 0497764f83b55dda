"""The HTTP server of a function: ``python -m common.platform.serve`` (what the containers run).

functions-framework builds the function's WSGI app (``functions_framework.create_app``: the
same seam its own CLI, the Lambda adapter and the tests use); granian serves it rather than
functions-framework's default gunicorn, whose HTTP parsing, writes and body reads are Python:
granian does them in Rust and hands the body to the function as it arrives (``wsgi.input``
reads from the socket on demand). docs/performance.md has what that saves. Settings, from the
environment:

* ``FUNCTION_TARGET`` (required) and ``FUNCTION_SOURCE``, as functions-framework names them;
* ``PORT`` (default 8080) and ``HOST`` (default 0.0.0.0), as Cloud Run and ff spell them;
* ``WORKERS`` (processes) and ``THREADS`` (requests each process runs at once), ff's names,
  with defaults per function (:data:`SERVER_DEFAULTS`).

upload_record is served through :mod:`common.platform.bridge` (granian's ASGI interface): its
bodies are read with deadlines, and a slow client holds no thread while it sends its fields.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from common.platform.entrypoint import TARGETS, check_target, function_source
from common.platform.memory import tune_malloc
from common.settings import SettingsError, int_setting

# (processes, threads) per function. A small request is bound by the GIL, so one process tops
# out near one core: create_user, the busiest, runs two (the router renews its connections so
# that the kernel's split of them over the two stays even). get_record's downloads are copied
# by nginx, not Python. Two threads overlap a wait for PostgreSQL; more only contend for the
# GIL. Uploads wait on ffmpeg and I/O: one process runs many at the least memory. The runs
# these were chosen by: docs/performance.md, "Server settings".
SERVER_DEFAULTS: Mapping[str, tuple[int, int]] = {
    "create_user": (2, 2),
    "get_record": (1, 2),
    "upload_record": (1, 8),
}
# Functions served through the ASGI front of common.platform.bridge (THREADS is its pool):
# upload_record always, get_record when it streams MP3s itself (DOWNLOAD_MODE=stream), so a
# slow reader holds no thread between chunks.
BRIDGED = frozenset({"upload_record"})


def is_bridged(target: str, env: Mapping[str, str]) -> bool:
    if target in BRIDGED:
        return True
    from common.settings import DownloadMode, Settings

    return target == "get_record" and Settings.from_env(env).download_mode is DownloadMode.STREAM


# Connections waiting to be accepted; the router keeps a few dozen open to each function.
BACKLOG = 1024
# Seconds a stopping worker gets to finish its requests (an upload can take minutes).
KILL_TIMEOUT_SECONDS = 30


@dataclass(frozen=True, slots=True)
class ServerConfig:
    target: str
    source: str
    host: str
    port: int
    workers: int
    threads: int

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ServerConfig:
        target = check_target(env, TARGETS)
        source = function_source(target, env)
        workers, threads = SERVER_DEFAULTS[target]
        return cls(
            target=target,
            source=source,
            host=env.get("HOST", "") or "0.0.0.0",
            port=int_setting(env, "PORT", 8080, minimum=1),
            workers=int_setting(env, "WORKERS", workers, minimum=1),
            threads=int_setting(env, "THREADS", threads, minimum=1),
        )


def load_app(source_and_target: str) -> Callable[..., Any]:
    """The function's WSGI app; runs in each worker process (granian's target loader)."""
    source, _, target = source_and_target.rpartition("::")
    import functions_framework

    tune_malloc()  # per worker process (idempotent): before its buffers and threads exist

    app: Callable[..., Any] = functions_framework.create_app(target, source)  # type: ignore[no-untyped-call]
    settle()
    if is_bridged(target, os.environ):
        from common.platform.bridge import BodyPace, WsgiBridge
        from common.settings import get_settings

        settings = get_settings()
        threads = int_setting(os.environ, "THREADS", SERVER_DEFAULTS[target][1], minimum=1)
        pace = BodyPace(
            settings.body_grace_seconds,
            settings.body_min_bytes_per_second,
            settings.body_deadline_seconds,
        )
        return WsgiBridge(app, threads, pace)
    return app


def settle() -> None:
    """Create the process's clients before the first request, then freeze what exists.

    The first request no longer pays for the boto3 client and the database pool, and the objects
    of Flask and botocore's service model leave the garbage collector's reach: a full
    collection over them stalls every request in the process (docs/performance.md, "Server").
    """
    from common.platform.runtime import get_services

    get_services()
    gc.collect()
    gc.freeze()


def build_server(config: ServerConfig) -> Any:
    """A granian server for ``config`` (not started)."""
    from granian.constants import Interfaces
    from granian.log import LogLevels
    from granian.server import Server

    bridged = is_bridged(config.target, os.environ)
    return Server(
        f"{config.source}::{config.target}",
        address=config.host,
        port=config.port,
        interface=Interfaces.ASGINL if bridged else Interfaces.WSGI,
        workers=config.workers,
        blocking_threads=1 if bridged else config.threads,
        backlog=BACKLOG,
        # A worker that dies (killed mid-conversion, out of memory) is replaced, not fatal.
        respawn_failed_workers=True,
        respawn_interval=0.5,
        workers_kill_timeout=KILL_TIMEOUT_SECONDS,
        websockets=False,
        log_level=LogLevels.warning,
    )


def main() -> None:
    try:
        config = ServerConfig.from_env(os.environ)
    except SettingsError as exc:
        sys.exit(str(exc))
    tune_malloc()
    build_server(config).serve(target_loader=load_app)


if __name__ == "__main__":
    main()
