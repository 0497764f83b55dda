"""ID3v2: the tag the service writes in front of every MP3, and the one a WAV may carry.

The service writes the tag itself, not ffmpeg: ffmpeg 5.1's ID3v2 writer has no COMM frame
(a ``comment`` becomes a ``TXXX:comment`` that players do not show as the comment) and adds
its own ``TSSE`` encoder frame. This writer emits ID3v2.4 with exactly the frames asked for,
all UTF-8, and nothing else; the audio after it is ffmpeg's own file, byte for byte. Tag text
therefore never reaches ffmpeg's command line.

The ``id3 `` chunk some WAV writers add (ID3v2.2, 2.3 or 2.4) is read with mutagen, keeping only
the five fields the service stores.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

from mutagen import MutagenError
from mutagen.id3 import ID3

# field name -> ID3v2.4 frame id (COMM is special: language and description before the text)
FRAMES = {"title": "TIT2", "artist": "TPE1", "album": "TALB", "date": "TDRC", "comment": "COMM"}
_UTF8 = 3
_UNKNOWN_LANGUAGE = b"XXX"  # ID3v2.4 section 4.10: the language when it is not known


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
    """The title/artist/album/date/comment of the ID3v2 tag at the start of ``data`` (read by
    mutagen, which turns v2.2 and v2.3 frames into v2.4's); {} for no tag or an unreadable one."""
    try:
        tag = ID3(io.BytesIO(data))
    except MutagenError:
        return {}
    found: dict[str, str] = {}
    for name, frame_id in FRAMES.items():
        if frame_id == "COMM":
            # Comments with a description (iTunNORM and the like) are data for players.
            texts = [str(t) for f in tag.getall("COMM") if not f.desc for t in f.text]
        else:
            texts = [str(t) for f in tag.getall(frame_id) for t in f.text]
        text = " / ".join(t for t in texts if t)
        if text:
            found[name] = text
    return found


def _syncsafe(value: int) -> bytes:
    return bytes([(value >> 21) & 0x7F, (value >> 14) & 0x7F, (value >> 7) & 0x7F, value & 0x7F])
