"""``make bench``: the service's performance figures, measured on the native stack through nginx.

Starts its own :class:`NativeStack` (temporary directory, free ports, the stack's default
server settings), then measures, with warm-up and counted rounds:

1. upload latency: POST of a 10-minute 44.1 kHz stereo WAV to its 201 (sent by curl, as in the
   README), against the bare ``ffmpeg -f wav -i in.wav -c:a libmp3lame -b:a 192k out.mp3`` of
   the same file, same run;
2. memory: the upload function's process tree (server, workers, ffmpeg) sampled from /proc
   while it converts a small and a 1 GiB WAV (streamed from a generator, never on disk);
3. throughput: two uploads at once against one;
4. small requests: POST /users and a 1 MB GET /record with wrk (32 connections, bounded in
   time and requests, 127.0.0.1 only; five rounds of each, figures are medians of rounds);
5. stalls: the slowest POST /users and GET /record while a 10-minute WAV converts;
6. image size and cold start: the compose stack's own measurement script, when present.

It prints a table (figure, target, ratio, met?) and writes it to ``bench/results.md`` with the
machine it ran on and how busy the machine was with other work. ``--smoke`` runs every step
with tiny sizes in a few seconds each (CI proves the command works; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.metadata
import json
import math
import os
import platform
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import minimal_ffmpeg  # noqa: E402
from devstack import FUNCTIONS, NativeStack, Ports, StackError  # noqa: E402

MIB = 1024 * 1024
RATE, CHANNELS, SAMPLE_BYTES = 44100, 2, 2
BLOCK_ALIGN = CHANNELS * SAMPLE_BYTES
BYTES_PER_SECOND = RATE * BLOCK_ALIGN
BITRATE_KBPS = 192
USER_BODY = '{"name": "bench"}'
RESULTS = ROOT / "bench" / "results.md"
# The measurements, in the order they run (--only picks some; a partial run writes no results).
STEPS = ("latency", "throughput", "memory", "small", "stalls", "images")
# The compose stack's measurement of image sizes and cold starts (needs the stack up).
IMAGE_SCRIPT = "scripts/image_report.py"
HZ = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    smoke: bool
    wav_seconds: float  # the "10-minute WAV"
    memory_small: int  # bytes of audio for the memory comparison
    memory_large: int
    rounds: int  # counted rounds of each measurement
    throughput_rounds: int  # figure 3's rounds (each: one upload, then two at once)
    warmups: int
    wrk_rounds: int  # counted wrk runs of each small-request load (figure 4)
    wrk_seconds: float
    wrk_max_requests: int  # per run: wrk stops at this many responses
    connections: int
    download_bytes: int

    @classmethod
    def full(cls) -> Plan:
        return cls(
            smoke=False,
            wav_seconds=600.0,
            memory_small=128 * MIB,
            memory_large=1024 * MIB,
            rounds=3,
            throughput_rounds=5,
            warmups=1,
            wrk_rounds=5,
            wrk_seconds=10.0,
            wrk_max_requests=100_000,
            connections=32,
            download_bytes=1_000_000,
        )

    @classmethod
    def tiny(cls) -> Plan:
        return cls(
            smoke=True,
            wav_seconds=4.0,
            memory_small=2 * MIB,
            memory_large=6 * MIB,
            rounds=1,
            throughput_rounds=1,
            warmups=0,
            wrk_rounds=1,
            wrk_seconds=1.0,
            wrk_max_requests=2_000,
            connections=8,
            download_bytes=100_000,
        )


@dataclass
class Row:
    figure: str
    measured: str
    target: str
    ratio: float | None  # measured / target, in the target's direction
    met: bool | None  # None: not measured
    note: str = ""

    def cells(self) -> list[str]:
        ratio = "" if self.ratio is None else f"{self.ratio:.2f}"
        met = "not measured" if self.met is None else ("yes" if self.met else "**NO**")
        return [self.figure, self.measured, self.target, ratio, met]


@dataclass
class Noise:
    """CPU the machine spent on work other than this benchmark's, per measurement."""

    samples: dict[str, float] = field(default_factory=dict)
    load_start: float = 0.0
    load_end: float = 0.0


