"""An MP3 against the WAV it came from, both decoded whole by pydub.

Holding a few seconds of decoded audio is right for a test and wrong for the service, which
streams through ffmpeg (docs/encoding.md). pydub runs the ``ffmpeg`` and ``ffprobe`` on PATH
(``make tools``), as the probes do: the native stack's minimal build in .tools/ffmpeg encodes
MP3 but has no MP3 decoder.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass

from pydub import AudioSegment  # type: ignore[import-untyped]

FFMPEG = shutil.which("ffmpeg")


class _Segment(AudioSegment):  # type: ignore[misc]  # pydub is untyped
    """pydub's segment with its converter fixed to the ffmpeg found above, not pydub's guess."""

    converter = FFMPEG or "ffmpeg"


@dataclass(frozen=True)
class Decoded:
    """What a decoder got out of a file: frames per channel, format, and each channel's level."""

    frames: int
    sample_rate: int
    channels: int
    dbfs: tuple[float, ...]  # per channel; -inf for digital silence

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate

    @property
    def overall_dbfs(self) -> float:
        """The level of all channels together (the mean power of the channels)."""
        powers = [10 ** (level / 10) for level in self.dbfs]
        mean = sum(powers) / len(powers)
        return 10 * math.log10(mean) if mean > 0 else -math.inf


def decode(data: bytes, fmt: str) -> Decoded:
    """``data`` decoded by pydub as ``fmt`` ("mp3" forces ffmpeg's MP3 demuxer, "wav")."""
    assert FFMPEG and shutil.which("ffprobe"), "ffmpeg and ffprobe are needed on PATH"
    # From a seekable file, not a pipe: ffmpeg then reads the MP3's Xing/LAME header and
    # trims the encoder's delay and padding, as a player does.
    with tempfile.NamedTemporaryFile(suffix=f".{fmt}") as f:
        f.write(data)
        f.flush()
        segment = _Segment.from_file(f.name, format=fmt)
    levels = tuple(float(channel.dBFS) for channel in segment.split_to_mono())
    return Decoded(
        int(segment.frame_count()), int(segment.frame_rate), int(segment.channels), levels
    )


def assert_matches_source(
    mp3: bytes,
    wav: bytes,
    *,
    channels: int | None = None,
    sample_rate: int | None = None,
    frames_tolerance: int = 0,
    loudness_db: float = 1.0,
) -> Decoded:
    """Check that ``mp3`` decodes to ``wav``'s audio: the length, the channels and sample rate
    (the WAV's own unless given), and each channel's RMS level within ``loudness_db`` dB.

    The length is exact by default: with the Xing/LAME header, a decoder drops the encoder's
    delay and padding, and a resampled MP3 holds the source's frames scaled to its rate.
    Channel levels are compared one by one when the counts match, else (a downmix) overall.
    """
    source = decode(wav, "wav")
    out = decode(mp3, "mp3")
    want_channels = channels if channels is not None else source.channels
    want_rate = sample_rate if sample_rate is not None else source.sample_rate
    assert (out.channels, out.sample_rate) == (want_channels, want_rate), (out, source)
    want_frames = source.frames * want_rate // source.sample_rate
    assert abs(out.frames - want_frames) <= frames_tolerance, (out.frames, want_frames)
    if out.channels == source.channels:
        pairs = list(zip(out.dbfs, source.dbfs, strict=True))
    else:
        pairs = [(out.overall_dbfs, source.overall_dbfs)]
    for got, want in pairs:
        if math.isinf(want) or math.isinf(got):
            assert got == want, (out.dbfs, source.dbfs)  # silence stays digital silence
        else:
            assert abs(got - want) <= loudness_db, (out.dbfs, source.dbfs)
    return out
