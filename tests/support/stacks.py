"""Stacks of their own for the tests that reconfigure or break one, and what runs inside them."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

from devstack import NativeStack, ScratchStack, free_ports, make_data_dir


@contextmanager
def running_stack(prefix: str, extra_env: dict[str, str] | None = None) -> Iterator[ScratchStack]:
    """A native stack of its own, on free ports in a new directory; stopped and removed after.

    KEEP_TEST_DATA=1 keeps the directory (logs, data) for a look after a failure.
    """
    data_dir = make_data_dir(prefix)
    native = ScratchStack(
        data_dir, ports=free_ports(), workers=1, threads=8, extra_env=dict(extra_env or {})
    )
    native.start(timeout=120)
    try:
        yield native
    finally:
        native.stop()
        if not os.environ.get("KEEP_TEST_DATA"):
            shutil.rmtree(data_dir, ignore_errors=True)


def ffmpeg_descendants(stack: NativeStack) -> list[int]:
    """Pids of the ffmpeg processes started by the stack's upload function."""
    root = psutil.Process(stack.processes["upload_record"].pid)
    found = []
    for child in root.children(recursive=True):
        try:
            if child.name() == "ffmpeg":
                found.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return found
