"""ffprobe and mutagen on MP3 bytes: the codec, headers and tags the service wrote.

The decoded audio itself is compared with its source in :mod:`tests.support.audio` (pydub).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Mp3Info:
    codec: str
    sample_rate: int
    channels: int
    bit_rate: int
    duration: float


def probe_mp3(data: bytes) -> Mp3Info:
    with tempfile.NamedTemporaryFile(suffix=".mp3") as f:
        f.write(data)
        f.flush()
        out = subprocess.run(
            [
                "ffprobe", "-v", "error", "-print_format", "json",
                "-show_streams", "-show_format", f.name,
            ],
            capture_output=True,
            check=True,
        ).stdout  # fmt: skip
    info = json.loads(out)
    stream = info["streams"][0]
    return Mp3Info(
        codec=stream["codec_name"],
        sample_rate=int(stream["sample_rate"]),
        channels=int(stream["channels"]),
        bit_rate=int(stream.get("bit_rate", 0)),
        duration=float(info["format"]["duration"]),
    )


def audio_start(data: bytes) -> int:
    """Where the first MPEG frame starts: after the ID3v2 tag, if there is one."""
    if data[:3] != b"ID3":
        return 0
    size = 0
    for byte in data[6:10]:
        size = (size << 7) | (byte & 0x7F)
    return 10 + size


def ffprobe_warnings(data: bytes) -> str:
    """What ffprobe says about ``data`` at its default log level (an estimate warns)."""
    with tempfile.NamedTemporaryFile(suffix=".mp3") as f:
        f.write(data)
        f.flush()
        done = subprocess.run(["ffprobe", "-hide_banner", f.name], capture_output=True, text=True)
    return done.stderr


@dataclass(frozen=True)
class Id3Tag:
    """An MP3's ID3v2 tag as mutagen reads it: version and frames (key -> text values)."""

    version: tuple[int, int, int]
    frames: dict[str, list[str]]
    encodings: list[int]

    def text(self, key: str) -> str:
        return "/".join(self.frames[key])


def read_id3(data: bytes) -> Id3Tag:
    """mutagen's reading of the tag at the start of ``data`` (a whole MP3 or a bare tag)."""
    import io

    from mutagen.id3 import ID3

    tag: Any = ID3(io.BytesIO(data))
    frames = {key: [str(t) for t in getattr(frame, "text", [])] for key, frame in tag.items()}
    encodings = [int(getattr(frame, "encoding", -1)) for frame in tag.values()]
    return Id3Tag(tuple(tag.version), frames, encodings)


def mutagen_length(data: bytes) -> float:
    """The length mutagen reads from the MP3's headers."""
    import io

    from mutagen.mp3 import MP3

    info: Any = MP3(io.BytesIO(data)).info
    return float(info.length)
