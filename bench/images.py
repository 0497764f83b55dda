"""Figure 6: each function image's size and cold start, from the compose stack's image report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

from bench.core import Bench, Row, log

# It measures the images of the running compose stack (make up).
IMAGE_MODULE = "devstack.images"


def measure_images(bench: Bench) -> None:
    """Rows from the compose stack's image report (devstack.images), or why there are none."""
    reason = ""
    if shutil.which("docker") is None:
        reason = "no docker command on this machine"
    elif subprocess.run(["docker", "info"], capture_output=True, check=False).returncode:
        reason = "no Docker engine reachable"
    reports: list[dict[str, Any]] = []
    if not reason:
        log(f"6. image sizes and cold starts with python -m {IMAGE_MODULE}")
        done = subprocess.run(
            [
                sys.executable, "-m", IMAGE_MODULE, "--json", "--runs", str(bench.plan.rounds),
                "--project", os.environ.get("COMPOSE_PROJECT_NAME", "record-service"),
            ],
            capture_output=True, text=True, timeout=1800, check=False,
        )  # fmt: skip
        reports = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
        if not reports:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            reason = f"{IMAGE_MODULE} measured nothing ({tail[:120]}; the compose stack "
            reason += "must be up: make up)"
    if reason:
        for figure, target in (
            ("6a. function image size", "≤ 250 MB"),
            ("6b. docker run to first 200", "< 2 s"),
        ):
            bench.rows.append(Row(figure, f"not measured: {reason}", target, None, None))
        return
    for r in reports:
        size = r["size_bytes"] / 1e6
        start = r["best_start_seconds"]
        bench.rows.append(
            Row(f"6a. {r['function']} image size", f"{size:.0f} MB", "≤ 250 MB",
                size / 250, size <= 250)
        )  # fmt: skip
        bench.rows.append(
            Row(f"6b. {r['function']} docker run to first 200 (best)", f"{start:.2f} s",
                "< 2 s", start / 2, start < 2)
        )  # fmt: skip
