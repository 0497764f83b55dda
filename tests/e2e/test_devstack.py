"""End to end: the `make dev` program itself starts the stack and stops every process on SIGTERM."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from devstack import make_data_dir


def processes_using(data: Path) -> list[str]:
    """Processes of the stack in ``data``: by their command line or their credentials."""
    marker = json.loads((data / "credentials.json").read_text())["s3_access_key"].encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if str(data).encode() in args or marker in environ:
            command = args.replace(b"\0", b" ")[:100].decode(errors="replace")
            found.append(f"{proc.name}: {command}")
    return found


def wait_for_ready(proc: subprocess.Popen[str], timeout: float) -> str:
    """The router URL from devstack's "ready" line; its stderr is drained by a thread."""
    assert proc.stderr is not None
    lines: queue.Queue[str] = queue.Queue()
    stderr = proc.stderr

    def pump() -> None:
        for line in stderr:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        seen.append(line)
        match = re.search(r"ready: router on (http://\S+)", line)
        if match:
            return match.group(1)
    raise AssertionError("devstack did not report ready:\n" + "".join(seen[-30:]))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_devstack_serves_and_stops_everything(sig: signal.Signals) -> None:
    data = make_data_dir("records-devstack-")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devstack",  # make dev's command, on free ports
            "--free-ports",
            "--data-dir",
            str(data),
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
    )
    try:
        base = wait_for_ready(proc, 120)
        response = requests.post(f"{base}/users", json={"name": "Dev"}, timeout=10)
        assert response.status_code == 201
        env_file = (data / "dev.env").read_text()
        assert "DATABASE_URL=postgresql+pg8000://" in env_file
        assert processes_using(data), "the stack's processes should be running"
        proc.send_signal(sig)
        assert proc.wait(60) == 0
        deadline = time.monotonic() + 10
        while processes_using(data) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert processes_using(data) == []
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{base}/healthz", timeout=2)
    finally:
        if proc.poll() is None:  # a failed check: still stop the stack the way a user would
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(data, ignore_errors=True)
