"""Process samples with psutil: a process tree's memory, and the CPU other work takes."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import psutil


@dataclass
class Noise:
    """CPU the machine spent on work other than this benchmark's, per measurement."""

    samples: dict[str, float] = field(default_factory=dict)
    load_start: float = 0.0
    load_end: float = 0.0


def process_tree(root: int) -> list[psutil.Process]:
    """``root`` and every process under it (empty once it has ended)."""
    try:
        parent = psutil.Process(root)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_memory(root: int) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in bytes over the process tree under ``root``."""
    rss = pss = 0
    for process in process_tree(root):
        try:
            memory = process.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # the process ended while we looked
        rss += memory.rss
        pss += memory.pss
    return rss, pss


class MemorySampler(threading.Thread):
    """The peak of :func:`tree_memory` while it runs, sampled every ``interval`` seconds."""

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


def tree_cpu_seconds(roots: Iterable[int]) -> float:
    """CPU seconds (user + system, reaped children included) of the trees under ``roots``."""
    processes = {p.pid: p for root in roots for p in process_tree(root)}
    total = 0.0
    for process in processes.values():
        try:
            t = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def server_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) of the server's own processes under ``root``: its ffmpeg
    children, running or reaped, left out."""
    total = 0.0
    for process in process_tree(root):
        try:
            if process.name() == "ffmpeg":
                continue
            t = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += t.user + t.system
    return total


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot, all cores together."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal


class CpuMeter:
    """How much CPU the machine spent outside our own process trees during a measurement."""

    def __init__(self, roots: Callable[[], list[int]]) -> None:
        self.roots = roots

    def _ours(self) -> float:
        return tree_cpu_seconds(self.roots())

    @contextlib.contextmanager
    def measure(self, noise: Noise, name: str) -> Iterator[None]:
        start, busy, ours = time.monotonic(), machine_busy_seconds(), self._ours()
        yield
        elapsed = time.monotonic() - start
        other = (machine_busy_seconds() - busy) - (self._ours() - ours)
        noise.samples[name] = max(0.0, other / max(elapsed, 1e-6))
