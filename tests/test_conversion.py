"""Conversion through the real ffmpeg binary, with an in-memory sink (no servers needed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import wavgen
from common.domain.conversion import (
    convert_wav_stream,
    ffmpeg_command,
    mp3_sample_rate,
    parse_mp3_frame_header,
)
from common.domain.wav import InvalidWav, NotAWav, UnsupportedWav, parse_header
from common.errors import ClientDisconnected, RequestTimeout, UndecodableAudio

FFMPEG = shutil.which("ffmpeg") or "ffmpeg"


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.data += data
        self.writes += 1


def chunked(data: bytes, size: int = 7919) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def convert(data: bytes | Iterator[bytes], **kwargs: float) -> tuple[Sink, object]:
    sink = Sink()
    chunks = chunked(data) if isinstance(data, bytes) else data
    result = convert_wav_stream(
        chunks,
        sink,
        ffmpeg=FFMPEG,
        bitrate_kbps=192,
        timeout_seconds=kwargs.get("timeout", 60.0),
    )
    return sink, result


def ffprobe(mp3: bytes) -> dict[str, str]:
    with tempfile.NamedTemporaryFile(suffix=".mp3") as f:
        f.write(mp3)
        f.flush()
        out = subprocess.run(
            [
                "ffprobe",
                "-v",
                "error",
                "-print_format",
                "json",
                "-show_streams",
                "-show_format",
                f.name,
            ],
            capture_output=True,
            check=True,
        ).stdout
    info = json.loads(out)
    stream = info["streams"][0]
    return {
        "codec": stream["codec_name"],
        "rate": stream["sample_rate"],
        "channels": str(stream["channels"]),
        "duration": info["format"]["duration"],
    }


def test_mp3_rates_follow_the_source_where_mp3_allows() -> None:
    assert [mp3_sample_rate(r) for r in (8000, 11025, 22050, 44100, 48000)] == [
        8000, 11025, 22050, 44100, 48000,
    ]  # fmt: skip
    assert mp3_sample_rate(96000) == 48000
    assert mp3_sample_rate(192000) == 48000
    assert mp3_sample_rate(88200) == 44100
    assert mp3_sample_rate(10000) == 11025


def test_ffmpeg_is_locked_to_the_wav_demuxer_and_pipes() -> None:
    header = parse_header(wavgen.wav(seconds=0.01, channels=6))
    assert header is not None
    command = ffmpeg_command("ffmpeg", header, 192)
    assert command[command.index("-f") + 1] == "wav"
    assert command[command.index("-protocol_whitelist") + 1] == "pipe"
    assert command.index("-protocol_whitelist") < command.index("-i")
    assert command[command.index("-i") + 1] == "pipe:0"
    assert command[-1] == "pipe:1"
    assert command[command.index("-ac") + 1] == "2"  # MP3 carries at most two channels


def test_a_three_second_stereo_take_converts() -> None:
    sink, result = convert(wavgen.wav(seconds=3.0, channels=2, rate=44100))
    assert result.duration_seconds == 3.0  # type: ignore[attr-defined]
    assert result.bitrate_kbps == 192  # type: ignore[attr-defined]
    assert result.mp3_bytes == len(sink.data)  # type: ignore[attr-defined]
    assert sink.writes > 1  # it streamed: the sink saw the MP3 in pieces
    probe = ffprobe(bytes(sink.data))
    assert probe["codec"] == "mp3" and probe["rate"] == "44100" and probe["channels"] == "2"
    assert abs(float(probe["duration"]) - 3.0) < 0.1


def test_frame_header_parsing() -> None:
    assert parse_mp3_frame_header(bytes([0xFF, 0xFB, 0xB0, 0x00])) == (192, 44100)
    assert parse_mp3_frame_header(bytes([0xFF, 0xF3, 0x80, 0x00])) == (64, 22050)
    assert parse_mp3_frame_header(b"ID3\x04") is None


def test_trailing_chunks_are_not_audio() -> None:
    tail = wavgen.chunk(b"LIST", b"INFO" + bytes(44100 * 4))  # a second's worth of bytes
    sink, result = convert(wavgen.wav(seconds=1.0, trailing_chunks=(tail,)))
    assert result.duration_seconds == 1.0  # type: ignore[attr-defined]
    assert abs(float(ffprobe(bytes(sink.data))["duration"]) - 1.0) < 0.1


def test_open_ended_data_chunk_streams_to_the_end() -> None:
    pieces = list(wavgen.silence_wav(2.0))
    header = bytearray(pieces[1])
    header[4:8] = b"\xff\xff\xff\xff"
    pieces[1] = bytes(header)
    _sink, result = convert(iter(pieces))
    assert result.duration_seconds == 2.0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"not a wav at all" * 10, NotAWav),
        (
            wavgen.riff(wavgen.fmt_chunk(tag=0x55), wavgen.chunk(b"data", bytes(1000))),
            UnsupportedWav,
        ),
        (
            wavgen.riff(wavgen.fmt_chunk(channels=0, block_align=0), wavgen.chunk(b"data", b"")),
            InvalidWav,
        ),
        (wavgen.riff(wavgen.fmt_chunk(), wavgen.chunk(b"data", b"")), UndecodableAudio),
        (wavgen.wav(seconds=0.01)[:40], InvalidWav),
    ],
)
def test_bad_input_is_a_client_error(data: bytes, error: type[Exception]) -> None:
    sink = Sink()
    with pytest.raises(error) as info:
        convert_wav_stream(chunked(data), sink, ffmpeg=FFMPEG, bitrate_kbps=192, timeout_seconds=30)
    assert 400 <= info.value.status < 500  # type: ignore[attr-defined]
    assert not sink.data


def test_a_disconnect_stops_ffmpeg_and_propagates() -> None:
    def body() -> Iterator[bytes]:
        pieces = wavgen.silence_wav(60.0)
        for _ in range(50):
            yield next(pieces)
        raise ClientDisconnected("gone")

    before = _ffmpeg_children()
    with pytest.raises(ClientDisconnected):
        convert(body())
    assert _ffmpeg_children() == before


def test_deadline_kills_a_stalled_conversion() -> None:
    import time

    def slow() -> Iterator[bytes]:
        pieces = wavgen.silence_wav(10.0)
        yield next(pieces)
        yield next(pieces)
        for piece in pieces:
            time.sleep(0.05)
            yield piece

    started = time.monotonic()
    with pytest.raises(RequestTimeout):
        convert(slow(), timeout=1.0)
    assert time.monotonic() - started < 5
    assert not _ffmpeg_children()


def _ffmpeg_children() -> list[str]:
    me = str(Path("/proc/self").resolve().name)
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
        if fields.get("Name", "").strip() == "ffmpeg" and fields.get("PPid", "").strip() == me:
            found.append(status.parent.name)
    return found


def test_the_encoder_runs_as_a_batch_process_at_normal_priority() -> None:
    """Requests may preempt it (SCHED_BATCH), but it keeps its full share (nice 0)."""
    seen: list[tuple[int, int]] = []
    wav = wavgen.wav(seconds=2.0)

    def chunks() -> Iterator[bytes]:
        yield wav[:4096]
        for pid in _ffmpeg_children():  # started once the header was read
            policy = os.sched_getscheduler(int(pid))
            seen.append((policy, os.getpriority(os.PRIO_PROCESS, int(pid))))
        yield wav[4096:]

    convert_wav_stream(chunks(), Sink(), ffmpeg=FFMPEG, bitrate_kbps=128, timeout_seconds=30)
    assert seen == [(os.SCHED_BATCH, 0)]
