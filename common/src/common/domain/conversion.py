"""Streaming WAV -> MP3 conversion through ffmpeg's pipes.

The WAV arrives as an iterator of byte chunks (straight from the request body); its header is
checked by :mod:`common.domain.wav` before ffmpeg starts; ffmpeg runs with the WAV demuxer forced,
only the ``pipe`` protocol allowed and a deadline; the MP3 leaves through a sink (the object
store's multipart writer) as ffmpeg produces it. Memory stays at a few pipe buffers whatever
the input size: neither the WAV nor the MP3 is ever held whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Protocol

from common.domain.wav import WavHeader, parse_header
from common.errors import RequestTimeout, UndecodableAudio

log = logging.getLogger(__name__)

MP3_SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
_READ_SIZE = 64 * 1024
# Where SCHED_BATCH is missing (not Linux), the encoder's nice value instead (0-19).
FFMPEG_NICENESS = 10
PIPE_BYTES = 1024 * 1024
_STDERR_KEEP = 4096

# Layer III bitrate tables (kbit/s) by MPEG version, indexed by the header's bitrate index.
_BITRATES_V1 = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
_BITRATES_V2 = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)
_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


class ByteSink(Protocol):
    def write(self, data: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class ConversionResult:
    source: WavHeader
    duration_seconds: float
    sample_rate: int
    channels: int
    bitrate_kbps: int
    mp3_bytes: int


def mp3_sample_rate(rate: int) -> int:
    """The output rate: the source's own where MP3 can carry it, else the nearest family rate."""
    if rate in MP3_SAMPLE_RATES:
        return rate
    if rate > 48000:
        return 44100 if rate % 11025 == 0 else 48000
    return next(r for r in MP3_SAMPLE_RATES if r >= rate)


def ffmpeg_command(ffmpeg: str, header: WavHeader, bitrate_kbps: int) -> list[str]:
    """The one ffmpeg invocation this service runs: WAV demuxer forced, pipes only."""
    command = [
        ffmpeg,
        "-hide_banner",
        "-nostdin",
        "-loglevel", "error",
        "-threads", "1",
        "-protocol_whitelist", "pipe",
        "-f", "wav",
        "-i", "pipe:0",
        "-map", "0:a:0",
        "-map_metadata", "-1",
        "-vn", "-sn", "-dn",
        "-ar", str(mp3_sample_rate(header.sample_rate)),
    ]  # fmt: skip
    if header.channels > 2:
        command += ["-ac", "2"]
    command += [
        "-c:a", "libmp3lame",
        "-b:a", f"{bitrate_kbps}k",
        "-f", "mp3",
        "-flush_packets", "0",  # 32 KiB writes, not one per MP3 frame: 50x fewer wakeups
        "-id3v2_version", "0",
        "-write_xing", "0",
        "pipe:1",
    ]  # fmt: skip
    return command


def read_header(chunks: Iterator[bytes]) -> tuple[WavHeader, bytes]:
    """Pull chunks until the WAV header is complete; return it and every byte read so far."""
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        header = parse_header(bytes(buf))
        if header is not None:
            return header, bytes(buf)
    header = parse_header(bytes(buf), at_eof=True)
    assert header is not None  # parse_header raises at EOF rather than asking for more
    return header, bytes(buf)


def parse_mp3_frame_header(frame: bytes) -> tuple[int, int] | None:
    """(bitrate kbit/s, sample rate Hz) of the MPEG audio frame starting ``frame``."""
    if len(frame) < 4 or frame[0] != 0xFF or frame[1] & 0xE0 != 0xE0:
        return None
    version = (frame[1] >> 3) & 0x3
    bitrate_index = frame[2] >> 4
    rate_index = (frame[2] >> 2) & 0x3
    if version == 1 or rate_index == 3 or bitrate_index in (0, 15):
        return None
    table = _BITRATES_V1 if version == 3 else _BITRATES_V2
    return table[bitrate_index], _RATES[version][rate_index]


