"""Conversion through the real ffmpeg binary, with an in-memory sink (no servers needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from common.domain.conversion import (
    REQUEST_STOP,
    RESAMPLER,
    ConversionResult,
    Stop,
    convert_wav_stream,
    ffmpeg_command,
    parse_mp3_frame_header,
    parse_xing,
    stop_conversions,
)
from common.domain.encoding import Encoding, EncodingOptions, InvalidOption, mp3_sample_rate
from common.domain.wav import InvalidWav, NotAWav, UnsupportedWav, parse_header
from common.errors import (
    ClientDisconnected,
    DependencyUnavailable,
    RequestTimeout,
    ServiceError,
    UndecodableAudio,
)

from devstack import wavgen
from tests.support.audio import assert_matches_source, decode
from tests.support.probe import audio_start, ffprobe_warnings, mutagen_length, read_id3

FFMPEG = shutil.which("ffmpeg") or "ffmpeg"


class Sink:
    """The object store's writer as the conversion sees it: numbered parts, in any order."""

    def __init__(self, part_size: int = 8 * 1024 * 1024) -> None:
        self.part_size = part_size
        self.parts: dict[int, bytes] = {}
        self.order: list[int] = []

    def write_part(self, number: int, data: bytes | bytearray) -> None:
        assert number not in self.parts
        self.parts[number] = bytes(data)
        self.order.append(number)

    @property
    def data(self) -> bytes:
        return b"".join(self.parts[n] for n in sorted(self.parts))


def chunked(data: bytes, size: int = 7919) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def convert(
    data: bytes | Iterator[bytes], sink: Sink | None = None, **kwargs: Any
) -> tuple[Sink, ConversionResult]:
    sink = sink or Sink()
    chunks = chunked(data) if isinstance(data, bytes) else data
    result = convert_wav_stream(
        chunks,
        sink,
        ffmpeg=kwargs.pop("ffmpeg", FFMPEG),
        bitrate_kbps=192,
        timeout_seconds=kwargs.pop("timeout", 60.0),
        options=kwargs.pop("options", None),
        temp_dir=kwargs.pop("temp_dir", None),
    )
    return sink, result


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
    command = ffmpeg_command("ffmpeg", header, Encoding(44100, 2, 192, None), "/tmp/d/out.mp3")
    assert command[command.index("-f") + 1] == "wav"
    assert command[command.index("-protocol_whitelist") + 1] == "pipe"
    assert command.index("-protocol_whitelist") < command.index("-i")
    assert command[command.index("-i") + 1] == "pipe:0"
    # The output: a file the service made, and only the file protocol for it.
    assert command[-2:] == ["file", "file:/tmp/d/out.mp3"]
    assert command[-3] == "-protocol_whitelist"
    assert command[command.index("-write_xing") + 1] == "1"
    assert command[command.index("-ac") + 1] == "2"  # MP3 carries at most two channels
    assert "-af" not in command  # no resampling at the source's own rate


def test_a_three_second_stereo_take_converts() -> None:
    wav = wavgen.wav(seconds=3.0, channels=2, rate=44100)
    sink, result = convert(wav, Sink(16 * 1024))
    assert result.duration_seconds == 3.0
    assert result.bitrate_kbps == 192
    assert result.mp3_bytes == len(sink.data)
    assert len(sink.order) > 2 and sink.order[-1] == 1  # in parts, the header's part last
    assert_matches_source(sink.data, wav)  # decoded as MP3: 3 s, stereo, 44.1 kHz, as loud


