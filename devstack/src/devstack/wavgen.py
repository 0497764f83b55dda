"""Building WAV files for tests: every supported variant, and broken ones on purpose."""

from __future__ import annotations

import math
import random
import struct
import sys
from array import array
from collections.abc import Iterator
from typing import Any

PCM, FLOAT, EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")


def fmt_chunk(
    *,
    tag: int = PCM,
    channels: int = 2,
    rate: int = 44100,
    bits: int = 16,
    extensible: bool = False,
    block_align: int | None = None,
) -> bytes:
    align = block_align if block_align is not None else channels * bits // 8
    if extensible:
        body = struct.pack("<HHIIHH", EXTENSIBLE, channels, rate, rate * align, align, bits)
        mask = (1 << channels) - 1
        body += struct.pack("<HHI", 22, bits, mask) + struct.pack("<H", tag) + GUID_TAIL
    else:
        body = struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits)
    return chunk(b"fmt ", body)


def chunk(chunk_id: bytes, body: bytes, declared: int | None = None) -> bytes:
    size = len(body) if declared is None else declared
    return chunk_id + struct.pack("<I", size) + body + (b"\0" if len(body) % 2 else b"")


def riff(*chunks: bytes, magic: bytes = b"RIFF") -> bytes:
    payload = b"WAVE" + b"".join(chunks)
    return magic + struct.pack("<I", len(payload)) + payload


def samples(
    *, seconds: float, channels: int, rate: int, bits: int, tag: int = PCM, freq: float = 440.0
) -> bytes:
    """A sine tone, interleaved, in the given sample format."""
    frames = round(seconds * rate)
    out = bytearray()
    for n in range(frames):
        value = 0.5 * math.sin(2 * math.pi * freq * n / rate)
        if tag == FLOAT:
            sample = struct.pack("<f" if bits == 32 else "<d", value)
        elif bits == 8:
            sample = struct.pack("<B", int(128 + value * 127))
        elif bits == 16:
            sample = struct.pack("<h", int(value * 32767))
        elif bits == 24:
            sample = int(value * 8388607).to_bytes(3, "little", signed=True)
        else:
            sample = struct.pack("<i", int(value * 2147483647))
        out += sample * channels
    return bytes(out)


def wav(
    *,
    seconds: float = 1.0,
    channels: int = 2,
    rate: int = 44100,
    bits: int = 16,
    tag: int = PCM,
    extensible: bool = False,
    extra_chunks: tuple[bytes, ...] = (),
    trailing_chunks: tuple[bytes, ...] = (),
) -> bytes:
    data = samples(seconds=seconds, channels=channels, rate=rate, bits=bits, tag=tag)
    return riff(
        fmt_chunk(tag=tag, channels=channels, rate=rate, bits=bits, extensible=extensible),
        *extra_chunks,
        chunk(b"data", data),
        *trailing_chunks,
    )


def stream_wav(
    data_bytes: int, block: bytes, *, channels: int = 2, rate: int = 44100
) -> Iterator[bytes]:
    """A 16-bit WAV of ``data_bytes`` of audio, ``block`` over and over, generated as it is read."""
    fmt = fmt_chunk(channels=channels, rate=rate)
    yield b"RIFF" + struct.pack("<I", 4 + len(fmt) + 8 + data_bytes) + b"WAVE" + fmt
    yield b"data" + struct.pack("<I", data_bytes)
    left = data_bytes
    while left > 0:
        piece = block[: min(len(block), left)]
        left -= len(piece)
        yield piece


# What stream_wav writes before the audio: the RIFF header, the fmt chunk, the data header.
STREAM_HEADER_BYTES = 44


def silence_wav(seconds: float, *, channels: int = 2, rate: int = 44100) -> Iterator[bytes]:
    """A large 16-bit WAV generated in pieces, never whole in memory."""
    size = int(seconds * rate) * channels * 2
    yield from stream_wav(size, bytes(channels * 2 * 4096), channels=channels, rate=rate)


def recording_second(rate: int = 44100) -> bytes:
    """One second of stereo 16-bit audio that encodes like a recording: two tones and noise.

    Silence or one pure tone would encode faster than speech or music does; the noise is
    seeded, so every run converts the same audio.
    """
    rng = random.Random(5)
    out = array("h")
    for n in range(rate):
        t = n / rate
        base = 0.3 * math.sin(2 * math.pi * 220 * t) + 0.2 * math.sin(2 * math.pi * 1375 * t)
        out.append(int((base + rng.uniform(-0.15, 0.15)) * 32767))
        out.append(int((0.8 * base + rng.uniform(-0.15, 0.15)) * 32767))
    if sys.byteorder != "little":
        out.byteswap()
    return out.tobytes()


def info_chunk(fields: dict[bytes, str]) -> bytes:
    """A LIST/INFO chunk: sub-chunks such as INAM (title) holding NUL-terminated UTF-8."""
    body = b"".join(chunk(key, value.encode("utf-8") + b"\0") for key, value in fields.items())
    return chunk(b"LIST", b"INFO" + body)


def id3_chunk(*, title: str, picture: bool = False, version: int = 3, more: bool = False) -> bytes:
    """An ``id3 `` chunk (as some editors write it): an ID3v2 tag made by mutagen, with a
    UTF-16 title; with ``picture``, the frames the service must not copy (APIC, PRIV, TSSE);
    with ``more``, a Latin-1 artist, a date and two comments (one with a description)."""
    import io

    from mutagen.id3 import APIC, COMM, ID3, PRIV, TDRC, TIT2, TPE1, TSSE, TYER

    frames: list[Any] = [TIT2(encoding=1, text=[title])]
    if picture:
        frames += [
            APIC(encoding=3, mime="image/png", type=3, desc="cover", data=b"\x89PNG" * 64),
            PRIV(owner="com.example", data=b"secret"),
            TSSE(encoding=3, text=["SomeEditor 1.0"]),
        ]
    if more:
        frames += [
            TPE1(encoding=0, text=["Latin-1 ärtist"]),
            COMM(encoding=3, lang="eng", desc="iTunNORM", text=["not a comment"]),
            COMM(encoding=1, lang="eng", desc="", text=["the comment"]),
            TDRC(encoding=3, text=["2019-07-01"])
            if version == 4
            else TYER(encoding=0, text=["2019"]),
        ]
    tag = ID3()
    for frame in frames:
        tag.add(frame)
    buf = io.BytesIO()
    tag.save(buf, v2_version=version, padding=lambda info: 0)
    return chunk(b"id3 ", buf.getvalue())


# Every kind of WAV the header gate accepts, as (bits, tag, extensible, channels, rate): the
# variants the conversion and end-to-end tests run through.
ACCEPTED_VARIANTS = [
    (8, PCM, False, 1, 8000),
    (16, PCM, False, 2, 44100),
    (24, PCM, False, 2, 48000),
    (32, PCM, False, 1, 22050),
    (32, FLOAT, False, 2, 44100),
    (64, FLOAT, False, 1, 16000),
    (24, PCM, True, 6, 48000),
    (32, FLOAT, True, 8, 96000),
    (16, PCM, True, 2, 96000),
    (16, PCM, True, 2, 192000),
    (16, PCM, False, 1, 11025),
    (16, PCM, False, 3, 11025),
    (16, PCM, False, 2, 88200),
    (16, PCM, False, 1, 32000),
    (16, PCM, False, 2, 12000),
]
VARIANT_IDS = [
    f"{'ext-' if e else ''}{'f' if t == FLOAT else 'i'}{b}-{c}ch-{r}"
    for b, t, e, c, r in ACCEPTED_VARIANTS
]
