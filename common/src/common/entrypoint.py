"""Container entry point: ``python -m common.entrypoint``.

Serves the function named by ``FUNCTION_TARGET`` (create_user, upload_record or get_record)
under functions-framework on ``$PORT`` (default 8080), from ``FUNCTION_SOURCE`` (default
``<app>/functions/<target>/main.py``). One image per function sets FUNCTION_TARGET.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TARGETS = ("create_user", "upload_record", "get_record")
APP_DIR = Path(os.environ.get("APP_DIR", "/app"))


def main() -> None:
    target = os.environ.get("FUNCTION_TARGET", "")
    if target not in TARGETS:
        sys.exit(f"FUNCTION_TARGET must be one of {', '.join(TARGETS)}, got {target!r}")
    source = os.environ.get("FUNCTION_SOURCE") or str(APP_DIR / "functions" / target / "main.py")
    port = os.environ.get("PORT", "8080")
    argv = [
        sys.executable, "-m", "functions_framework", "--target", target, "--source", source,
        "--host", os.environ.get("HOST", "0.0.0.0"), "--port", port,
    ]  # fmt: skip
    os.execv(sys.executable, argv)  # noqa: S606 - fixed argv, no shell


if __name__ == "__main__":
    main()
