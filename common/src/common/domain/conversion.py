"""Streaming WAV -> MP3 conversion through ffmpeg, with ffmpeg's own exact length header.

The WAV's chunks go into ffmpeg as they arrive (header checked first by
:mod:`common.domain.wav`); ffmpeg writes a seekable temporary file, the only way its muxer
fills in the Xing/LAME header. Every full part behind the first is sent to the sink as soon
as it is written and its disk space released; part 1, which holds the header and the ID3 tag
(known only at the end), goes last. Memory: one part in flight, whatever the input size.
docs/encoding.md has the whole design. A conversion ends early when its :class:`Stop` is set:
by its own deadline, or by whoever else holds it (the server that reads the body, a shutdown).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import IO, Protocol

from common.domain.encoding import Encoding, EncodingOptions
from common.domain.id3 import build_tag
from common.domain.wav import (
    MAX_TRAILING_BYTES,
    WavHeader,
    file_tags,
    parse_header,
    trailing_metadata,
)
from common.errors import RequestTimeout, ServiceError, UndecodableAudio
from common.settings import MP3_BITRATES_MPEG1, MP3_BITRATES_MPEG2

log = logging.getLogger(__name__)

# Where SCHED_BATCH is missing (not Linux), the encoder's nice value instead (0-19).
FFMPEG_NICENESS = 10
PIPE_BYTES = 1024 * 1024
_STDERR_KEEP = 4096
# Resampling, when the output rate differs from the source's: libswresample's polyphase
# filter at twice its default length and 16x its phase count (stopband about -120 dB).
RESAMPLER = "aresample=resampler=swr:filter_size=64:phase_shift=14:cutoff=0.97"
_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


class Stop:
    """Why a request's work must end now, set once: a deadline, or the server shutting down.

    What waits on something that must be cut short (a blocked body read, ffmpeg) registers a
    waker with :meth:`on_set`; :meth:`set` keeps the first error and calls every waker, from
    the setter's thread. The work then raises :attr:`error`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wakers: list[Callable[[], object]] = []
        self.error: ServiceError | None = None

    def set(self, error: ServiceError) -> bool:
        """Stop with ``error``; False when already stopped (the first error stands)."""
        with self._lock:
            if self.error is not None:
                return False
            self.error = error
            wakers, self._wakers = self._wakers, []
        for wake in wakers:
            wake()
        return True

    def on_set(self, wake: Callable[[], object]) -> Callable[[], None]:
        """Call ``wake`` when stopped (now, if already); returns what unregisters it."""
        with self._lock:
            if self.error is None:
                self._wakers.append(wake)
                return lambda: self._forget(wake)
        wake()
        return lambda: None

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def _forget(self, wake: Callable[[], object]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._wakers.remove(wake)


# The Stop of the request being served in this context: the server that reads the body sets
# one (common.platform.bridge) so that a conversion's deadline also wakes a blocked read.
REQUEST_STOP: ContextVar[Stop | None] = ContextVar("request_stop", default=None)
_RUNNING: weakref.WeakSet[Stop] = weakref.WeakSet()


def stop_conversions(error: ServiceError) -> int:
    """Stop every conversion running in this process with ``error``; how many there were."""
    return sum(stop.set(error) for stop in list(_RUNNING))


class PartSink(Protocol):
    """Where the MP3 goes: numbered parts, part 1 last (the object store's writer)."""

    @property
    def part_size(self) -> int: ...

    def write_part(self, number: int, data: bytes | bytearray) -> None: ...


@dataclass(frozen=True, slots=True)
class ConversionResult:
    source: WavHeader
    duration_seconds: float
    sample_rate: int
    channels: int
    bitrate_kbps: int  # CBR: the frames' bitrate; VBR: the average
    vbr_quality: int | None
    mp3_bytes: int
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class XingHeader:
    """The Xing/Info + LAME header that starts ffmpeg's MP3 file."""

    vbr: bool  # "Xing"; "Info" for CBR
    frames: int
    bytes: int
    delay: int
    padding: int
    sample_rate: int
    channels: int
    samples_per_frame: int
    next_frame: int  # offset of the first audio frame

    @property
    def samples(self) -> int:
        return self.frames * self.samples_per_frame - self.delay - self.padding


def ffmpeg_command(ffmpeg: str, header: WavHeader, encoding: Encoding, output: str) -> list[str]:
    """The one ffmpeg invocation this service runs: WAV demuxer forced, pipe in, ``output`` out.

    Every value on it is an integer from a fixed set or ``output``, a path the service made.
    """
    command = [
        ffmpeg,
        "-hide_banner",
        "-nostdin",
        "-y",  # the service created the (empty) output file itself
        "-loglevel", "error",
        "-threads", "1",
        "-protocol_whitelist", "pipe",
        "-f", "wav",
        "-i", "pipe:0",
        "-map", "0:a:0",
        "-map_metadata", "-1",
        "-vn", "-sn", "-dn",
    ]  # fmt: skip
    if encoding.sample_rate != header.sample_rate:
        command += ["-af", RESAMPLER]
    command += ["-ar", str(encoding.sample_rate)]
    if encoding.channels != header.channels:
        command += ["-ac", str(encoding.channels)]
    command += ["-c:a", "libmp3lame"]
    if encoding.vbr_quality is not None:
        command += ["-q:a", str(encoding.vbr_quality)]
    else:
        command += ["-b:a", f"{encoding.bitrate_kbps}k"]
    command += [
        "-f", "mp3",
        "-flush_packets", "0",  # buffered writes, not one per MP3 frame: far fewer wakeups
        "-id3v2_version", "0",  # the service writes the tag (common.domain.id3)
        "-write_xing", "1",
        "-protocol_whitelist", "file",
        f"file:{output}",
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
    table = MP3_BITRATES_MPEG1 if version == 3 else MP3_BITRATES_MPEG2
    return table[bitrate_index - 1], _RATES[version][rate_index]


def parse_xing(data: bytes) -> XingHeader | None:
    """The Xing/Info + LAME header of the MP3 starting ``data`` (ffmpeg's layout), if any."""
    info = parse_mp3_frame_header(data)
    if info is None:
        return None
    bitrate, rate = info
    mpeg1 = (data[1] >> 3) & 0x3 == 3
    mono = data[3] >> 6 == 3
    side_info = (17 if mono else 32) if mpeg1 else (9 if mono else 17)
    at = 4 + side_info
    if data[at : at + 4] not in (b"Xing", b"Info") or len(data) < at + 144:
        return None
    frames = int.from_bytes(data[at + 8 : at + 12], "big")
    size = int.from_bytes(data[at + 12 : at + 16], "big")
    delay_padding = int.from_bytes(data[at + 141 : at + 144], "big")
    padded = (data[2] >> 1) & 1
    frame_length = (144 if mpeg1 else 72) * bitrate * 1000 // rate + padded
    return XingHeader(
        vbr=data[at : at + 4] == b"Xing",
        frames=frames,
        bytes=size,
        delay=delay_padding >> 12,
        padding=delay_padding & 0xFFF,
        sample_rate=rate,
        channels=1 if mono else 2,
        samples_per_frame=1152 if mpeg1 else 576,
        next_frame=frame_length,
    )


def convert_wav_stream(
    chunks: Iterator[bytes],
    sink: PartSink,
    *,
    ffmpeg: str,
    bitrate_kbps: int,
    timeout_seconds: float,
    options: EncodingOptions | None = None,
    temp_dir: str | None = None,
) -> ConversionResult:
    """Convert the WAV in ``chunks`` to MP3 written into ``sink``, streaming both ways.

    ``bitrate_kbps`` is the deployment's default, used when ``options`` choose neither a
    bitrate nor a VBR quality. ``chunks`` is read to its end in every successful case.
    Errors: NotAWav / UnsupportedWav (415), InvalidWav / UndecodableAudio / InvalidOption
    (422), RequestTimeout (408) at ``timeout_seconds`` (the WAV header's wait included), the
    error of the context's :data:`REQUEST_STOP` when it is set; whatever ``chunks`` or
    ``sink`` raise (disconnects, storage outages) is re-raised after ffmpeg is stopped.
    """
    options = options or EncodingOptions()
    stop = REQUEST_STOP.get() or Stop()
    timeout = RequestTimeout(
        f"The upload was not received and converted within {timeout_seconds:g} seconds."
    )
    watchdog = threading.Timer(timeout_seconds, stop.set, (timeout,))
    watchdog.daemon = True
    watchdog.start()
    _RUNNING.add(stop)
    try:
        return _convert(chunks, sink, stop, ffmpeg, bitrate_kbps, options, temp_dir)
    finally:
        watchdog.cancel()
        _RUNNING.discard(stop)


def _convert(
    chunks: Iterator[bytes],
    sink: PartSink,
    stop: Stop,
    ffmpeg: str,
    bitrate_kbps: int,
    options: EncodingOptions,
    temp_dir: str | None,
) -> ConversionResult:
    header, head_bytes = read_header(chunks)
    stop.check()
    encoding = options.resolve(header.sample_rate, header.channels, bitrate_kbps)
    workdir = tempfile.mkdtemp(prefix="mp3-", dir=temp_dir)
    output = os.path.join(workdir, "out.mp3")
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    out_fd = os.open(output, flags, 0o600)
    err_fd = os.open(os.path.join(workdir, "stderr"), flags, 0o600)
    try:
        return _run(
            ffmpeg_command(ffmpeg, header, encoding, output),
            header, head_bytes, chunks, sink, encoding, options,
            out_fd=out_fd, err_fd=err_fd, stop=stop,
        )  # fmt: skip
    finally:
        os.close(out_fd)
        os.close(err_fd)
        for name in ("out.mp3", "stderr"):  # what ffmpeg and the service made there
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(workdir, name))
        try:
            os.rmdir(workdir)
        except OSError:  # not expected: something else appeared there
            shutil.rmtree(workdir, ignore_errors=True)


def _run(
    command: list[str],
    header: WavHeader,
    head_bytes: bytes,
    chunks: Iterator[bytes],
    sink: PartSink,
    encoding: Encoding,
    options: EncodingOptions,
    *,
    out_fd: int,
    err_fd: int,
    stop: Stop,
) -> ConversionResult:
    proc = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=err_fd,
        close_fds=True,
        env={"PATH": os.defpath},  # nothing of ours: ffmpeg_binary is a full path
    )
    _lower_priority(proc.pid)
    _widen_pipe(proc.stdin)
    tail = _Tail(out_fd, sink)
    forget = stop.on_set(proc.kill)
    try:
        data_bytes, trailing = _feed(proc, header, head_bytes, chunks, stop, tail)
        # A blocking wait, woken the moment ffmpeg exits: a stop kills it. (wait(timeout)
        # polls with sleeps, noticing a short conversion's end late.)
        proc.wait()
    finally:
        forget()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    stop.check()
    if proc.returncode != 0:
        size = os.fstat(err_fd).st_size
        stderr = os.pread(err_fd, _STDERR_KEEP, max(0, size - _STDERR_KEEP))
        log.info("ffmpeg failed", extra={"ffmpeg_stderr": stderr.decode("utf-8", "replace")})
        raise UndecodableAudio("The WAV file's audio data could not be decoded.")
    frames = data_bytes // header.block_align
    xing = parse_xing(os.pread(out_fd, 4096, 0))
    if frames == 0 or xing is None or xing.frames == 0:
        raise UndecodableAudio("The WAV file contains no audio samples.")
    tags = {**file_tags(header.metadata + trailing_metadata(trailing)), **options.tags}
    mp3_bytes = tail.finish(build_tag(tags))
    if xing.vbr:
        seconds = xing.frames * xing.samples_per_frame / xing.sample_rate
        bitrate = round(xing.bytes * 8 / seconds / 1000)
    else:
        found = parse_mp3_frame_header(os.pread(out_fd, 4, xing.next_frame))
        bitrate = found[0] if found else encoding.bitrate_kbps or 0
    return ConversionResult(
        source=header,
        duration_seconds=round(frames / header.sample_rate, 3),
        sample_rate=xing.sample_rate,
        channels=xing.channels,
        bitrate_kbps=bitrate,
        vbr_quality=encoding.vbr_quality,
        mp3_bytes=mp3_bytes,
        tags=tags,
    )


