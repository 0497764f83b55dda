"""The native stack as tests and ``make bench`` run it: on free ports, in a directory of its own.

:mod:`devstack.native` is the user's tool (``make dev``, fixed ports); what only tests and the
benchmark need lives here: ports the OS hands out, a data directory PostgreSQL can enter, and
restarting one function with other settings.
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from devstack.native import NativeStack, Ports, StackError, port_free

# SeaweedFS binds each of its ports + 10000 as well, for gRPC.
GRPC_OFFSET = 10000


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports() -> Ports:
    """A port for every server of one stack, each different, none on another's gRPC port."""
    # None of them is bound yet, so the OS may hand one out twice: only this bookkeeping
    # keeps two servers off one port.
    taken: set[int] = set()

    def pick(grpc: bool = False) -> int:
        for _ in range(100):
            port = free_port()
            wanted = {port, port + GRPC_OFFSET} if grpc else {port}
            if wanted & taken or (
                grpc and (port + GRPC_OFFSET > 65535 or not port_free(port + GRPC_OFFSET))
            ):
                continue
            taken.update(wanted)
            return port
        raise StackError("no free port found")

    return Ports(
        s3=pick(grpc=True),
        weed_master=pick(grpc=True),
        weed_volume=pick(grpc=True),
        weed_filer=pick(grpc=True),
        weed_admin=pick(grpc=True),
        router=pick(),
        create_user=pick(),
        upload_record=pick(),
        get_record=pick(),
        postgres=pick(),
        weed_webdav=pick(),
    )


def make_data_dir(prefix: str) -> Path:
    """A new temporary directory for a stack's data."""
    # Not pytest's tmp_path: PostgreSQL runs as the 'postgres' user when tests run as root,
    # and it must be able to enter the directory.
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


class ScratchStack(NativeStack):
    """A :class:`NativeStack` that tests may reconfigure while it runs."""

    def restart_function(self, name: str, env: Mapping[str, str] | None = None) -> None:
        """Restart one function with extra environment (tests switch modes this way)."""
        self.stop_process(name)
        self.start_function(name, env)
        self.wait_healthy(60)

    @contextmanager
    def download_mode(self, mode: str) -> Iterator[str]:
        """get_record in DOWNLOAD_MODE ``mode`` while the block runs (accel is the stack's own)."""
        if mode == "accel":
            yield mode
            return
        self.restart_function("get_record", {"DOWNLOAD_MODE": mode})
        try:
            yield mode
        finally:
            self.restart_function("get_record")
