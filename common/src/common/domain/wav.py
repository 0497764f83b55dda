"""RIFF/WAVE header parsing: the gate every upload passes before ffmpeg sees a byte.

Only uncompressed audio is accepted, and only in a file that no two readers could read
differently; anything else is refused here with a message that says why (docs/api.md lists
the formats, docs/security.md, "Hostile input", the ambiguities refused). The file's own tags
(``LIST``/``INFO`` and ``id3 `` chunks) are read here too, after the audio data as well, from
the bytes the conversion keeps for that (:data:`MAX_TRAILING_BYTES`): docs/encoding.md, "Tags".
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from common.domain.encoding import TAG_FIELDS, clean_file_tag
from common.domain.id3 import read_tag
from common.errors import UnprocessableContent, UnsupportedMediaType

WAVE_FORMAT_PCM = 0x0001
WAVE_FORMAT_IEEE_FLOAT = 0x0003
WAVE_FORMAT_EXTENSIBLE = 0xFFFE
# The KSDATAFORMAT_SUBTYPE GUIDs share this tail after their 16-bit format code.
_GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")

MIN_CHANNELS, MAX_CHANNELS = 1, 8
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8_000, 192_000
# Bytes we are willing to read looking for the "data" chunk (metadata chunks come first).
MAX_HEADER_BYTES = 1024 * 1024
UNKNOWN_SIZES = (0, 0xFFFFFFFF)
# Bytes after the audio data kept to look for trailing LIST/INFO and id3 chunks.
MAX_TRAILING_BYTES = 1024 * 1024
METADATA_CHUNKS = (b"LIST", b"id3 ", b"ID3 ")
# LIST/INFO sub-chunk -> tag field
INFO_FIELDS = {b"INAM": "title", b"IART": "artist", b"IPRD": "album", b"ICRD": "date",
               b"ICMT": "comment"}  # fmt: skip

_KNOWN_CODECS = {
    0x0002: "Microsoft ADPCM",
    0x0006: "A-law",
    0x0007: "mu-law",
    0x0011: "IMA ADPCM",
    0x0031: "GSM 6.10",
    0x0050: "MPEG audio",
    0x0055: "MP3",
    0x00FF: "AAC",
    0x2000: "AC-3",
}


class SampleFormat(StrEnum):
    PCM = "pcm"
    FLOAT = "float"


@dataclass(frozen=True, slots=True)
class WavHeader:
    sample_format: SampleFormat
    channels: int
    sample_rate: int
    bits_per_sample: int
    block_align: int
    data_offset: int  # bytes before the first audio byte
    data_size: int | None  # declared size of the audio data, None when the writer left it open
    # (chunk id, payload) of the LIST and id3 chunks before the audio data
    metadata: tuple[tuple[bytes, bytes], ...] = ()


class NotAWav(UnsupportedMediaType):
    slug = "not-a-wav"
    title = "Not a WAV File"


class UnsupportedWav(UnsupportedMediaType):
    slug = "unsupported-wav-encoding"
    title = "Unsupported WAV Encoding"


class InvalidWav(UnprocessableContent):
    slug = "invalid-wav"
    title = "Invalid WAV File"


def looks_like_wav(prefix: bytes) -> bool:
    return len(prefix) >= 12 and prefix[:4] in (b"RIFF", b"RF64") and prefix[8:12] == b"WAVE"


def parse_header(buf: bytes, *, at_eof: bool = False) -> WavHeader | None:
    """Parse the header at the start of ``buf``.

    Returns None while more bytes are needed (unless ``at_eof``), the header once the ``data``
    chunk starts, and raises NotAWav / UnsupportedWav / InvalidWav otherwise.
    """
    if len(buf) < 12:
        if at_eof or not _could_be_wav_prefix(buf):
            raise NotAWav("The file is not a WAV file (it does not start with a RIFF/WAVE header).")
        return None
    if not looks_like_wav(buf):
        if buf[:4] == b"RIFX":
            raise UnsupportedWav("Big-endian WAV (RIFX) is not supported; send little-endian WAV.")
        raise NotAWav("The file is not a WAV file (it does not start with a RIFF/WAVE header).")
    rf64 = buf[:4] == b"RF64"
    (riff_size,) = struct.unpack_from("<I", buf, 4)
    pos = 12
    fmt: tuple[SampleFormat, int, int, int, int] | None = None
    ds64_data_size: int | None = None
    metadata: list[tuple[bytes, bytes]] = []
    first_chunk = True
    while True:
        if pos + 8 > len(buf):
            _need_more(buf, at_eof)
            return None
        chunk_id = buf[pos : pos + 4]
        (size,) = struct.unpack_from("<I", buf, pos + 4)
        body = pos + 8
        if rf64 and first_chunk and chunk_id != b"ds64":
            raise InvalidWav("An RF64 file must start with a ds64 chunk.")
        first_chunk = False
        if chunk_id == b"data":
            if fmt is None:
                raise InvalidWav("The WAV file has no 'fmt ' chunk before its audio data.")
            sample_format, channels, rate, bits, align = fmt
            declared: int | None = size
            if rf64 and size == 0xFFFFFFFF:
                declared = ds64_data_size
            elif rf64 and size != ds64_data_size:
                raise InvalidWav(
                    f"The RF64 data chunk declares {size} bytes and its ds64 chunk "
                    f"{ds64_data_size}: refusing a file readers could take either way."
                )
            if declared in UNKNOWN_SIZES:
                declared = None
            if (
                not rf64
                and declared is not None
                and riff_size not in UNKNOWN_SIZES
                and body + declared > 8 + riff_size
            ):
                raise InvalidWav(
                    f"The WAV file's audio data ({declared} bytes from byte {body}) goes past "
                    f"the end its RIFF header declares ({8 + riff_size} bytes)."
                )
            return WavHeader(
                sample_format, channels, rate, bits, align, body, declared, tuple(metadata)
            )
        if not all(0x20 <= c <= 0x7E for c in chunk_id):
            raise InvalidWav(f"Malformed chunk header at byte {pos} of the WAV file.")
        end = body + size + (size & 1)
        if end > MAX_HEADER_BYTES:
            raise InvalidWav(
                f"The WAV file's '{chunk_id.decode('ascii')}' chunk declares {size} bytes; "
                f"the audio data must start within the first {MAX_HEADER_BYTES} bytes."
            )
        if end > len(buf):
            _need_more(buf, at_eof)
            return None
        payload = buf[body : body + size]
        if chunk_id == b"fmt ":
            if fmt is not None:
                raise InvalidWav(
                    "The WAV file has more than one 'fmt ' chunk; send a file with one."
                )
            fmt = _parse_fmt(payload)
        elif chunk_id == b"ds64" and rf64:
            if size < 24:
                raise InvalidWav("The RF64 ds64 chunk is too short.")
            (ds64_data_size,) = struct.unpack_from("<Q", payload, 8)
        elif chunk_id in METADATA_CHUNKS:
            metadata.append((chunk_id, payload))
        pos = end


def trailing_metadata(data: bytes) -> tuple[tuple[bytes, bytes], ...]:
    """The LIST and id3 chunks in ``data``, the bytes right after the audio data's chunk.

    Lenient: a truncated or malformed chunk ends the search. Only a second ``data`` or
    ``fmt `` chunk is refused (InvalidWav): another reader might play that audio instead.
    """
    found = []
    pos = 0
    while pos + 8 <= len(data):
        chunk_id = data[pos : pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        if not all(0x20 <= c <= 0x7E for c in chunk_id) or pos + 8 + size > len(data):
            break
        if chunk_id in METADATA_CHUNKS:
            found.append((chunk_id, data[pos + 8 : pos + 8 + size]))
        elif chunk_id in (b"data", b"fmt "):
            name = chunk_id.decode("ascii").strip()
            raise InvalidWav(
                f"The WAV file has a second '{name}' chunk after its audio data; "
                "send a file with one."
            )
        pos += 8 + size + (size & 1)
    return tuple(found)


def file_tags(chunks: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Tags from a WAV's metadata chunks: id3 chunks first, then LIST/INFO; earlier wins."""
    chunks = list(chunks)
    raw: dict[str, str] = {}
    for chunk_id, payload in chunks:
        if chunk_id != b"LIST":
            for name, value in read_tag(payload).items():
                raw.setdefault(name, value)
    for chunk_id, payload in chunks:
        if chunk_id == b"LIST" and payload[:4] == b"INFO":
            for name, value in _info_fields(payload[4:]).items():
                raw.setdefault(name, value)
    tags = {}
    for name in TAG_FIELDS:
        cleaned = clean_file_tag(name, raw[name]) if name in raw else None
        if cleaned:
            tags[name] = cleaned
    return tags


