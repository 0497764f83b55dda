"""ID3v2: the tag the service writes in front of every MP3, and the one a WAV may carry.

The service writes the tag itself, not ffmpeg: ffmpeg 5.1's ID3v2 writer has no COMM frame
(a ``comment`` becomes a ``TXXX:comment`` that players do not show as the comment) and adds
its own ``TSSE`` encoder frame. This writer emits ID3v2.4 with exactly the frames asked for,
all UTF-8, and nothing else; the audio after it is ffmpeg's own file, byte for byte. Tag text
therefore never reaches ffmpeg's command line.

The reader takes the ``id3 `` chunk some WAV writers add (ID3v2.2, 2.3 or 2.4) and keeps only
the five fields the service stores; pictures, private and encoder frames are ignored.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

# field name -> ID3v2.4 frame id (COMM is special: language and description before the text)
FRAMES = {"title": "TIT2", "artist": "TPE1", "album": "TALB", "date": "TDRC", "comment": "COMM"}
_UTF8 = 3
_UNKNOWN_LANGUAGE = b"XXX"  # ID3v2.4 section 4.10: the language when it is not known
_READ = {
    "TIT2": "title", "TT2": "title",
    "TPE1": "artist", "TP1": "artist",
    "TALB": "album", "TAL": "album",
    "TDRC": "date", "TYER": "date", "TYE": "date",
    "COMM": "comment", "COM": "comment",
}  # fmt: skip


def build_tag(tags: Mapping[str, str]) -> bytes:
    """An ID3v2.4 tag holding ``tags`` (names from :data:`FRAMES`), or b"" when there are none."""
    body = bytearray()
    for name, frame_id in FRAMES.items():
        text = tags.get(name)
        if not text:
            continue
        if frame_id == "COMM":
            payload = bytes([_UTF8]) + _UNKNOWN_LANGUAGE + b"\0" + text.encode("utf-8")
        else:
            payload = bytes([_UTF8]) + text.encode("utf-8")
        body += frame_id.encode("ascii") + _syncsafe(len(payload)) + b"\0\0" + payload
    if not body:
        return b""
    return b"ID3\x04\x00\x00" + _syncsafe(len(body)) + bytes(body)


def read_tag(data: bytes) -> dict[str, str]:
    """The title/artist/album/date/comment of the ID3v2 tag at the start of ``data``.

    Lenient: a malformed or truncated tag yields what could be read before the damage.
    """
    if len(data) < 10 or data[:3] != b"ID3" or data[3] not in (2, 3, 4):
        return {}
    version, flags = data[3], data[5]
    end = min(len(data), 10 + _unsyncsafe(data[6:10]))
    body = data[10:end]
    if flags & 0x80 and version < 4:  # whole-tag unsynchronisation (2.4 does it per frame)
        body = body.replace(b"\xff\x00", b"\xff")
    pos = 0
    if flags & 0x40 and version >= 3:  # an extended header: skip it
        if len(body) < 4:
            return {}
        pos = _unsyncsafe(body[:4]) if version == 4 else 4 + struct.unpack(">I", body[:4])[0]
    found: dict[str, str] = {}
    id_size = 3 if version == 2 else 4
    header_size = 6 if version == 2 else 10
    while pos + header_size <= len(body):
        frame_id = body[pos : pos + id_size]
        if not frame_id.strip(b"\0") or not frame_id.isalnum():
            break  # padding, or garbage
        if version == 2:
            size = int.from_bytes(body[pos + 3 : pos + 6], "big")
            frame_flags = 0
        else:
            raw_size = body[pos + 4 : pos + 8]
            size = _unsyncsafe(raw_size) if version == 4 else int.from_bytes(raw_size, "big")
            frame_flags = int.from_bytes(body[pos + 8 : pos + 10], "big")
        payload = body[pos + header_size : pos + header_size + size]
        pos += header_size + size
        name = _READ.get(frame_id.decode("ascii"))
        if name is None or name in found or len(payload) < size:
            continue
        content = _frame_payload(payload, version, frame_flags)
        if content is None:
            continue
        text = _comment(content) if name == "comment" else _text(content)
        if text:
            found[name] = text
    return found


def _frame_payload(payload: bytes, version: int, flags: int) -> bytes | None:
    """The frame's data with its format flags undone; None if compressed or encrypted."""
    if version == 3:
        if flags & 0x00C0:  # compression, encryption
            return None
        return payload[1:] if flags & 0x0020 else payload  # group id byte
    if version == 4:
        if flags & 0x000C:  # compression, encryption
            return None
        if flags & 0x0040:  # group id byte
            payload = payload[1:]
        if flags & 0x0001:  # data length indicator
            payload = payload[4:]
        if flags & 0x0002:
            payload = payload.replace(b"\xff\x00", b"\xff")
    return payload


def _decode(encoding: int, raw: bytes) -> str:
    if encoding == 1:
        text = raw.decode("utf-16", "replace")
    elif encoding == 2:
        text = raw.decode("utf-16-be", "replace")
    elif encoding == 3:
        text = raw.decode("utf-8", "replace")
    else:
        text = raw.decode("latin-1")
    return text


def _split(encoding: int, raw: bytes) -> list[bytes]:
    """``raw`` cut at the encoding's terminator (one NUL, or two aligned for UTF-16)."""
    if encoding in (1, 2):
        parts, start = [], 0
        for i in range(0, len(raw) - 1, 2):
            if raw[i : i + 2] == b"\0\0":
                parts.append(raw[start:i])
                start = i + 2
        parts.append(raw[start:])
        return parts
    return raw.split(b"\0")


def _text(payload: bytes) -> str:
    if not payload:
        return ""
    encoding = payload[0]
    values = [_decode(encoding, v) for v in _split(encoding, payload[1:])]
    return " / ".join(v for v in values if v)


def _comment(payload: bytes) -> str:
    if len(payload) < 4:
        return ""
    encoding = payload[0]
    parts = _split(encoding, payload[4:])  # after encoding and language: description, text
    if len(parts) < 2:
        return ""
    description = _decode(encoding, parts[0])
    if description:  # iTunNORM and the like: data for players, not the comment
        return ""
    return _decode(encoding, b"\0".join(parts[1:]) if encoding in (0, 3) else parts[1])


def _syncsafe(value: int) -> bytes:
    return bytes([(value >> 21) & 0x7F, (value >> 14) & 0x7F, (value >> 7) & 0x7F, value & 0x7F])


def _unsyncsafe(raw: bytes) -> int:
    value = 0
    for byte in raw[:4]:
        value = (value << 7) | (byte & 0x7F)
    return value