# --- test audio ------------------------------------------------------------------------------
def _pcm_second() -> bytes:
    """One second of stereo 16-bit audio: two tones and some noise, like a real recording."""
    rng = random.Random(5)  # noqa: S311 - test audio, not secrets
    out = array("h")
    for n in range(RATE):
        t = n / RATE
        base = 0.3 * math.sin(2 * math.pi * 220 * t) + 0.2 * math.sin(2 * math.pi * 1375 * t)
        left = base + rng.uniform(-0.15, 0.15)
        right = 0.8 * base + rng.uniform(-0.15, 0.15)
        out.append(int(left * 32767))
        out.append(int(right * 32767))
    if sys.byteorder != "little":
        out.byteswap()
    return out.tobytes()


_PCM: bytes | None = None


def pcm_second() -> bytes:
    global _PCM
    if _PCM is None:
        _PCM = _pcm_second()
    return _PCM


def wav_header(data_bytes: int) -> bytes:
    fmt = struct.pack("<HHIIHH", 1, CHANNELS, RATE, BYTES_PER_SECOND, BLOCK_ALIGN, SAMPLE_BYTES * 8)
    return (
        b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"data" + struct.pack("<I", data_bytes)
    )  # fmt: skip


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g}-min" if seconds >= 60 else f"{seconds:g}-s"


def audio_bytes(seconds: float) -> int:
    return int(seconds * RATE) * BLOCK_ALIGN


