"""The voice-note workload: short clips uploaded concurrently, against bare ffmpeg.

The figure is uploads/s through the router over conversions/s of the same ffmpeg binary on the
same clip, measured in interleaved rounds so that other load on the machine hits both alike.

    run(bench) -> [Row]                    # a step of python -m bench (bench.run.MEASUREMENTS)
    measure(stack) -> VoiceNoteFigures     # on any started NativeStack
    python -m bench.voice_notes [--rounds N] [--seconds S]   # starts a stack of its own

docs/encoding.md, "Voice notes", has the set-up and the target.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.client import Client, User, multipart_frame
from bench.core import Bench, Row, log
from bench.sampling import machine_busy_seconds, tree_cpu_seconds
from devstack import NativeStack, free_ports, make_data_dir, wavgen

CLIP_SECONDS = 5.0
CLIENTS = 4
BARE_PROCESSES = 2
TARGET = 0.85
BITRATE_KBPS = 192  # the stack's default MP3_BITRATE_KBPS


@dataclass
class VoiceNoteFigures:
    ratio: float  # median over rounds of uploads/s / bare conversions/s
    uploads_per_second: float  # median
    bare_per_second: float  # median
    rounds: list[tuple[float, float]] = field(default_factory=list)  # (bare/s, uploads/s)
    # CPU per item (ms), summed over the rounds: less sensitive to bursts of other load than
    # the throughputs, and with both sides at full CPU their ratio is what the figure tends to
    bare_cpu_ms: float = 0.0  # one bare conversion
    upload_cpu_ms: float = 0.0  # one upload: every stack process and the clients
    load_before: float = 0.0
    load_after: float = 0.0
    other_cpu_cores: float = 0.0  # CPU used by processes outside the measurement, in cores

    @property
    def met(self) -> bool:
        return self.ratio >= TARGET

    def row(self) -> tuple[str, str, str, float, bool]:
        """(figure, measured, target, ratio to target, met): scripts/bench.py's Row fields."""
        return (
            f"7. voice notes: {CLIP_SECONDS:g}-s clips, {CLIENTS} uploads at once / bare ffmpeg "
            f"{BARE_PROCESSES} at a time (median of rounds)",
            f"{self.ratio:.2f}x ({self.uploads_per_second:.1f} vs {self.bare_per_second:.1f}/s)",
            f"≥ {TARGET:.2f}x",
            self.ratio / TARGET,
            self.met,
        )

    def details(self) -> str:
        rounds = "; ".join(f"{u:.1f}/s vs {b:.1f}/s = {u / b:.2f}x" for b, u in self.rounds)
        return (
            f"voice notes (uploads vs bare, per round): {rounds}; CPU per item: bare "
            f"{self.bare_cpu_ms:.1f} ms, upload {self.upload_cpu_ms:.1f} ms (all servers and "
            f"the clients) = {self.bare_cpu_ms / self.upload_cpu_ms:.2f}x; load average "
            f"{self.load_before:.2f} → {self.load_after:.2f}; CPU used by other work during the "
            f"rounds: {self.other_cpu_cores:.2f} cores of {os.cpu_count()}"
        )


def clip() -> bytes:
    return wavgen.wav(seconds=CLIP_SECONDS, channels=2, rate=44100, bits=16)


