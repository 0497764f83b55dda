"""What every measurement shares: the plan (sizes, rounds), the rows it finds, the run's state."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.client import Client, User
from bench.sampling import CpuMeter, Noise
from devstack import NativeStack

MIB = 1024 * 1024
RATE, CHANNELS, SAMPLE_BYTES = 44100, 2, 2
BYTES_PER_SECOND = RATE * CHANNELS * SAMPLE_BYTES
BITRATE_KBPS = 192


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def audio_bytes(seconds: float) -> int:
    """Bytes of 44.1 kHz stereo 16-bit audio in ``seconds``."""
    return int(seconds * RATE) * CHANNELS * SAMPLE_BYTES


def duration(seconds: float) -> str:
    return f"{seconds / 60:g}-min" if seconds >= 60 else f"{seconds:g}-s"


@dataclass(frozen=True)
class Plan:
    """Sizes and rounds; the defaults are the full run's."""

    smoke: bool = False
    wav_seconds: float = 600.0  # the "10-minute WAV"
    memory_small: int = 128 * MIB  # bytes of audio for the memory comparison
    memory_large: int = 1024 * MIB
    rounds: int = 3  # counted rounds of each measurement
    throughput_rounds: int = 5  # figure 3's rounds (each: one upload, then two at once)
    warmups: int = 1
    wrk_rounds: int = 5  # counted wrk runs of each small-request load (figure 4)
    wrk_seconds: float = 10.0
    wrk_max_requests: int = 100_000  # per run: wrk stops at this many responses
    connections: int = 32
    download_bytes: int = 1_000_000

    @classmethod
    def tiny(cls) -> Plan:
        """``--smoke``: every step in a few seconds; proves the command runs, nothing more."""
        return cls(
            smoke=True, wav_seconds=4.0, memory_small=2 * MIB, memory_large=6 * MIB, rounds=1,
            throughput_rounds=1, warmups=0, wrk_rounds=1, wrk_seconds=1.0,
            wrk_max_requests=2_000, connections=8, download_bytes=100_000,
        )  # fmt: skip


@dataclass
class Row:
    """One figure of the table: what was measured against its target."""

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
class Bench:
    """The running benchmark, handed to every step: each appends its rows and details."""

    plan: Plan
    stack: NativeStack
    client: Client  # to the stack's router
    user: User  # the user every upload belongs to
    workdir: Path
    wav: Path  # the plan's wav_seconds of audio, on disk, for the uploads sent by curl
    cpu: CpuMeter
    noise: Noise = field(default_factory=Noise)
    rows: list[Row] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    download_url: str = ""  # the record that figures 4c and 5 download (set by bench.small)
