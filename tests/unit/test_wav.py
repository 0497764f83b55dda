"""Unit tests of the RIFF/WAVE header gate (common.domain.wav)."""

from __future__ import annotations

import struct

import pytest
from common.domain.wav import (
    MAX_HEADER_BYTES,
    InvalidWav,
    NotAWav,
    SampleFormat,
    UnsupportedWav,
    parse_header,
    trailing_metadata,
)

from devstack import wavgen


@pytest.mark.parametrize(
    ("tag", "bits", "extensible", "expected"),
    [
        (wavgen.PCM, 8, False, SampleFormat.PCM),
        (wavgen.PCM, 16, False, SampleFormat.PCM),
        (wavgen.PCM, 24, False, SampleFormat.PCM),
        (wavgen.PCM, 32, False, SampleFormat.PCM),
        (wavgen.FLOAT, 32, False, SampleFormat.FLOAT),
        (wavgen.FLOAT, 64, False, SampleFormat.FLOAT),
        (wavgen.PCM, 24, True, SampleFormat.PCM),
        (wavgen.FLOAT, 32, True, SampleFormat.FLOAT),
    ],
)
def test_supported_formats_parse(
    tag: int, bits: int, extensible: bool, expected: SampleFormat
) -> None:
    data = wavgen.wav(
        seconds=0.01, channels=2, rate=48000, bits=bits, tag=tag, extensible=extensible
    )
    header = parse_header(data)
    assert header is not None
    assert header.sample_format is expected
    assert (header.channels, header.sample_rate, header.bits_per_sample) == (2, 48000, bits)
    assert header.block_align == 2 * bits // 8
    assert data[header.data_offset - 8 : header.data_offset - 4] == b"data"
    assert header.data_size == len(data) - header.data_offset


def test_metadata_chunks_before_data_are_skipped() -> None:
    junk = wavgen.chunk(b"LIST", b"INFOISFT" + b"x" * 101)  # odd size: padded
    data = wavgen.wav(seconds=0.01, extra_chunks=(junk,))
    header = parse_header(data)
    assert header is not None
    assert header.data_offset == 12 + 24 + len(junk) + 8


def test_needs_more_bytes_until_the_data_chunk() -> None:
    data = wavgen.wav(seconds=0.01)
    for cut in (0, 3, 11, 20, 43):
        assert parse_header(data[:cut]) is None
    assert parse_header(data[:44]) is not None


def test_streaming_writers_open_data_size_is_unknown() -> None:
    fmt = wavgen.fmt_chunk()
    for declared in (0, 0xFFFFFFFF):
        data = (
            b"RIFF" + struct.pack("<I", 0) + b"WAVE" + fmt + b"data" + struct.pack("<I", declared)
        )
        header = parse_header(data)
        assert header is not None
        assert header.data_size is None


def test_rf64_takes_the_size_from_ds64() -> None:
    ds64 = wavgen.chunk(b"ds64", struct.pack("<QQQI", 0, 400, 100, 0))
    data = wavgen.riff(
        ds64,
        wavgen.fmt_chunk(),
        wavgen.chunk(b"data", bytes(400), declared=0xFFFFFFFF),
        magic=b"RF64",
    )
    header = parse_header(data)
    assert header is not None
    assert header.data_size == 400


@pytest.mark.parametrize(
    "data",
    [
        b"ID3\x04\x00" + bytes(100),  # an MP3
        b"OggS" + bytes(100),
        b"#EXTM3U\nfile:///etc/passwd\n",
        b"RIFF\x00\x00\x00\x00AVI LIST",
        b"",
        b"RI",
    ],
)
def test_not_a_wav_is_415(data: bytes) -> None:
    with pytest.raises(NotAWav) as info:
        parse_header(data, at_eof=True)
    assert info.value.status == 415


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        (wavgen.fmt_chunk(tag=0x0055), "MP3"),
        (wavgen.fmt_chunk(tag=0x0011, bits=4, block_align=1024), "IMA ADPCM"),
        (wavgen.fmt_chunk(tag=0x0002, bits=4, block_align=512), "ADPCM"),
        (wavgen.fmt_chunk(bits=12, block_align=4), "12-bit"),
        (wavgen.fmt_chunk(tag=wavgen.FLOAT, bits=16), "16-bit FLOAT"),
    ],
)
def test_unsupported_encodings_are_415(fmt: bytes, message: str) -> None:
    data = wavgen.riff(fmt, wavgen.chunk(b"data", bytes(64)))
    with pytest.raises(UnsupportedWav, match=message) as info:
        parse_header(data)
    assert info.value.status == 415