def _info_fields(data: bytes) -> dict[str, str]:
    found: dict[str, str] = {}
    pos = 0
    while pos + 8 <= len(data):
        sub_id = data[pos : pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        value = data[pos + 8 : pos + 8 + size].split(b"\0", 1)[0]
        pos += 8 + size + (size & 1)
        name = INFO_FIELDS.get(sub_id)
        if name and name not in found and value:
            try:
                found[name] = value.decode("utf-8")
            except UnicodeDecodeError:  # no encoding is declared: the older writers' cp1252
                found[name] = value.decode("cp1252", "replace")
    return found


def _could_be_wav_prefix(buf: bytes) -> bool:
    head = buf[:4]
    return any(magic.startswith(head) for magic in (b"RIFF", b"RF64", b"RIFX"))


def _need_more(buf: bytes, at_eof: bool) -> None:
    if at_eof:
        raise InvalidWav("The WAV file ends before its audio data starts.")
    if len(buf) >= MAX_HEADER_BYTES:
        raise InvalidWav(f"No audio data found in the first {MAX_HEADER_BYTES} bytes.")
    return


def _parse_fmt(payload: bytes) -> tuple[SampleFormat, int, int, int, int]:
    if len(payload) < 16:
        raise InvalidWav("The WAV 'fmt ' chunk is shorter than 16 bytes.")
    tag, channels, rate, _byte_rate, align, bits = struct.unpack_from("<HHIIHH", payload, 0)
    if tag == WAVE_FORMAT_EXTENSIBLE:
        if len(payload) < 40:
            raise InvalidWav("The WAVE_FORMAT_EXTENSIBLE 'fmt ' chunk is shorter than 40 bytes.")
        (valid_bits,) = struct.unpack_from("<H", payload, 18)
        guid = payload[24:40]
        if guid[2:] != _GUID_TAIL:
            raise UnsupportedWav(
                "The WAV file's extensible sub-format GUID is unknown; "
                "only PCM and IEEE float are supported."
            )
        (tag,) = struct.unpack_from("<H", guid, 0)
        if valid_bits > bits or (valid_bits and (valid_bits + 7) // 8 != bits // 8):
            raise InvalidWav(
                f"The WAV file declares {valid_bits} valid bits in {bits}-bit samples."
            )
    if tag == WAVE_FORMAT_PCM:
        sample_format = SampleFormat.PCM
        allowed_bits: tuple[int, ...] = (8, 16, 24, 32)
    elif tag == WAVE_FORMAT_IEEE_FLOAT:
        sample_format = SampleFormat.FLOAT
        allowed_bits = (32, 64)
    else:
        name = _KNOWN_CODECS.get(tag, f"format 0x{tag:04X}")
        raise UnsupportedWav(
            f"The WAV file holds {name} audio; only uncompressed PCM and IEEE float are supported."
        )
    if bits not in allowed_bits:
        raise UnsupportedWav(
            f"{bits}-bit {sample_format.value.upper()} samples are not supported; "
            f"use {', '.join(map(str, allowed_bits))}-bit."
        )
    if not MIN_CHANNELS <= channels <= MAX_CHANNELS:
        raise InvalidWav(
            f"The WAV file declares {channels} channels; {MIN_CHANNELS} to {MAX_CHANNELS} are "
            "supported."
        )
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise InvalidWav(
            f"The WAV file declares a sample rate of {rate} Hz; "
            f"{MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz are supported."
        )
    if align != channels * bits // 8:
        raise InvalidWav(
            f"The WAV file's block alignment ({align}) does not match "
            f"{channels} channels of {bits}-bit samples."
        )
    return sample_format, channels, rate, bits, align