def test_the_decoded_comparison_fails_on_a_shorter_quieter_or_half_muted_take() -> None:
    """The pydub comparison the audio tests lean on catches what it is there to catch."""
    wav = wavgen.wav(seconds=1.0)
    pcm = array("h", wavgen.samples(seconds=1.0, channels=2, rate=44100, bits=16))
    quieter, half_muted = array("h", (v // 2 for v in pcm)), array("h", pcm)
    half_muted[1::2] = array("h", bytes(len(pcm)))  # the right channel silent
    others = [wavgen.wav(seconds=0.99)] + [
        wavgen.riff(wavgen.fmt_chunk(), wavgen.chunk(b"data", a.tobytes()))
        for a in (quieter, half_muted)
    ]
    for other in others:
        sink, _ = convert(other)
        with pytest.raises(AssertionError):
            assert_matches_source(sink.data, wav)


def test_frame_header_parsing() -> None:
    assert parse_mp3_frame_header(bytes([0xFF, 0xFB, 0xB0, 0x00])) == (192, 44100)
    assert parse_mp3_frame_header(bytes([0xFF, 0xF3, 0x80, 0x00])) == (64, 22050)
    assert parse_mp3_frame_header(b"ID3\x04") is None


def test_trailing_chunks_are_not_audio() -> None:
    tail = wavgen.chunk(b"LIST", b"INFO" + bytes(44100 * 4))  # a second's worth of bytes
    sink, result = convert(wavgen.wav(seconds=1.0, trailing_chunks=(tail,)))
    assert result.duration_seconds == 1.0
    assert_matches_source(sink.data, wavgen.wav(seconds=1.0))


def test_open_ended_data_chunk_streams_to_the_end() -> None:
    pieces = list(wavgen.silence_wav(2.0))
    header = bytearray(pieces[1])
    header[4:8] = b"\xff\xff\xff\xff"
    pieces[1] = bytes(header)
    _sink, result = convert(iter(pieces))
    assert result.duration_seconds == 2.0


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
    assert not sink.parts


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


def _blocked_body(stop: Stop, head: bytes) -> Iterator[bytes]:
    """``head``, then a read that blocks until ``stop`` wakes it (as the bridge's reads do)."""
    woken = threading.Event()
    stop.on_set(woken.set)
    yield head
    woken.wait(30)
    stop.check()
    yield b""  # not reached: woken only by a stop


@pytest.mark.parametrize("phase", ["WAV header", "audio"])
def test_the_deadline_wakes_a_read_that_no_byte_ends(phase: str) -> None:
    stop = Stop()
    wav = wavgen.wav(seconds=5.0)
    head = wav[:20] if phase == "WAV header" else wav[:200_000]
    token = REQUEST_STOP.set(stop)
    started = time.monotonic()
    try:
        with pytest.raises(RequestTimeout):
            convert(_blocked_body(stop, head), timeout=1.0)
    finally:
        REQUEST_STOP.reset(token)
    assert 1.0 <= time.monotonic() - started < 3
    assert isinstance(stop.error, RequestTimeout)
    assert not _ffmpeg_children()


def test_stopping_the_conversions_ends_them_with_the_error_given() -> None:
    stop = Stop()
    errors: list[BaseException] = []

    def run() -> None:
        token = REQUEST_STOP.set(stop)
        try:
            convert(_blocked_body(stop, wavgen.wav(seconds=5.0)[:100_000]))
        except ServiceError as exc:
            errors.append(exc)
        finally:
            REQUEST_STOP.reset(token)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 10
    while not _ffmpeg_children() and time.monotonic() < deadline:
        time.sleep(0.02)
    shutting_down = DependencyUnavailable("server")
    assert stop_conversions(shutting_down) == 1
    worker.join(5)
    assert errors == [shutting_down]
    assert not _ffmpeg_children()
    assert stop_conversions(shutting_down) == 0
    assert not stop.set(RequestTimeout("later")) and stop.error is shutting_down


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


# --- the exact length header --------------------------------------------------------------


def reference_mp3(command: list[str], wav: bytes, tmp_path: Path) -> bytes:
    """What ffmpeg itself writes to a seekable file with the same arguments."""
    reference = tmp_path / "reference.mp3"
    command = [*command[:-1], f"file:{reference}"]
    subprocess.run(command, input=wav, check=True, capture_output=True)
    return reference.read_bytes()


def service_command(wav: bytes, options: EncodingOptions | None = None) -> list[str]:
    header = parse_header(wav)
    assert header is not None
    encoding = (options or EncodingOptions()).resolve(header.sample_rate, header.channels, 192)
    return ffmpeg_command(FFMPEG, header, encoding, "/unused")


@pytest.mark.parametrize(
    ("bits", "tag", "extensible", "channels", "rate"),
    wavgen.ACCEPTED_VARIANTS,
    ids=wavgen.VARIANT_IDS,
)
def test_the_mp3_is_ffmpegs_own_seekable_file_byte_for_byte(
    bits: int, tag: int, extensible: bool, channels: int, rate: int, tmp_path: Path
) -> None:
    wav = wavgen.wav(
        seconds=2.5, channels=channels, rate=rate, bits=bits, tag=tag, extensible=extensible
    )
    # Parts of 4 KiB: many parts, sent while ffmpeg writes, part 1 last.
    sink, result = convert(wav, Sink(4096))
    assert sink.data == reference_mp3(service_command(wav), wav, tmp_path)
    assert sink.order[-1] == 1 and len(sink.order) > 3
    assert sink.data[:3] != b"ID3"  # no tags given, none in the file: no tag at all
    assert result.mp3_bytes == len(sink.data)


@pytest.mark.parametrize(
    ("seconds", "rate", "options"),
    [
        (4.321, 44100, {}),
        (4.321, 48000, {}),
        (3.0, 44100, {"vbr_quality": "2"}),
        (3.0, 48000, {"channels": "1", "bitrate_kbps": "96"}),
        (3.0, 44100, {"sample_rate": "48000"}),
    ],
)
def test_44_1_and_48_khz_decode_to_exactly_the_wavs_samples(
    seconds: float, rate: int, options: dict[str, str], tmp_path: Path
) -> None:
    wav = wavgen.wav(seconds=seconds, channels=2, rate=rate)
    encoding_options = EncodingOptions.from_fields(options)
    sink, result = convert(wav, options=encoding_options)
    out_rate = result.sample_rate
    expected = round(seconds * rate) * out_rate // rate
    assert decode(sink.data, "mp3").frames == expected
    channels = int(options.get("channels", "2"))
    assert_matches_source(sink.data, wav, channels=channels, sample_rate=out_rate)
    assert "Estimating" not in ffprobe_warnings(sink.data)
    assert sink.data == reference_mp3(service_command(wav, encoding_options), wav, tmp_path)


@pytest.mark.parametrize("rate", [8000, 11025, 12000, 16000, 22050, 24000, 32000])
def test_other_rates_decode_within_5_ms(rate: int) -> None:
    wav = wavgen.wav(seconds=4.0, channels=1, rate=rate, bits=16)
    sink, result = convert(wav)
    assert result.sample_rate == rate
    assert_matches_source(sink.data, wav, frames_tolerance=round(0.005 * rate))
    assert "Estimating" not in ffprobe_warnings(sink.data)


def test_the_header_frame_is_read_back() -> None:
    sink, _ = convert(wavgen.wav(seconds=2.0, channels=2, rate=44100))
    xing = parse_xing(sink.data)
    assert xing is not None and not xing.vbr  # "Info": constant bitrate
    assert xing.samples == 88200
    assert xing.bytes == len(sink.data)
    assert xing.delay > 0 and xing.padding > 0


def test_vbr_gets_a_xing_header_and_reports_its_average() -> None:
    sink, result = convert(
        wavgen.wav(seconds=3.0, channels=2, rate=44100),
        options=EncodingOptions.from_fields({"vbr_quality": "4"}),
    )
    xing = parse_xing(sink.data)
    assert xing is not None and xing.vbr
    assert result.vbr_quality == 4
    assert 32 <= result.bitrate_kbps <= 320
    assert abs(result.bitrate_kbps - len(sink.data) * 8 / 3.0 / 1000) < 10


def test_downmix_and_resample(tmp_path: Path) -> None:
    options = EncodingOptions.from_fields({"channels": 1, "sample_rate": 22050, "bitrate_kbps": 64})
    wav = wavgen.wav(seconds=2.0, channels=2, rate=48000)
    sink, result = convert(wav, options=options)
    assert (result.channels, result.sample_rate, result.bitrate_kbps) == (1, 22050, 64)
    assert_matches_source(sink.data, wav, channels=1, sample_rate=22050)
    command = service_command(wavgen.wav(seconds=0.1, channels=2, rate=48000), options)
    assert command[command.index("-af") + 1] == RESAMPLER


def test_a_bitrate_the_output_rate_lacks_is_refused_before_ffmpeg() -> None:
    # 8 kHz is MPEG-2.5, where LAME stops at 64 kbit/s; the rate is the source's own.
    options = EncodingOptions.from_fields({"bitrate_kbps": "128"})
    with pytest.raises(InvalidOption) as info:
        convert(wavgen.wav(seconds=0.5, channels=1, rate=8000), options=options)
    assert info.value.field == "bitrate_kbps" and info.value.status == 422
    assert not _ffmpeg_children()


def test_disk_use_stays_at_about_two_parts(tmp_path: Path) -> None:
    """Parts behind the first are freed (holes punched) as soon as they are handed over."""
    part = 256 * 1024
    peaks: list[int] = []

    class Watching(Sink):
        def write_part(self, number: int, data: bytes | bytearray) -> None:
            super().write_part(number, data)
            for f in tmp_path.glob("mp3-*/out.mp3"):
                peaks.append(f.stat().st_blocks * 512)

    wav = wavgen.wav(seconds=60.0, channels=2, rate=44100)
    _, result = convert(wav, Watching(part), temp_dir=str(tmp_path))
    assert result.mp3_bytes > 5 * part  # 1.44 MB: 6 parts
    # Part 1, the part filling, and what ffmpeg writes after its input ended (the MP3 of
    # its 1 MiB input pipe: 6 s, 144 kB), sent when it exits.
    assert max(peaks) <= 2 * part + 150_000 + 64 * 1024, peaks
    assert not list(tmp_path.iterdir())  # the temporary file and its directory are gone


def test_tags_are_an_id3v2_4_tag_in_front_of_ffmpegs_bytes(tmp_path: Path) -> None:
    tags = {
        "title": "Über den Wolken — Live",
        "artist": "Reinhard Mey",
        "album": "Mädchen in den Akten",
        "date": "1974-05-01",
        "comment": "take 3, 日本語 ok",
    }
    wav = wavgen.wav(seconds=1.0, channels=2, rate=44100)
    options = EncodingOptions.from_fields(tags)
    sink, result = convert(wav, Sink(4096), options=options)
    assert result.tags == tags
    start = audio_start(sink.data)
    assert sink.data[start:] == reference_mp3(service_command(wav, options), wav, tmp_path)
    tag = read_id3(sink.data)
    assert tag.version == (2, 4, 0)
    assert sorted(tag.frames) == ["COMM::XXX", "TALB", "TDRC", "TIT2", "TPE1"]
    assert set(tag.encodings) == {3}  # UTF-8
    assert tag.text("TIT2") == tags["title"]
    assert tag.text("TPE1") == tags["artist"]
    assert tag.text("TALB") == tags["album"]
    assert tag.text("TDRC") == tags["date"]
    assert tag.frames["COMM::XXX"] == [tags["comment"]]
    # mutagen counts whole frames from the Info header (it reads the delay and padding only
    # from a LAME-branded header): 40 frames of 1152 samples.
    assert mutagen_length(sink.data) == 40 * 1152 / 44100


def test_hostile_tag_text_never_reaches_the_command_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[list[str]] = []
    real_popen = subprocess.Popen

    def spy(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        seen.append(list(args))
        return real_popen(args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", spy)  # the module conversion calls it through
    hostile = {
        "title": "-i /etc/passwd -f mp3 http://127.0.0.1:9/x",
        "artist": "concat:file:/etc/passwd|pipe:0",
        "album": "file:/etc/shadow",
        "comment": "-metadata title=x -y /tmp/evil.mp3",
    }
    sink, _ = convert(wavgen.wav(seconds=0.5), options=EncodingOptions.from_fields(hostile))
    (command,) = seen
    assert not any(value in arg for value in hostile.values() for arg in command)
    assert all(
        arg.startswith(("-", "file:/", "pipe:"))
        or arg.isalnum()
        or arg in (FFMPEG, "0:a:0", "-1", "192k", RESAMPLER)
        for arg in command
    ), command
    tag = read_id3(sink.data)
    assert tag.text("TIT2") == hostile["title"]  # kept as text, verbatim
    assert tag.text("TPE1") == hostile["artist"]
    assert not Path("/tmp/evil.mp3").exists()


def test_tags_fall_back_to_the_wavs_own_chunks(tmp_path: Path) -> None:
    info = wavgen.info_chunk({b"INAM": "Header title", b"IART": "Band", b"ICRD": "2021-03-04"})
    trailing_info = wavgen.info_chunk({b"IPRD": "Trailing album", b"ICMT": "after the data"})
    id3 = wavgen.id3_chunk(title="ID3 title", picture=True)
    wav = wavgen.wav(seconds=1.0, extra_chunks=(info,), trailing_chunks=(trailing_info, id3))
    sink, result = convert(wav, options=EncodingOptions.from_fields({"artist": "Field artist"}))
    assert result.tags == {
        "title": "ID3 title",  # the id3 chunk wins over INFO, wherever it is
        "artist": "Field artist",  # a field wins over the file
        "album": "Trailing album",  # trailing chunks are read too (part 1 is sent last)
        "date": "2021-03-04",
        "comment": "after the data",
    }
    # Nothing else is copied from the file: the id3 chunk's picture and private frame stay out.
    assert sorted(read_id3(sink.data).frames) == ["COMM::XXX", "TALB", "TDRC", "TIT2", "TPE1"]
    assert result.duration_seconds == 1.0
