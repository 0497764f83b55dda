"""The benchmark's command line and the order of its steps."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from bench import ROOT
from bench.client import Client
from bench.cold_starts import measure_cold_starts
from bench.core import MIB, Bench, Plan, audio_bytes, log
from bench.images import measure_images
from bench.report import RESULTS, print_table, render, server_settings, write_results
from bench.sampling import CpuMeter
from bench.slow_clients import run as slow_clients
from bench.small import measure_small_requests, measure_stalls
from bench.uploads import measure_latency, measure_memory, measure_throughput, write_wav
from bench.voice_notes import run as voice_notes
from bench.wrk import ensure_wrk
from devstack import NativeStack, StackError, free_ports, make_data_dir

Step = Callable[[Bench], None]
# The measurements, in the order they run (--only picks some; a partial run writes no results).
STEPS = (
    "latency", "throughput", "memory", "small", "stalls", "voice_notes", "slow_clients", "images",
    "cold_starts",
)  # fmt: skip
# step -> what must run for it (stalls downloads the record that small uploads).
MEASUREMENTS: list[tuple[frozenset[str], Step]] = [
    (frozenset({"latency"}), measure_latency),
    (frozenset({"throughput"}), measure_throughput),
    (frozenset({"memory"}), measure_memory),
    (frozenset({"small", "stalls"}), measure_small_requests),
    (frozenset({"stalls"}), measure_stalls),
    (frozenset({"voice_notes"}), lambda bench: bench.rows.extend(voice_notes(bench))),
    (frozenset({"slow_clients"}), lambda bench: bench.rows.extend(slow_clients(bench))),
]


def settle_disk() -> None:
    """Write back what the previous step left dirty before the next one starts.

    The memory step stores the MP3 of a 1 GiB WAV, and the kernel's write-back of it stalls
    PostgreSQL's commit fsyncs: the next step would measure that, not itself.
    """
    start = time.monotonic()
    os.sync()
    if (took := time.monotonic() - start) > 0.5:
        log(f"waited {took:.1f} s for the previous step's data to reach the disk")


def measure(plan: Plan, steps: frozenset[str], stack: NativeStack, workdir: Path) -> Bench:
    """Start ``stack`` and run ``steps`` on it; the rows and details are in the result."""
    if steps & {"small", "stalls"}:
        ensure_wrk()  # before minutes of other measurements, not after
    log(f"starting the native stack in {stack.data_dir}")
    stack.start(timeout=180)
    client = Client("127.0.0.1", stack.ports.router)
    load_start = os.getloadavg()[0]
    user = client.create_user()
    wav = workdir / "in.wav"
    wav_size = write_wav(wav, audio_bytes(plan.wav_seconds))
    log(f"{wav_size / MIB:.0f} MiB WAV ({plan.wav_seconds:g} s) written for the upload runs")
    ours = CpuMeter(lambda: [os.getpid(), *(p.pid for p in stack.processes.values())])
    bench = Bench(plan, stack, client, user, workdir, wav, ours)
    bench.noise.load_start = load_start
    for wanted, step in MEASUREMENTS:
        if steps & wanted:
            settle_disk()
            step(bench)
    if "images" in steps:
        measure_images(bench)
    if "cold_starts" in steps:
        measure_cold_starts(bench)
    bench.noise.load_end = os.getloadavg()[0]
    client.close()
    return bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="make bench")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds each")
    parser.add_argument("--out", help=f"results file (default {RESULTS.relative_to(ROOT)}; "
                        "smoke runs write none unless given)")  # fmt: skip
    parser.add_argument(
        "--wait-quiet", type=float, default=0.0, metavar="SECONDS",
        help="first wait up to SECONDS for the 1-minute load average to drop below 0.5",
    )  # fmt: skip
    parser.add_argument(
        "--only", metavar="STEP[,STEP]", default="",
        help=f"run only these measurements ({', '.join(STEPS)}); writes no results file "
        "unless --out is given",
    )  # fmt: skip
    args = parser.parse_args(argv)
    steps = frozenset(x.strip() for x in args.only.split(",") if x.strip()) or frozenset(STEPS)
    if unknown := steps - set(STEPS):
        parser.error(f"unknown step(s) {', '.join(sorted(unknown))}; choose from {STEPS}")
    plan = Plan.tiny() if args.smoke else Plan()
    partial = steps != frozenset(STEPS)
    out = Path(args.out) if args.out else (None if plan.smoke or partial else RESULTS)
    deadline = time.monotonic() + args.wait_quiet
    while os.getloadavg()[0] >= 0.5 and time.monotonic() < deadline:
        log(f"waiting for a quiet machine (load {os.getloadavg()[0]:.2f})")
        time.sleep(10)
    started = datetime.now(UTC)
    t0 = time.monotonic()
    workdir = make_data_dir("records-bench-")
    data_dir = workdir / "stack"
    data_dir.mkdir()
    data_dir.chmod(0o755)  # PostgreSQL runs as 'postgres' under root and must enter it
    extra_env = {
        # Room for the 1 GiB WAV of the memory measurement (the default is 256 MiB).
        "MAX_UPLOAD_BYTES": str(plan.memory_large + 2 * MIB),
        # wrk's connections come from one address and stand for many clients: the router's
        # per-client rate limit would answer them 429.
        "RATE_LIMIT_RPS": "1000000",
        "RATE_LIMIT_BURST": "1000000",
    }
    stack = NativeStack(data_dir, ports=free_ports(), extra_env=extra_env)
    try:
        bench = measure(plan, steps, stack, workdir)
        settings = server_settings(stack)
    except (StackError, RuntimeError, subprocess.CalledProcessError, OSError) as exc:
        log(f"error: {exc}")
        for name in ("upload_record", "create_user", "get_record", "nginx"):
            logfile = stack.logs / f"{name}.log"
            if logfile.exists():
                log(f"--- {name}.log (tail)\n{logfile.read_text(errors='replace')[-1500:]}")
        return 1
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(bench)
    if out is not None:
        write_results(out, render(bench, settings, started, time.monotonic() - t0))
        log(f"results written to {out}")
    if plan.smoke:
        return 0  # the smoke run proves the command works; its figures are not judged
    return 0 if all(row.met is not False for row in bench.rows) else 2
