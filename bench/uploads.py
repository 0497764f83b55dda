"""Figures 1-3: an upload against the bare encode, the memory it takes, two uploads at once."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from bench.core import BITRATE_KBPS, MIB, Bench, Row, duration, log
from bench.sampling import MemorySampler, server_cpu_seconds, tree_memory
from devstack import wavgen


def wav_stream(data_bytes: int) -> tuple[Iterator[bytes], int]:
    """(chunks, size) of a WAV of ``data_bytes`` of recording-like audio, made as it is read."""
    second = wavgen.recording_second()
    block = second * max(1, MIB // len(second))
    return wavgen.stream_wav(data_bytes, block), wavgen.STREAM_HEADER_BYTES + data_bytes


def write_wav(path: Path, data_bytes: int) -> int:
    chunks, _ = wav_stream(data_bytes)
    with path.open("wb") as out:
        for piece in chunks:
            out.write(piece)
    return path.stat().st_size


def bare_ffmpeg(bench: Bench) -> float:
    """Seconds of the plain ffmpeg encode of the bench WAV: the baseline of figure 1."""
    out = bench.workdir / "bare.mp3"
    command = [
        shutil.which("ffmpeg") or "ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
        "-f", "wav", "-i", str(bench.wav), "-c:a", "libmp3lame", "-b:a", f"{BITRATE_KBPS}k",
        str(out),
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True)
    elapsed = time.perf_counter() - start
    out.unlink()
    return elapsed


def measure_latency(bench: Bench) -> None:
    plan, client = bench.plan, bench.client
    log("1. upload latency against bare ffmpeg")
    for _ in range(plan.warmups):
        bare_ffmpeg(bench)
        client.upload_file(bench.user, bench.wav)
    bare: list[float] = []
    uploads: list[float] = []
    with bench.cpu.measure(bench.noise, "upload latency"):
        for _ in range(plan.rounds):  # interleaved, so drift hits both alike
            bare.append(bare_ffmpeg(bench))
            uploads.append(client.upload_file(bench.user, bench.wav))
    bare_s = statistics.median(bare)
    upload_s = statistics.median(uploads)
    ratio = upload_s / bare_s
    bench.details.append(
        f"bare ffmpeg rounds: {', '.join(f'{x:.2f}' for x in bare)} s; "
        f"upload rounds: {', '.join(f'{x:.2f}' for x in uploads)} s"
    )
    bench.rows.append(
        Row(
            f"1. POST {duration(plan.wav_seconds)} WAV to 201 / bare ffmpeg",
            f"{ratio:.2f}x ({upload_s:.2f} s vs {bare_s:.2f} s)",
            "≤ 1.10x",
            ratio / 1.10,
            ratio <= 1.10,
        )
    )


def two_uploads(bench: Bench) -> float:
    """Wall time of two uploads of the bench WAV started together."""
    errors: list[BaseException] = []

    def one() -> None:
        try:
            bench.client.upload_file(bench.user, bench.wav)
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


def measure_throughput(bench: Bench) -> None:
    """Each round: one upload alone, then two at once, back to back; the median ratio.

    Pairing each round's two measurements keeps the machine's drift (other work, CPU
    frequency) out of the ratio, as the interleaved rounds of figure 1 do.
    """
    plan = bench.plan
    log("3. throughput: two uploads at once")
    size = bench.wav.stat().st_size
    for _ in range(plan.warmups):
        two_uploads(bench)
    rounds: list[tuple[float, float]] = []
    server = bench.stack.processes["upload_record"].pid
    cpu_alone: list[float] = []  # upload_record's own CPU seconds per upload (ffmpeg left out)
    cpu_paired: list[float] = []
    with bench.cpu.measure(bench.noise, "two uploads"):
        for _ in range(plan.throughput_rounds):
            before = server_cpu_seconds(server)
            single = bench.client.upload_file(bench.user, bench.wav)
            between = server_cpu_seconds(server)
            rounds.append((single, two_uploads(bench)))
            cpu_alone.append(between - before)
            cpu_paired.append((server_cpu_seconds(server) - between) / 2)
    ratio = statistics.median(2 * single / pair for single, pair in rounds)
    single = statistics.median(x[0] for x in rounds)
    pair = statistics.median(x[1] for x in rounds)
    bench.details.append(
        "two uploads at once (one alone, then two; per round): "
        + "; ".join(f"{a:.2f} s / {b:.2f} s = {2 * a / b:.2f}x" for a, b in rounds)
    )
    bench.details.append(
        f"upload_record's own CPU per {size / MIB:.0f} MiB upload (its server processes, "
        f"ffmpeg left out; median of rounds): {statistics.median(cpu_alone) * 1000:.0f} ms alone, "
        f"{statistics.median(cpu_paired) * 1000:.0f} ms each of two at once"
    )
    bench.rows.append(
        Row(
            "3. two uploads at once: total throughput / one upload's (median of rounds)",
            f"{ratio:.2f}x ({2 * size / pair / MIB:.1f} vs {size / single / MIB:.1f} MiB/s)",
            "≥ 1.70x",
            ratio / 1.70,
            ratio >= 1.70,
        )
    )


def _size(size: int) -> str:
    return f"{size / MIB:g} MiB" if size < 1024 * MIB else f"{size / 1024 / MIB:g} GiB"


def measure_memory(bench: Bench) -> None:
    plan = bench.plan
    log("2. memory of the upload function's process tree")
    root = bench.stack.processes["upload_record"].pid
    time.sleep(1.0)
    idle = [tree_memory(root) for _ in range(5)]
    idle_rss = max(x[0] for x in idle)
    idle_pss = max(x[1] for x in idle)
    peaks: dict[int, tuple[int, int]] = {}
    with bench.cpu.measure(bench.noise, "memory"):
        for size in (plan.memory_small, plan.memory_large):
            sampler = MemorySampler(root)
            sampler.start()
            try:
                bench.client.upload(bench.user, *wav_stream(size))
            finally:
                sampler.stop()
            peaks[size] = (sampler.peak_rss, sampler.peak_pss)
    small, large = peaks[plan.memory_small], peaks[plan.memory_large]
    bench.details.append(
        f"upload tree idle: RSS {idle_rss / MIB:.1f} MiB, PSS {idle_pss / MIB:.1f} MiB; "
        f"peak converting {_size(plan.memory_small)}: RSS {small[0] / MIB:.1f} / PSS "
        f"{small[1] / MIB:.1f} MiB; {_size(plan.memory_large)}: RSS {large[0] / MIB:.1f} / "
        f"PSS {large[1] / MIB:.1f} MiB"
    )
    peak_pss = large[1]
    above = peak_pss - idle_pss
    growth, growth_rss = large[1] - small[1], large[0] - small[0]
    bench.rows += [
        Row(
            f"2a. upload tree peak converting {_size(plan.memory_large)} (PSS; RSS sum)",
            f"{peak_pss / MIB:.0f} MiB ({large[0] / MIB:.0f} MiB)",
            "< 160 MiB",
            peak_pss / (160 * MIB),
            peak_pss < 160 * MIB,
        ),
        Row(
            "2b. peak above idle (PSS; RSS sum)",
            f"{above / MIB:.0f} MiB ({(large[0] - idle_rss) / MIB:.0f} MiB)",
            "≤ 64 MiB",
            above / (64 * MIB),
            above <= 64 * MIB,
        ),
        Row(
            f"2c. peak growth {_size(plan.memory_small)} → {_size(plan.memory_large)} "
            "(PSS; RSS sum)",
            f"{growth / MIB:+.1f} MiB ({growth_rss / MIB:+.1f} MiB)",
            "≤ +8 MiB (flat)",
            max(growth, 0) / (8 * MIB),
            growth <= 8 * MIB,
        ),
    ]