class _Tail:
    """Sends ffmpeg's output file to the sink part by part, part 1 last; frees what is sent."""

    def __init__(self, fd: int, sink: PartSink) -> None:
        self.fd = fd
        self.sink = sink
        self.part_size = sink.part_size
        self.offset = self.part_size  # where part 2 starts: part 1 stays until ffmpeg is done
        self.number = 2
        self.sent = 0

    def poll(self) -> None:
        """Send every full part behind part 1 that ffmpeg has written (ffmpeg only appends
        there; it goes back only to fill in the header frame at the start of part 1)."""
        size = os.fstat(self.fd).st_size
        while size - self.offset >= self.part_size:
            self._send(self.part_size)

    def finish(self, tag: bytes) -> int:
        """Send the rest, then part 1 with ``tag`` in front; the MP3's size."""
        size = os.fstat(self.fd).st_size
        if self.number == 2 and size <= self.part_size:
            self.sink.write_part(1, self._read(0, size, tag))
            return len(tag) + size
        while self.offset < size:
            self._send(min(self.part_size, size - self.offset))
        self.sink.write_part(1, self._read(0, self.part_size, tag))
        return len(tag) + size

    def _send(self, length: int) -> None:
        data = self._read(self.offset, length)
        self.sink.write_part(self.number, data)
        _punch_hole(self.fd, self.offset, length)
        self.offset += length
        self.number += 1

    def _read(self, offset: int, length: int, prefix: bytes = b"") -> bytearray:
        buf = bytearray(len(prefix) + length)
        buf[: len(prefix)] = prefix
        view = memoryview(buf)[len(prefix) :]
        while view:
            got = os.preadv(self.fd, [view], offset)
            if got == 0:
                raise UndecodableAudio("The MP3 file ended early.")  # not expected: a bug
            view, offset = view[got:], offset + got
        return buf


