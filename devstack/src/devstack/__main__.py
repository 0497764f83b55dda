"""``make dev`` (``python -m devstack``): the native stack in the foreground until Ctrl-C.

``--install-tools`` only installs ffmpeg and nginx and builds the minimal ffmpeg (``make tools``);
``--free-ports`` listens on ports the OS hands out instead of the fixed ones (its end-to-end test).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from devstack.native import ROOT, NativeStack, Ports, StackError, install_tools, log
from devstack.scratch import free_ports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR", str(ROOT / ".data")))
    parser.add_argument(
        "--install-tools",
        action="store_true",
        help="only install ffmpeg and nginx if missing and build the minimal ffmpeg",
    )
    parser.add_argument(
        "--free-ports", action="store_true", help="listen on free ports instead of the fixed ones"
    )
    args = parser.parse_args(argv)
    if args.install_tools:
        try:
            install_tools()
        except StackError as exc:
            log(f"error: {exc}")
            return 1
        return 0
    ports = free_ports() if args.free_ports else Ports(router=int(os.environ.get("PORT", "8080")))
    stack = NativeStack(
        Path(args.data_dir).resolve(),
        ports=ports,
        database_url=os.environ.get("DATABASE_URL") or None,
        workers=int(os.environ["WORKERS"]) if os.environ.get("WORKERS") else None,
        threads=int(os.environ["THREADS"]) if os.environ.get("THREADS") else None,
    )
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        stack.start()
        env_file = stack.write_env_file()
        log(f"connection settings for tools (psql, alembic, boto3): {env_file}")
        log(f"ready: router on {stack.base_url} (logs in {stack.logs}); Ctrl-C stops everything")
        while not stopping:
            stack.check_alive()
            time.sleep(0.5)
    except StackError as exc:
        log(f"error: {exc}")
        stack.stop()
        return 1
    log("stopping")
    stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