def _settle(roots: list[int], timeout: float = 10.0) -> None:
    """Wait until the stack is idle (under 5% of a core for 0.5 s): the store and the
    database finish what the uploads left them before the bare ffmpeg is timed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = tree_cpu_seconds(roots[1:])  # not the bench process itself
        time.sleep(0.5)
        if tree_cpu_seconds(roots[1:]) - before < 0.025:
            return


def _run_for(threads: list[threading.Thread], stop: threading.Event, seconds: float) -> float:
    """Run ``threads`` until ``stop`` is set after ``seconds``; the seconds they ran."""
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


class _Uploader:
    """Posts the clip in a loop on one keep-alive connection until told to stop."""

    def __init__(self, host: str, port: int, user: User, wav: bytes) -> None:
        head, tail, content_type = multipart_frame(user, "note.wav")
        self.body = head + wav + tail
        self.headers = {"Content-Type": content_type}
        self.host, self.port = host, port
        self.done = 0
        self.errors: list[str] = []

    def loop(self, stop: threading.Event) -> None:
        with Client(self.host, self.port, timeout=60) as client:
            while not stop.is_set():
                status, raw = client.request("POST", "/records", self.body, self.headers)
                if status != 201:
                    self.errors.append(f"{status} {raw[:200]!r}")
                    return
                self.done += 1


@dataclass
class _Cpu:
    """CPU seconds and item counts accumulated over the rounds."""

    seconds: float = 0.0
    items: int = 0

    def ms_per_item(self) -> float:
        return self.seconds / max(1, self.items) * 1000


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _children_seconds() -> float:
    times = os.times()
    return times.children_user + times.children_system


def measure_uploads(
    stack: NativeStack,
    user: User,
    wav: bytes,
    seconds: float,
    cpu: _Cpu | None = None,
) -> float:
    """Completed uploads per second with CLIENTS clients for about ``seconds``."""
    roots = [p.pid for p in stack.processes.values()]
    used = tree_cpu_seconds(roots) + _own_seconds()
    uploaders = [_Uploader("127.0.0.1", stack.ports.router, user, wav) for _ in range(CLIENTS)]
    stop = threading.Event()
    threads = [threading.Thread(target=u.loop, args=(stop,)) for u in uploaders]
    elapsed = _run_for(threads, stop, seconds)
    errors = [e for u in uploaders for e in u.errors]
    if errors:
        raise RuntimeError(f"uploads failed: {errors[:3]}")
    done = sum(u.done for u in uploaders)
    if cpu is not None:
        cpu.seconds += tree_cpu_seconds(roots) + _own_seconds() - used
        cpu.items += done
    return done / elapsed


def measure_bare(
    ffmpeg: str, wav_path: Path, workdir: Path, seconds: float, cpu: _Cpu | None = None
) -> float:
    """Conversions per second of ``ffmpeg`` run BARE_PROCESSES at a time for ``seconds``."""
    counts = [0] * BARE_PROCESSES
    used = _children_seconds()
    stop = threading.Event()

    def worker(i: int) -> None:
        out = workdir / f"bare-{i}.mp3"
        command = [
            ffmpeg, "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-threads", "1",
            "-f", "wav", "-i", str(wav_path), "-c:a", "libmp3lame", "-b:a", f"{BITRATE_KBPS}k",
            str(out),
        ]  # fmt: skip
        while not stop.is_set():
            subprocess.run(command, check=True)
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(BARE_PROCESSES)]
    elapsed = _run_for(threads, stop, seconds)
    if cpu is not None:
        cpu.seconds += _children_seconds() - used
        cpu.items += sum(counts)
    return sum(counts) / elapsed


def run(bench: Bench) -> list[Row]:
    """The voice-note step of ``python -m bench`` (``--smoke``: one short round)."""
    smoke = bench.plan.smoke
    log("voice notes: 5-s clips, 4 uploads at once against bare ffmpeg 2 at a time")
    figures = measure(bench.stack, rounds=1 if smoke else 9, seconds=1.0 if smoke else 4.0)
    bench.details.append(figures.details())
    return [Row(*figures.row())]


def measure(stack: NativeStack, *, rounds: int = 9, seconds: float = 4.0) -> VoiceNoteFigures:
    """Measure on a started ``stack``: interleaved rounds of bare ffmpeg and uploads."""
    ffmpeg = stack.function_env("upload_record").get("FFMPEG_BINARY") or (
        shutil.which("ffmpeg") or "ffmpeg"
    )
    wav = clip()
    with Client("127.0.0.1", stack.ports.router, timeout=30) as client:
        user = client.create_user("voice notes")
    roots = [os.getpid(), *(p.pid for p in stack.processes.values())]
    with tempfile.TemporaryDirectory(prefix="voice-notes-") as tmp:
        workdir = Path(tmp)
        wav_path = workdir / "note.wav"
        wav_path.write_bytes(wav)
        measure_uploads(stack, user, wav, 1.0)  # warm: connections, caches, first imports
        load_before = psutil.getloadavg()[0]
        busy0, ours0 = machine_busy_seconds(), tree_cpu_seconds(roots)
        started = time.perf_counter()
        results: list[tuple[float, float]] = []
        bare_cpu, upload_cpu = _Cpu(), _Cpu()
        for _ in range(rounds):
            _settle(roots)
            bare = measure_bare(ffmpeg, wav_path, workdir, seconds, bare_cpu)
            uploads = measure_uploads(stack, user, wav, seconds, upload_cpu)
            results.append((bare, uploads))
        elapsed = time.perf_counter() - started
        busy1, ours1 = machine_busy_seconds(), tree_cpu_seconds(roots)
    other = max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / elapsed)
    return VoiceNoteFigures(
        ratio=statistics.median(u / b for b, u in results),
        uploads_per_second=statistics.median(u for _, u in results),
        bare_per_second=statistics.median(b for b, _ in results),
        rounds=results,
        load_before=load_before,
        load_after=psutil.getloadavg()[0],
        other_cpu_cores=other,
        bare_cpu_ms=bare_cpu.ms_per_item(),
        upload_cpu_ms=upload_cpu.ms_per_item(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.voice_notes")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each half-round")
    args = parser.parse_args(argv)
    data_dir = make_data_dir("voice-notes-stack-")
    extra_env = {"RATE_LIMIT_RPS": "1000000", "RATE_LIMIT_BURST": "1000000"}
    stack = NativeStack(data_dir, ports=free_ports(), extra_env=extra_env)
    try:
        stack.start(timeout=120)
        figures = measure(stack, rounds=args.rounds, seconds=args.seconds)
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    figure, measured, target, ratio, met = figures.row()
    print(f"{figure} | {measured} | {target} | {ratio:.2f} | {'yes' if met else 'no'}")
    print(figures.details())
    return 0 if figures.met else 1


if __name__ == "__main__":
    raise SystemExit(main())