def wav_chunks(data_bytes: int, chunk: int = MIB) -> Iterator[bytes]:
    """A WAV of ``data_bytes`` of audio, generated as it is read."""
    yield wav_header(data_bytes)
    second = pcm_second()
    block = second * max(1, chunk // len(second))
    left = data_bytes
    while left > 0:
        piece = block[: min(left, len(block))]
        left -= len(piece)
        yield piece


def write_wav(path: Path, seconds: float) -> int:
    with path.open("wb") as out:
        for piece in wav_chunks(audio_bytes(seconds)):
            out.write(piece)
    return path.stat().st_size


def file_chunks(path: Path, chunk: int = MIB) -> Iterator[bytes]:
    with path.open("rb") as f:
        while data := f.read(chunk):
            yield data


# --- HTTP client -----------------------------------------------------------------------------
@dataclass
class Api:
    host: str
    port: int

    def connect(self, timeout: float = 900.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def create_user(self) -> tuple[str, str]:
        conn = self.connect(30)
        try:
            conn.request(
                "POST", "/users", body=b'{"name": "bench"}',
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
            response = conn.getresponse()
            body = json.loads(response.read())
            if response.status != 201:
                raise RuntimeError(f"POST /users answered {response.status}: {body}")
            return body["id"], body["token"]
        finally:
            conn.close()

    def upload(
        self, user: tuple[str, str], chunks: Iterator[bytes], wav_size: int
    ) -> tuple[float, dict[str, Any]]:
        """POST /records as multipart/form-data streamed from ``chunks``; (seconds, body)."""
        boundary = uuid.uuid4().hex
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="user"\r\n\r\n{user[0]}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="token"\r\n\r\n{user[1]}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="bench.wav"\r\nContent-Type: audio/wav\r\n\r\n'
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()

        def body() -> Iterator[bytes]:
            yield head
            yield from chunks
            yield tail

        conn = self.connect()
        try:
            start = time.perf_counter()
            conn.request(
                "POST", "/records", body=body(),
                headers={
                    "Content-Type": f"multipart/form-data; boundary={boundary}",
                    "Content-Length": str(len(head) + wav_size + len(tail)),
                },
            )  # fmt: skip
            response = conn.getresponse()
            raw = response.read()
            elapsed = time.perf_counter() - start
            if response.status != 201:
                raise RuntimeError(f"POST /records answered {response.status}: {raw[:500]!r}")
            result: dict[str, Any] = json.loads(raw)
            return elapsed, result
        finally:
            conn.close()


# --- /proc sampling --------------------------------------------------------------------------
def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(root: int, children: dict[int, list[int]] | None = None) -> list[int]:
    children = children if children is not None else _children_map()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def tree_memory(root: int) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in bytes over the process tree under ``root``."""
    rss = pss = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss += int(f.read().split()[1]) * PAGE
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
    return rss, pss


class MemorySampler(threading.Thread):
    def __init__(self, root: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.interval = interval
        self.peak_rss = 0
        self.peak_pss = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            rss, pss = tree_memory(self.root)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.samples += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _cpu_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime of one process, in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    fields = stat[stat.rindex(b")") + 2 :].split()
    return sum(int(x) for x in fields[11:15])


def _machine_busy_ticks() -> int:
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[:8])
    return user + nice + system + irq + softirq + steal


class CpuMeter:
    """How much CPU the machine spent outside our own process trees during a measurement."""

    def __init__(self, roots: Callable[[], list[int]]) -> None:
        self.roots = roots

    def _ours(self) -> int:
        children = _children_map()
        pids = {pid for root in self.roots() for pid in process_tree(root, children)}
        return sum(_cpu_ticks(pid) for pid in pids)

    @contextlib.contextmanager
    def measure(self, noise: Noise, name: str) -> Iterator[None]:
        start, busy, ours = time.monotonic(), _machine_busy_ticks(), self._ours()
        yield
        elapsed = time.monotonic() - start
        other = (_machine_busy_ticks() - busy) - (self._ours() - ours)
        noise.samples[name] = max(0.0, other / HZ / max(elapsed, 1e-6))


# --- wrk -------------------------------------------------------------------------------------
WRK_SCRIPT = """
local max_responses = tonumber(os.getenv("BENCH_MAX_RESPONSES") or "0")
local count = 0
local method = os.getenv("BENCH_METHOD") or "GET"
wrk.method = method
if method == "POST" then
  wrk.body = os.getenv("BENCH_BODY")
  wrk.headers["Content-Type"] = "application/json"
end
function response(status, headers, body)
  count = count + 1
  if max_responses > 0 and count >= max_responses then wrk.thread:stop() end
end
function done(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "status_errors": %d, "socket_errors": %d,'
    .. ' "p50_us": %d, "p99_us": %d, "max_us": %d}\\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def ensure_wrk() -> str:
    """wrk from Debian's packages: installed here as root, else explained."""
    found = shutil.which("wrk")
    if found:
        return found
    command = ["apt-get", "install", "-y", "--no-install-recommends", "wrk"]
    if os.geteuid() == 0 and Path("/etc/debian_version").exists():
        log("installing wrk with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        found = shutil.which("wrk")
        if found:
            return found
    raise StackError(f"wrk is missing; install it with: sudo {' '.join(command)}")


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    errors: int


def run_wrk(
    wrk: str, script: Path, url: str, plan: Plan, seconds: float, env: dict[str, str]
) -> WrkResult:
    assert url.startswith("http://127.0.0.1:")  # load goes to this machine only
    threads = 1
    command = [
        wrk, f"-t{threads}", f"-c{plan.connections}", f"-d{seconds:g}s", "--timeout", "5s",
        "-s", str(script), url,
    ]  # fmt: skip
    run_env = {
        **os.environ,
        **env,
        "BENCH_MAX_RESPONSES": str(max(1, plan.wrk_max_requests // threads)),
    }
    done = subprocess.run(
        command, capture_output=True, text=True, env=run_env, timeout=seconds + 60, check=True
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{done.stdout}\n{done.stderr}")
    data = json.loads(line[len("WRKJSON ") :])
    return WrkResult(
        rps=data["requests"] / (data["duration_us"] / 1e6),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        requests=data["requests"],
        errors=data["status_errors"] + data["socket_errors"],
    )


# --- the benchmark ---------------------------------------------------------------------------
class Bench:
    def __init__(self, plan: Plan, workdir: Path, steps: frozenset[str] = frozenset(STEPS)) -> None:
        self.plan = plan
        self.steps = steps
        self.workdir = workdir
        self.rows: list[Row] = []
        self.noise = Noise()
        self.details: list[str] = []
        self.ffmpeg = shutil.which("ffmpeg") or "ffmpeg"
        self.wrk = ensure_wrk()
        extra_env = {
            # Room for the 1 GiB WAV of the memory measurement (the default is 256 MiB).
            "MAX_UPLOAD_BYTES": str(plan.memory_large + 2 * MIB),
            # wrk's 32 connections come from one address and stand for many clients: the
            # router's per-client rate limit would answer them 429 at 100 requests/s.
            "RATE_LIMIT_RPS": "1000000",
            "RATE_LIMIT_BURST": "1000000",
        }
        data_dir = workdir / "stack"
        data_dir.mkdir()
        data_dir.chmod(0o755)  # PostgreSQL runs as 'postgres' under root and must enter it
        self.stack = NativeStack(data_dir, ports=Ports.free(), extra_env=extra_env)
        self.api = Api("127.0.0.1", 0)
        self.cpu = CpuMeter(self._our_roots)
        self.server_settings = ""

    def _our_roots(self) -> list[int]:
        return [os.getpid(), *(p.pid for p in self.stack.processes.values())]

    # --- helpers -----------------------------------------------------------------------------
    def bare_ffmpeg(self, wav: Path) -> float:
        out = self.workdir / "bare.mp3"
        command = [
            self.ffmpeg, "-hide_banner", "-loglevel", "error", "-y",
            "-f", "wav", "-i", str(wav), "-c:a", "libmp3lame", "-b:a", f"{BITRATE_KBPS}k",
            str(out),
        ]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(command, check=True)
        elapsed = time.perf_counter() - start
        out.unlink()
        return elapsed

    def upload_file(self, user: tuple[str, str], wav: Path) -> float:
        """POST ``wav`` with curl, as the README does; seconds from connect to the 201.

        A separate, light client: the upload's sender neither takes the bench process's GIL
        from the latency probes (figure 5) nor much of the CPU the service is measured on.
        """
        curl = shutil.which("curl")
        if curl is None:  # without curl, the in-process client does the same request
            elapsed, _ = self.api.upload(user, file_chunks(wav), wav.stat().st_size)
            return elapsed
        url = f"http://{self.api.host}:{self.api.port}/records"
        done = subprocess.run(
            [
                curl, "--silent", "--show-error", "--output", "/dev/null",
                "--write-out", "%{http_code} %{time_total}",
                "-F", f"user={user[0]}", "-F", f"token={user[1]}",
                "-F", f"file=@{wav};type=audio/wav", url,
            ],
            capture_output=True, text=True, timeout=900, check=True,
        )  # fmt: skip
        status, seconds = done.stdout.split()
        if status != "201":
            raise RuntimeError(f"POST /records answered {status}")
        return float(seconds)

    def settle_disk(self) -> None:
        """Write back what the previous step left dirty before the next one starts.

        The memory step stores the MP3 of a 1 GiB WAV; the kernel writes such data back over
        the next half minute, and on this machine's disk that makes PostgreSQL's commit fsyncs
        stall for up to a few hundred ms: the following step would measure the previous one's
        write-back, not itself.
        """
        start = time.monotonic()
        os.sync()
        if (took := time.monotonic() - start) > 0.5:
            log(f"waited {took:.1f} s for the previous step's data to reach the disk")

    # --- measurements ------------------------------------------------------------------------
    def run(self) -> None:
        plan = self.plan
        log(f"starting the native stack in {self.stack.data_dir}")
        self.stack.start(timeout=180)
        self.server_settings = server_settings(self.stack)
        self.api = Api("127.0.0.1", self.stack.ports.router)
        self.noise.load_start = os.getloadavg()[0]
        user = self.api.create_user()
        wav = self.workdir / "in.wav"
        wav_size = write_wav(wav, plan.wav_seconds)
        log(f"{wav_size / MIB:.0f} MiB WAV ({plan.wav_seconds:g} s) written for the upload runs")

        measurements: list[tuple[set[str], Callable[[], None]]] = [
            ({"latency"}, lambda: self.measure_latency(user, wav)),
            ({"throughput"}, lambda: self.measure_throughput(user, wav)),
            ({"memory"}, lambda: self.measure_memory(user)),
            # uploads the record that both small and stalls download
            ({"small", "stalls"}, lambda: self.measure_small_requests(user)),
            ({"stalls"}, lambda: self.measure_stalls(user, wav)),
        ]
        for wanted, measure in measurements:
            if self.steps & wanted:
                self.settle_disk()
                measure()
        if "images" in self.steps:
            self.measure_images()
        self.noise.load_end = os.getloadavg()[0]

    def measure_latency(self, user: tuple[str, str], wav: Path) -> None:
        plan = self.plan
        log("1. upload latency against bare ffmpeg")
        for _ in range(plan.warmups):
            self.bare_ffmpeg(wav)
            self.upload_file(user, wav)
        bare: list[float] = []
        uploads: list[float] = []
        with self.cpu.measure(self.noise, "upload latency"):
            for _ in range(plan.rounds):  # interleaved, so drift hits both alike
                bare.append(self.bare_ffmpeg(wav))
                uploads.append(self.upload_file(user, wav))
        self.bare_s = statistics.median(bare)
        self.upload_s = statistics.median(uploads)
        ratio = self.upload_s / self.bare_s
        self.details.append(
            f"bare ffmpeg rounds: {', '.join(f'{x:.2f}' for x in bare)} s; "
            f"upload rounds: {', '.join(f'{x:.2f}' for x in uploads)} s"
        )
        self.rows.append(
            Row(
                f"1. POST {_duration(plan.wav_seconds)} WAV to 201 / bare ffmpeg",
                f"{ratio:.2f}x ({self.upload_s:.2f} s vs {self.bare_s:.2f} s)",
                "≤ 1.10x",
                ratio / 1.10,
                ratio <= 1.10,
            )
        )

    def two_uploads(self, user: tuple[str, str], wav: Path) -> float:
        """Wall time of two uploads of ``wav`` started together."""
        times: list[float] = []
        errors: list[BaseException] = []

        def one() -> None:
            try:
                times.append(self.upload_file(user, wav))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(2)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return time.perf_counter() - start

    def measure_throughput(self, user: tuple[str, str], wav: Path) -> None:
        """Each round: one upload alone, then two at once, back to back; the median ratio.

        Pairing each round's two measurements keeps the machine's drift (other work, CPU
        frequency) out of the ratio, as the interleaved rounds of figure 1 do.
        """
        plan = self.plan
        log("3. throughput: two uploads at once")
        size = wav.stat().st_size
        for _ in range(plan.warmups):
            self.two_uploads(user, wav)
        rounds: list[tuple[float, float]] = []
        with self.cpu.measure(self.noise, "two uploads"):
            for _ in range(plan.throughput_rounds):
                single = self.upload_file(user, wav)
                rounds.append((single, self.two_uploads(user, wav)))
        ratios = sorted(2 * single / pair for single, pair in rounds)
        ratio = statistics.median(ratios)
        single = statistics.median(x[0] for x in rounds)
        pair = statistics.median(x[1] for x in rounds)
        self.details.append(
            "two uploads at once (one alone, then two; per round): "
            + "; ".join(f"{a:.2f} s / {b:.2f} s = {2 * a / b:.2f}x" for a, b in rounds)
        )
        self.rows.append(
            Row(
                "3. two uploads at once: total throughput / one upload's (median of rounds)",
                f"{ratio:.2f}x ({2 * size / pair / MIB:.1f} vs {size / single / MIB:.1f} MiB/s)",
                "≥ 1.70x",
                ratio / 1.70,
                ratio >= 1.70,
            )
        )

    def measure_memory(self, user: tuple[str, str]) -> None:
        plan = self.plan
        log("2. memory of the upload function's process tree")
        root = self.stack.processes["upload_record"].pid
        time.sleep(1.0)
        idle = [tree_memory(root) for _ in range(5)]
        idle_rss = max(x[0] for x in idle)
        idle_pss = max(x[1] for x in idle)
        peaks: dict[int, tuple[int, int]] = {}
        with self.cpu.measure(self.noise, "memory"):
            for size in (plan.memory_small, plan.memory_large):
                sampler = MemorySampler(root)
                sampler.start()
                try:
                    self.api.upload(user, wav_chunks(size), len(wav_header(size)) + size)
                finally:
                    sampler.stop()
                peaks[size] = (sampler.peak_rss, sampler.peak_pss)
        small, large = peaks[plan.memory_small], peaks[plan.memory_large]
        growth_rss = large[0] - small[0]
        mib = MIB

        def fmt(size: int) -> str:
            return f"{size / MIB:g} MiB" if size < 1024 * MIB else f"{size / 1024 / MIB:g} GiB"

        self.details.append(
            f"upload tree idle: RSS {idle_rss / mib:.1f} MiB, PSS {idle_pss / mib:.1f} MiB; "
            f"peak converting {fmt(plan.memory_small)}: RSS {small[0] / mib:.1f} / PSS "
            f"{small[1] / mib:.1f} MiB; {fmt(plan.memory_large)}: RSS {large[0] / mib:.1f} / "
            f"PSS {large[1] / mib:.1f} MiB"
        )
        peak_pss = large[1]
        self.rows.append(
            Row(
                f"2a. upload tree peak converting {fmt(plan.memory_large)} (PSS; RSS sum)",
                f"{peak_pss / mib:.0f} MiB ({large[0] / mib:.0f} MiB)",
                "< 160 MiB",
                peak_pss / (160 * mib),
                peak_pss < 160 * mib,
            )
        )
        above = peak_pss - idle_pss
        self.rows.append(
            Row(
                "2b. peak above idle (PSS; RSS sum)",
                f"{above / mib:.0f} MiB ({(large[0] - idle_rss) / mib:.0f} MiB)",
                "≤ 64 MiB",
                above / (64 * mib),
                above <= 64 * mib,
            )
        )
        growth = large[1] - small[1]
        self.rows.append(
            Row(
                f"2c. peak growth {fmt(plan.memory_small)} → {fmt(plan.memory_large)} "
                "(PSS; RSS sum)",
                f"{growth / mib:+.1f} MiB ({growth_rss / mib:+.1f} MiB)",
                "≤ +8 MiB (flat)",
                max(growth, 0) / (8 * mib),
                growth <= 8 * mib,
            )
        )

    def measure_small_requests(self, user: tuple[str, str]) -> None:
        plan = self.plan
        log("4. small requests with wrk")
        script = self.workdir / "bench.lua"
        script.write_text(WRK_SCRIPT)
        # a record of about 1 MB: 192 kbit/s CBR is 24,000 bytes per second
        seconds = plan.download_bytes / (BITRATE_KBPS * 1000 / 8)
        size = audio_bytes(seconds)
        _, record = self.api.upload(user, wav_chunks(size), len(wav_header(size)) + size)
        self.download_url = record["url"]
        base = self.stack.base_url
        runs = {
            "create_user": (f"{base}/users", {"BENCH_METHOD": "POST", "BENCH_BODY": USER_BODY}),
            "download": (self.download_url, {"BENCH_METHOD": "GET"}),
        }  # fmt: skip
        for name, (url, env) in runs.items():
            for _ in range(plan.warmups):
                run_wrk(self.wrk, script, url, plan, min(3.0, plan.wrk_seconds), env)
            results = []
            with self.cpu.measure(self.noise, name):
                for _ in range(plan.wrk_rounds):
                    results.append(run_wrk(self.wrk, script, url, plan, plan.wrk_seconds, env))
            # Each figure is the median over the rounds: one round's p99 is set by its worst
            # few hundred responses, and a single stall of the machine's disk (PostgreSQL's
            # commit waits for its fsync) lifts it for the whole round (README, Performance).
            rps = statistics.median(r.rps for r in results)
            p99s = [r.p99_ms for r in results]
            p99 = statistics.median(p99s)
            p99_range = f"rounds {min(p99s):.0f} to {max(p99s):.0f} ms"
            errors = sum(r.errors for r in results)
            self.details.append(
                f"{name} (in the order run): " + "; ".join(
                    f"{r.rps:.0f}/s p50 {r.p50_ms:.1f} ms p99 {r.p99_ms:.1f} ms "
                    f"max {r.max_ms:.0f} ms ({r.requests} requests, {r.errors} errors)"
                    for r in results
                )
            )  # fmt: skip
            if name == "create_user":
                self.rows.append(
                    Row(
                        f"4a. POST /users, {plan.connections} connections (median of rounds)",
                        f"{rps:.0f}/s",
                        "≥ 1500/s",
                        rps / 1500,
                        rps >= 1500 and errors == 0,
                        f"{errors} errors" if errors else "",
                    )
                )
                self.rows.append(
                    Row(
                        "4b. POST /users p99 latency (median of rounds)",
                        f"{p99:.1f} ms ({p99_range})",
                        "< 50 ms",
                        p99 / 50,
                        p99 < 50,
                    )
                )
            else:
                self.rows.append(
                    Row(
                        f"4c. GET /record of {plan.download_bytes / 1e6:g} MB, "
                        f"{plan.connections} connections (one record, repeated; median of rounds)",
                        f"{rps:.0f}/s (p99 {p99:.0f} ms)",
                        "≥ 500/s",
                        rps / 500,
                        rps >= 500 and errors == 0,
                        f"{errors} errors" if errors else "",
                    )
                )

    def measure_stalls(self, user: tuple[str, str], wav: Path) -> None:
        log("5. latency of small requests while a WAV converts")
        done = threading.Event()
        latencies: dict[str, list[float]] = {"create_user": [], "download": []}
        failures: list[str] = []
        path_of = {"create_user": "/users", "download": self.download_url.split("/", 3)[3]}

        def probe(name: str) -> None:
            conn = self.api.connect(30)
            try:
                while not done.is_set():
                    start = time.perf_counter()
                    if name == "create_user":
                        conn.request(
                            "POST", "/users", body=b'{"name": "probe"}',
                            headers={"Content-Type": "application/json"},
                        )  # fmt: skip
                    else:
                        conn.request("GET", "/" + path_of[name])
                    response = conn.getresponse()
                    response.read()
                    latencies[name].append(time.perf_counter() - start)
                    if response.status >= 300:
                        failures.append(f"{name}: {response.status}")
                    time.sleep(0.01)
            finally:
                conn.close()

        probes = [threading.Thread(target=probe, args=(n,), daemon=True) for n in latencies]
        upload_time: list[float] = []
        with self.cpu.measure(self.noise, "stalls"):
            for t in probes:
                t.start()
            time.sleep(0.5)  # probes running before the upload starts
            upload_time.append(self.upload_file(user, wav))
            done.set()
            for t in probes:
                t.join()
        for name, values in latencies.items():
            worst = max(values) * 1000
            self.details.append(
                f"{name} during a {upload_time[0]:.1f} s upload: {len(values)} requests, "
                f"median {statistics.median(values) * 1000:.1f} ms, max {worst:.1f} ms"
            )
            self.rows.append(
                Row(
                    f"5. slowest {'POST /users' if name == 'create_user' else 'GET /record'} "
                    "while a WAV converts",
                    f"{worst:.1f} ms ({len(values)} requests)",
                    "< 50 ms",
                    worst / 50,
                    worst < 50 and not failures,
                    "; ".join(failures[:3]),
                )
            )

    def measure_images(self) -> None:
        """Rows from the compose stack's scripts/image_report.py, or why there are none."""
        script = ROOT / IMAGE_SCRIPT
        reason = ""
        if not script.exists():
            reason = f"{IMAGE_SCRIPT} is not in the repository"
        elif shutil.which("docker") is None:
            reason = "no docker command on this machine"
        elif subprocess.run(["docker", "info"], capture_output=True, check=False).returncode:
            reason = "no Docker engine reachable"
        reports: list[dict[str, Any]] = []
        if not reason:
            log(f"6. image sizes and cold starts with {IMAGE_SCRIPT}")
            done = subprocess.run(
                [
                    sys.executable, str(script), "--json", "--runs", str(self.plan.rounds),
                    "--project", os.environ.get("COMPOSE_PROJECT_NAME", "record-service"),
                ],
                capture_output=True, text=True, timeout=1800, check=False,
            )  # fmt: skip
            reports = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
            if not reports:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                reason = f"{IMAGE_SCRIPT} measured nothing ({tail[:120]}; the compose stack "
                reason += "must be up: make up)"
        if reason:
            for figure, target in (
                ("6a. function image size", "≤ 250 MB"),
                ("6b. docker run to first 200", "< 2 s"),
            ):
                self.rows.append(Row(figure, f"not measured: {reason}", target, None, None))
            return
        for r in reports:
            size = r["size_bytes"] / 1e6
            start = r["best_start_seconds"]
            self.rows.append(
                Row(f"6a. {r['function']} image size", f"{size:.0f} MB", "≤ 250 MB",
                    size / 250, size <= 250)
            )  # fmt: skip
            self.rows.append(
                Row(f"6b. {r['function']} docker run to first 200 (best)", f"{start:.2f} s",
                    "< 2 s", start / 2, start < 2)
            )  # fmt: skip


# --- report ----------------------------------------------------------------------------------
def _version(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout or done.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def machine_description() -> list[str]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), "?")
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem_kib = int(next(x for x in f if x.startswith("MemTotal")).split()[1])

    def pkg(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or "weed"
    return [
        f"CPU: {model}, {os.cpu_count()} cores; RAM: {mem_kib / 1024 / 1024:.1f} GiB; "
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


def render(bench: Bench, started: datetime, elapsed: float) -> str:
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
        f"- Server settings (the stack's defaults): {bench.server_settings}",
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
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
    plan = Plan.tiny() if args.smoke else Plan.full()
    partial = steps != frozenset(STEPS)
    out = Path(args.out) if args.out else (None if plan.smoke or partial else RESULTS)
    deadline = time.monotonic() + args.wait_quiet
    while os.getloadavg()[0] >= 0.5 and time.monotonic() < deadline:
        log(f"waiting for a quiet machine (load {os.getloadavg()[0]:.2f})")
        time.sleep(10)
    started = datetime.now(UTC)
    t0 = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="records-bench-"))
    workdir.chmod(0o755)
    bench: Bench | None = None
    try:
        bench = Bench(plan, workdir, steps)
        bench.run()
    except (StackError, RuntimeError, subprocess.CalledProcessError, OSError) as exc:
        log(f"error: {exc}")
        if bench is not None:
            for name in ("upload_record", "create_user", "get_record", "nginx"):
                logfile = bench.stack.logs / f"{name}.log"
                if logfile.exists():
                    log(f"--- {name}.log (tail)\n{logfile.read_text(errors='replace')[-1500:]}")
        return 1
    finally:
        if bench is not None:
            bench.stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(bench)
    text = render(bench, started, time.monotonic() - t0)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("# Benchmark results (`make bench`)\n\n" + text)
        log(f"results written to {out}")
    if plan.smoke:
        return 0  # the smoke run proves the command works; its figures are not judged
    return 0 if all(row.met is not False for row in bench.rows) else 2


if __name__ == "__main__":
    sys.exit(main())
