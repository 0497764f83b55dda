"""A database that hangs up during the connection's handshake: a 503, never a raw socket error,
and the job worker keeps polling instead of dying."""

from __future__ import annotations

import dataclasses
import socket
import threading
from collections.abc import Iterator

import pytest
from common.adapters.db import Database, sql
from common.errors import DependencyUnavailable
from common.platform import worker
from common.platform.runtime import Services
from common.settings import Settings


@pytest.fixture
def hanging_up_server() -> Iterator[int]:
    """A TCP server that accepts each connection and closes it at once (RST)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def settings_for(port: int) -> Settings:
    return Settings.from_env(
        {
            "DATABASE_URL": f"postgresql+pg8000://records:x@127.0.0.1:{port}/records",
            "DB_CONNECT_TIMEOUT_SECONDS": "2",
            "S3_ENDPOINT_URL": "http://127.0.0.1:9",
        }
    )


def test_hang_up_during_connect_is_dependency_unavailable(hanging_up_server: int) -> None:
    db = Database.from_settings(settings_for(hanging_up_server))
    for _ in range(3):
        with pytest.raises(DependencyUnavailable) as raised:
            db.execute(sql("SELECT 1"))
        # No connection was made: the statement cannot have run, so a write's companion (an
        # uploaded MP3) may be removed.
        assert raised.value.outcome_unknown is False


def test_worker_survives_a_database_that_hangs_up(hanging_up_server: int) -> None:
    settings = settings_for(hanging_up_server)
    services = Services.from_settings(dataclasses.replace(settings))
    for _ in range(3):
        worker.serve(services, once=True)  # logs the outage and returns; never raises