def _libc_fallocate() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name, use_errno=True).fallocate
    except (OSError, AttributeError):  # not glibc/Linux: the file keeps its blocks
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    function.restype = ctypes.c_int
    return function


_FALLOCATE = _libc_fallocate()


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """Give the blocks of [offset, offset + length) back (tmpfs, ext4, xfs, btrfs ...).

    Where the file system cannot, the file keeps them until it is deleted at the end: disk
    use is then the MP3's size instead of about two parts, and nothing else changes.
    """
    if _FALLOCATE is None:
        return
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _FALLOCATE(fd, mode, offset, length) != 0:
        log.debug("could not punch a hole: errno %d", ctypes.get_errno())


def _lower_priority(pid: int) -> None:
    """Let request handling preempt the encoder (no stalls while converting).

    Linux's SCHED_BATCH: the encoder keeps its fair share of the CPU, but a request that
    wakes up is not made to wait for it. A nice value (the earlier choice) also made the
    encoder lose most of a core to any other busy thread, slowing uploads without making
    stalls any shorter (docs/performance.md).
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
    stop: Stop,
    tail: _Tail,
) -> tuple[int, bytes]:
    """Write the WAV into ffmpeg; (audio-data bytes given to it, the bytes after the audio).

    Bytes past the declared data size (trailing metadata chunks) are not forwarded; the
    first :data:`MAX_TRAILING_BYTES` of them are kept for their tags. Between writes, the
    parts ffmpeg has finished are sent on. If ffmpeg exits early the rest of the body is
    still consumed, so the caller can answer, unless ``stop`` is set: then reading ends at
    the next chunk (or at once, where the body's reader registered a waker on it).
    """
    assert proc.stdin is not None
    limit = header.data_size
    data = head_bytes[header.data_offset :]
    trailing = bytearray()
    if limit is not None:
        trailing += data[limit:]
        data = data[:limit]
    forwarded = 0
    writing = True
    try:
        writing = _write(proc, head_bytes[: header.data_offset] + data)
        forwarded = len(data)
        for chunk in chunks:
            if stop.error is not None:
                break
            if not writing:
                continue
            if limit is not None:
                room = max(0, limit - forwarded)
                if len(chunk) > room:
                    if len(trailing) < MAX_TRAILING_BYTES:
                        trailing += chunk[room : room + MAX_TRAILING_BYTES - len(trailing)]
                    chunk = chunk[:room]
                if not chunk:
                    continue
            writing = _write(proc, chunk)
            forwarded += len(chunk)
            tail.poll()
    finally:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
    if limit is not None and limit & 1:
        del trailing[:1]  # the data chunk's pad byte
    return forwarded, bytes(trailing)


def _write(proc: subprocess.Popen[bytes], data: bytes) -> bool:
    assert proc.stdin is not None
    try:
        proc.stdin.write(data)
    except (BrokenPipeError, ValueError):
        return False  # ffmpeg has exited: its return code tells why
    return True