def test_extensible_with_unknown_guid_is_415() -> None:
    fmt = bytearray(wavgen.fmt_chunk(extensible=True))
    fmt[8 + 24 + 2 :] = bytes(14)  # clobber the GUID tail
    with pytest.raises(UnsupportedWav, match="GUID"):
        parse_header(wavgen.riff(bytes(fmt), wavgen.chunk(b"data", bytes(64))))


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        (wavgen.fmt_chunk(channels=0, block_align=0), "0 channels"),
        (wavgen.fmt_chunk(channels=9), "9 channels"),
        (wavgen.fmt_chunk(rate=4000), "4000 Hz"),
        (wavgen.fmt_chunk(rate=384000), "384000 Hz"),
        (wavgen.fmt_chunk(rate=0), "0 Hz"),
        (wavgen.fmt_chunk(block_align=3), "block alignment"),
        (wavgen.chunk(b"fmt ", bytes(10)), "shorter than 16"),
    ],
)
def test_invalid_headers_are_422(fmt: bytes, message: str) -> None:
    with pytest.raises(InvalidWav, match=message) as info:
        parse_header(wavgen.riff(fmt, wavgen.chunk(b"data", bytes(64))))
    assert info.value.status == 422


def test_data_before_fmt_is_422() -> None:
    with pytest.raises(InvalidWav, match="no 'fmt '"):
        parse_header(wavgen.riff(wavgen.chunk(b"data", bytes(64)), wavgen.fmt_chunk()))


def test_huge_chunk_before_data_is_refused_without_reading_it() -> None:
    data = wavgen.riff(wavgen.fmt_chunk()) + b"LIST" + struct.pack("<I", 0x7FFFFFF0)
    with pytest.raises(InvalidWav, match="must start within"):
        parse_header(data)


def test_header_search_is_bounded() -> None:
    many = b"".join(wavgen.chunk(b"JUNK", bytes(1000)) for _ in range(MAX_HEADER_BYTES // 1008 + 2))
    with pytest.raises(InvalidWav):
        parse_header(wavgen.riff(wavgen.fmt_chunk(), many))


def test_garbage_chunk_ids_are_422() -> None:
    data = wavgen.riff(wavgen.fmt_chunk()) + b"\x00\x01\x02\x03" + struct.pack("<I", 4) + bytes(4)
    with pytest.raises(InvalidWav, match="Malformed chunk"):
        parse_header(data)


def test_truncated_header_at_eof_is_422() -> None:
    data = wavgen.wav(seconds=0.01)[:30]
    with pytest.raises(InvalidWav, match="ends before"):
        parse_header(data, at_eof=True)


def _ambiguous(name: str) -> bytes:
    tone = wavgen.samples(seconds=0.01, channels=2, rate=44100, bits=16)
    fmt, data = wavgen.fmt_chunk(), wavgen.chunk(b"data", tone)
    if name == "two fmt chunks":  # the gate kept the last, ffmpeg the first
        return wavgen.riff(fmt, wavgen.fmt_chunk(channels=1, rate=8000), data)
    if name == "data past the RIFF size":
        whole = wavgen.riff(fmt, data)
        return whole[:4] + struct.pack("<I", len(whole) - 8 - 100) + whole[8:]
    if name == "valid bits of another sample size":  # ffmpeg reads 8-bit samples
        ext = wavgen.fmt_chunk(bits=32, extensible=True)
        ext = ext[:26] + struct.pack("<H", 8) + ext[28:]
        return wavgen.riff(ext, wavgen.chunk(b"data", bytes(400)))
    ds64 = wavgen.chunk(b"ds64", struct.pack("<QQQI", 0, 400, 100, 0))
    return wavgen.riff(ds64, fmt, wavgen.chunk(b"data", bytes(200)), magic=b"RF64")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("two fmt chunks", "more than one 'fmt '"),
        ("data past the RIFF size", "goes past the end its RIFF header declares"),
        ("valid bits of another sample size", "8 valid bits in 32-bit samples"),
        ("RF64 data size not ds64's", "ds64 chunk 400"),
    ],
)
def test_a_header_two_readers_could_read_differently_is_422(name: str, message: str) -> None:
    with pytest.raises(InvalidWav, match=message):
        parse_header(_ambiguous(name))


@pytest.mark.parametrize("chunk_id", [b"data", b"fmt "])
def test_a_second_data_or_fmt_chunk_after_the_audio_is_422(chunk_id: bytes) -> None:
    second = wavgen.chunk(chunk_id, wavgen.fmt_chunk(channels=1)[8:])
    with pytest.raises(InvalidWav, match="second"):
        trailing_metadata(second)


def test_metadata_after_the_audio_is_still_read() -> None:
    info = wavgen.info_chunk({b"INAM": "Take"})
    assert trailing_metadata(wavgen.chunk(b"JUNK", bytes(3)) + info)[0][0] == b"LIST"
