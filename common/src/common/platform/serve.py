"""The HTTP server of a function: ``python -m common.platform.serve`` (what the containers run).

functions-framework builds the function's WSGI app (``functions_framework.create_app``: the
same seam its own CLI, the Lambda adapter and the tests use); granian serves it rather than
functions-framework's default gunicorn: granian parses, writes and reads bodies in Rust
(docs/performance.md). Its settings are :class:`~common.settings.ServerSettings` (``PORT``,
``HOST``, ``WORKERS``, ``THREADS``; per-function defaults in :data:`SERVER_DEFAULTS`).
upload_record is served through :mod:`common.platform.bridge` (granian's ASGI interface).
Shutdown (SIGTERM): granian stops accepting and lets requests in flight finish; after
``SHUTDOWN_DRAIN_SECONDS`` the uploads still running are answered 503 (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any

from common.platform.entrypoint import TARGETS, check_target, function_source
from common.platform.memory import tune_malloc
from common.settings import ServerSettings, SettingsError

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
# After the drain, what an aborted upload needs to answer 503 and abort its multipart upload;
# a worker still running then is killed (granian's workers_kill_timeout).
ABORT_SECONDS = 2.0
# Sent by the server process to its workers when the drain is over: stop the uploads.
ABORT_SIGNAL = signal.SIGUSR1


@dataclass(frozen=True, slots=True)
class ServerConfig:
    target: str
    source: str
    host: str
    port: int
    workers: int
    threads: int
    drain_seconds: float

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ServerConfig:
        target = check_target(env, TARGETS)
        server = ServerSettings.from_env(env)
        workers, threads = SERVER_DEFAULTS[target]
        return cls(
            target=target,
            source=function_source(target, env),
            host=server.host,
            port=server.port,
            workers=server.workers or workers,
            threads=server.threads or threads,
            drain_seconds=server.shutdown_drain_seconds,
        )

    @property
    def kill_timeout(self) -> int:
        """Seconds from SIGTERM until granian kills a worker still running."""
        return math.ceil(self.drain_seconds + ABORT_SECONDS)


def load_app(source_and_target: str) -> Callable[..., Any]:
    """The function's WSGI app; runs in each worker process (granian's target loader)."""
    source, _, target = source_and_target.rpartition("::")
    import functions_framework

    tune_malloc()  # per worker process (idempotent): before its buffers and threads exist

    app: Callable[..., Any] = functions_framework.create_app(  # type: ignore[no-untyped-call]
        target, source, signature_type="http"
    )
    settle(target)
    if is_bridged(target, os.environ):
        from common.platform.bridge import BodyPace, WsgiBridge
        from common.settings import get_settings

        settings = get_settings()
        threads = ServerSettings.from_env().threads or SERVER_DEFAULTS[target][1]
        pace = BodyPace(
            settings.body_grace_seconds,
            settings.body_min_bytes_per_second,
            settings.body_deadline_seconds,
        )
        app = WsgiBridge(app, threads, pace)
    # granian keeps SIGTERM to itself in its workers (it stops accepting and waits for the
    # requests in flight): the end of the drain comes as a signal of its own.
    signal.signal(ABORT_SIGNAL, _abort_requests)
    return app


def _abort_requests(_signum: int, _frame: FrameType | None) -> None:
    # In a thread: a handler runs between two bytecodes of the main thread, which may hold the
    # very locks (logging's, a Stop's) that the abort takes.
    threading.Thread(target=_stop_conversions, name="shutdown-abort", daemon=True).start()


def _stop_conversions() -> None:
    """The drain is over: every conversion still running (an upload, a pushed job) ends with
    a 503 and discards its partial MP3; what else is in flight finishes or is killed."""
    from common.domain.conversion import stop_conversions
    from common.errors import ServerStopping
    from common.settings import get_settings

    stopped = stop_conversions(ServerStopping(get_settings().retry_after_seconds))
    logging.getLogger(__name__).warning("shutdown: %d conversions aborted", stopped)


# The functions whose routes use the bucket: their clients are made before the first request.
USES_STORAGE = frozenset({"upload_record", "get_record"})


def settle(target: str) -> None:
    """Create the process's clients before the first request, then freeze what exists.

    The first request no longer pays for the database pool or, where the function uses the
    bucket, its botocore clients; and the objects of Flask and botocore's service model leave
    the garbage collector's reach: a full collection over them stalls every request in the
    process (docs/performance.md, "Server").
    """
    from common.platform.runtime import get_services

    services = get_services()
    if target in USES_STORAGE:
        services.storage.prepare()
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
        # SIGTERM: granian stops accepting, lets the requests in flight finish, and kills a
        # worker still running this long after; drain_deadline aborts the uploads before.
        workers_kill_timeout=config.kill_timeout,
        websockets=False,
        log_level=LogLevels.warning,
    )


def drain_deadline(drain_seconds: float) -> Callable[[], None]:
    """A startup hook for the server process: its first SIGTERM or SIGINT also starts a
    timer that sends :data:`ABORT_SIGNAL` to the workers after ``drain_seconds``.

    It wraps granian's own handlers, which it installs just before its startup hooks run.
    """

    def install() -> None:
        started = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            granian_handler = signal.getsignal(signum)

            def handler(
                number: int, frame: FrameType | None, previous: Any = granian_handler
            ) -> None:
                if not started.is_set():
                    started.set()
                    timer = threading.Timer(drain_seconds, _abort_workers)
                    timer.daemon = True
                    timer.start()
                if callable(previous):
                    previous(number, frame)

            signal.signal(signum, handler)

    return install


def _abort_workers() -> None:
    for worker in multiprocessing.active_children():
        if worker.pid is not None:
            with contextlib.suppress(ProcessLookupError):  # it has finished already
                os.kill(worker.pid, ABORT_SIGNAL)


def main() -> None:
    try:
        config = ServerConfig.from_env(os.environ)
    except SettingsError as exc:
        sys.exit(str(exc))
    tune_malloc()
    server = build_server(config)
    server.on_startup(drain_deadline(config.drain_seconds))
    server.serve(target_loader=load_app)


if __name__ == "__main__":
    main()
