"""The results: the table printed at the end, and ``bench/results.md`` with the machine."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import psutil

from bench import ROOT
from bench.core import Bench
from devstack import FUNCTIONS, NativeStack
from devstack import ffmpeg as minimal_ffmpeg

RESULTS = ROOT / "bench" / "results.md"


def _version(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout or done.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def _package(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def machine_description() -> list[str]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), "?")
    ram = psutil.virtual_memory().total
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or "weed"
    pkg = _package
    return [
        f"CPU: {model}, {os.cpu_count()} cores; RAM: {ram / 1024**3:.1f} GiB; "
        f"kernel {platform.release()} ({platform.machine()})",
        f"Python {platform.python_version()}; functions-framework {pkg('functions-framework')}, "
        f"granian {pkg('granian')}, SQLAlchemy {pkg('sqlalchemy')}, pg8000 {pkg('pg8000')}, "
        f"boto3 {pkg('boto3')}",
        f"bare baseline: {_version(['ffmpeg', '-version'])}; {_version(['nginx', '-v'])}; "
        f"{_version(['postgres', '--version'])}; SeaweedFS {_version([weed, 'version'])}; "
        f"{_version(['wrk', '-v'])}",
    ]


def server_settings(stack: NativeStack) -> str:
    """Each function's processes and threads, as common.platform.serve resolves them."""
    from common.platform.serve import ServerConfig

    parts = []
    for name in FUNCTIONS:
        config = ServerConfig.from_env(stack.function_env(name))
        parts.append(f"{name} WORKERS={config.workers} THREADS={config.threads}")
    ffmpeg = stack.function_env("upload_record").get("FFMPEG_BINARY")
    if ffmpeg and Path(ffmpeg).resolve() == minimal_ffmpeg.BINARY.resolve():
        shown = f"{minimal_ffmpeg.BINARY.relative_to(ROOT)} (the image's minimal static build)"
    else:
        shown = f"{ffmpeg or shutil.which('ffmpeg') or 'ffmpeg'} (not the minimal build)"
    parts.append(f"upload_record's ffmpeg: {shown}")
    return "; ".join(parts)


def render(bench: Bench, settings: str, started: datetime, elapsed: float) -> str:
    header = ["figure", "measured", "target", "ratio to target", "met"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in bench.rows]
    noise = bench.noise
    busy = ", ".join(f"{k} {v:.2f}" for k, v in noise.samples.items())
    out = [
        f"Run {started:%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s"
        + (" — SMOKE RUN (tiny sizes: the figures mean nothing)" if bench.plan.smoke else ""),
        "",
        *lines,
        "",
        'Ratio to target: measured / target (above 1 is over a "≤" or "<" limit, '
        'below 1 is under a "≥" floor).',
        "",
        "Machine:",
        "",
        *(f"- {x}" for x in machine_description()),
        f"- Server settings (the stack's defaults): {settings}",
        f"- Load average (1 min) at start {noise.load_start:.2f}, at end {noise.load_end:.2f}; "
        f"CPU used by other work on the machine during each measurement, in cores "
        f"(of {os.cpu_count()}): {busy or 'n/a'}",
        "",
        "Details:",
        "",
        *(f"- {x}" for x in bench.details),
    ]
    return "\n".join(out) + "\n"


def print_table(bench: Bench) -> None:
    widths = [58, 34, 16, 6, 12]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(
        ["figure", "measured", "target", "ratio", "met"], widths, strict=True)))  # fmt: skip
    for row in bench.rows:
        print("  ".join(c.ljust(w) for c, w in zip(row.cells(), widths, strict=True)))
    print()


def write_results(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Benchmark results (`make bench`)\n\n" + text)