class _Mp3Pump(threading.Thread):
    """Moves ffmpeg's stdout into the sink; remembers the first frame header and any error."""

    def __init__(self, proc: subprocess.Popen[bytes], sink: ByteSink) -> None:
        super().__init__(name="mp3-pump", daemon=True)
        self.proc = proc
        self.sink = sink
        self.total = 0
        self.first = b""
        self.error: BaseException | None = None

    def run(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        try:
            while data := os.read(fd, _READ_SIZE):
                if len(self.first) < 4:
                    self.first += data[: 4 - len(self.first)]
                self.total += len(data)
                self.sink.write(data)
        except BaseException as exc:  # surfaced by the caller, which owns the error mapping
            self.error = exc
            self.proc.kill()


class _StderrTail(threading.Thread):
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        super().__init__(name="ffmpeg-stderr", daemon=True)
        self.proc = proc
        self.tail = b""

    def run(self) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        while data := os.read(fd, _READ_SIZE):
            self.tail = (self.tail + data)[-_STDERR_KEEP:]


def convert_wav_stream(
    chunks: Iterator[bytes],
    sink: ByteSink,
    *,
    ffmpeg: str,
    bitrate_kbps: int,
    timeout_seconds: float,
) -> ConversionResult:
    """Convert the WAV in ``chunks`` to MP3 written into ``sink``, streaming both ways.

    ``chunks`` is read to its end in every successful case. Errors: NotAWav / UnsupportedWav
    (415), InvalidWav / UndecodableAudio (422), RequestTimeout (408), whatever ``chunks`` or
    ``sink`` raise (disconnects, storage outages) is re-raised after ffmpeg is stopped.
    """
    deadline = time.monotonic() + timeout_seconds
    header, head_bytes = read_header(chunks)
    proc = subprocess.Popen(
        ffmpeg_command(ffmpeg, header, bitrate_kbps),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        close_fds=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    _lower_priority(proc.pid)
    _widen_pipe(proc.stdin)
    pump = _Mp3Pump(proc, sink)
    stderr = _StderrTail(proc)
    timed_out = threading.Event()

    def on_deadline() -> None:
        timed_out.set()
        proc.kill()

    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), on_deadline)
    watchdog.daemon = True
    pump.start()
    stderr.start()
    watchdog.start()
    data_bytes = 0
    try:
        data_bytes = _feed(proc, header, head_bytes, chunks, timed_out)
        remaining = max(0.0, deadline - time.monotonic())
        try:
            proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            on_deadline()
        pump.join()
        stderr.join()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        pump.join()
        stderr.join()
    if pump.error is not None:
        raise pump.error
    if timed_out.is_set():
        raise RequestTimeout(
            f"The upload was not received and converted within {timeout_seconds:g} seconds."
        )
    if proc.returncode != 0:
        log.info("ffmpeg failed", extra={"ffmpeg_stderr": stderr.tail.decode("utf-8", "replace")})
        raise UndecodableAudio("The WAV file's audio data could not be decoded.")
    frames = data_bytes // header.block_align
    frame_info = parse_mp3_frame_header(pump.first)
    if frames == 0 or pump.total == 0 or frame_info is None:
        raise UndecodableAudio("The WAV file contains no audio samples.")
    bitrate, out_rate = frame_info
    return ConversionResult(
        source=header,
        duration_seconds=round(frames / header.sample_rate, 3),
        sample_rate=out_rate,
        channels=min(header.channels, 2),
        bitrate_kbps=bitrate,
        mp3_bytes=pump.total,
    )


def _lower_priority(pid: int) -> None:
    """Let request handling preempt the encoder (no stalls while converting).

    Linux's SCHED_BATCH: the encoder keeps its fair share of the CPU, but a request that
    wakes up is not made to wait for it. A nice value (the earlier choice, 10) also made the
    encoder lose most of a core to any other busy thread: the upload took 1.12x the bare
    encode instead of 0.96x (make bench, figure 1), with no better figure 5.
    """
    with contextlib.suppress(OSError):  # the process may be gone already, or not permitted
        if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_BATCH"):
            os.sched_setscheduler(pid, os.SCHED_BATCH, os.sched_param(0))
        else:
            os.setpriority(os.PRIO_PROCESS, pid, FFMPEG_NICENESS)


def _widen_pipe(pipe: IO[bytes] | None) -> None:
    """A 1 MiB pipe into ffmpeg: fewer blocked writes and wakeups than the 64 KiB default."""
    if pipe is not None and hasattr(fcntl, "F_SETPIPE_SZ"):
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep the default
            fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def _feed(
    proc: subprocess.Popen[bytes],
    header: WavHeader,
    head_bytes: bytes,
    chunks: Iterator[bytes],
    stop: threading.Event,
) -> int:
    """Write the WAV into ffmpeg; return how many audio-data bytes it was given.

    Bytes past the declared data size (trailing metadata chunks) are read but not forwarded.
    If ffmpeg exits early the rest of the body is still consumed, so the caller can answer,
    unless ``stop`` is set (the deadline passed): then reading ends at once.
    """
    assert proc.stdin is not None
    limit = header.data_size
    data = head_bytes[header.data_offset :]
    if limit is not None:
        data = data[:limit]
    forwarded = 0
    writing = True
    try:
        writing = _write(proc, head_bytes[: header.data_offset] + data)
        forwarded = len(data)
        for chunk in chunks:
            if stop.is_set():
                break
            if not writing:
                continue
            if limit is not None:
                chunk = chunk[: max(0, limit - forwarded)]
                if not chunk:
                    continue
            writing = _write(proc, chunk)
            forwarded += len(chunk)
    finally:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
    return forwarded


def _write(proc: subprocess.Popen[bytes], data: bytes) -> bool:
    assert proc.stdin is not None
    try:
        proc.stdin.write(data)
    except (BrokenPipeError, ValueError):
        return False  # ffmpeg has exited: its return code tells why
    return True
