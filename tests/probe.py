"""ffprobe of MP3 bytes, for checking what the service produced."""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass


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
