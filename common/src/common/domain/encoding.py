"""Per-upload encoding choices: bitrate or VBR quality, channels, sample rate, and ID3 tags.

They come from an upload's fields (or the JSON that starts a direct upload) and are all checked
here, before a byte of audio is read, with a 422 that names the field; the one check that needs
the WAV header (a bitrate against the output rate's MPEG version) is
:meth:`EncodingOptions.resolve`, still before ffmpeg starts. Only integers from fixed sets reach
ffmpeg's command line; tag text never does (:mod:`common.domain.id3`). docs/encoding.md,
"Options" and "Tags".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from common.domain.text import first_control, without_controls
from common.errors import InvalidField
from common.settings import MP3_BITRATES_MPEG1, MP3_BITRATES_MPEG2

MP3_SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
# LAME encodes MPEG-2.5 (8-12 kHz) at 64 kbit/s at most, although the format's table goes on.
MPEG25_MAX_KBPS = 64
VBR_QUALITIES = range(10)  # LAME -V 0 (best) .. 9 (smallest)
CHANNEL_CHOICES = (1, 2)

TAG_FIELDS = ("title", "artist", "album", "date", "comment")
# Maximum length of each tag, in characters (Unicode code points) after UTF-8 decoding.
TAG_MAX_CHARS: Mapping[str, int] = {
    "title": 250,
    "artist": 250,
    "album": 250,
    "date": 19,  # an ID3v2.4 timestamp: yyyy[-MM[-dd[THH[:mm[:ss]]]]]
    "comment": 1000,
}
OPTION_FIELDS = ("bitrate_kbps", "vbr_quality", "channels", "sample_rate")
# ID3v2.4 section 4: the timestamp format TDRC takes.
_TIMESTAMP = re.compile(r"^\d{4}(-\d{2}(-\d{2}(T\d{2}(:\d{2}(:\d{2})?)?)?)?)?$")
_ANY_BITRATE = tuple(sorted({*MP3_BITRATES_MPEG1, *MP3_BITRATES_MPEG2}))
# strptime formats of an ID3v2.4 timestamp's prefixes, by length.
_TIMESTAMP_FORMATS = {4: "%Y", 7: "%Y-%m", 10: "%Y-%m-%d", 13: "%Y-%m-%dT%H",
                      16: "%Y-%m-%dT%H:%M", 19: "%Y-%m-%dT%H:%M:%S"}  # fmt: skip


def valid_timestamp(text: str) -> bool:
    """An ID3v2.4 timestamp (yyyy[-MM[-dd[THH[:mm[:ss]]]]]) that names a real calendar time."""
    if not _TIMESTAMP.match(text):
        return False
    try:
        datetime.strptime(text, _TIMESTAMP_FORMATS[len(text)])
    except ValueError:
        return False
    return True


class InvalidOption(InvalidField):
    """An encoding option or tag with a value the service cannot use; names the field."""

    slug = "invalid-encoding-option"
    title = "Invalid Encoding Option"

    def __init__(self, field_name: str, detail: str) -> None:
        super().__init__(detail)
        self.field = field_name

    def to_problem(self, instance: str | None = None) -> dict[str, Any]:
        return {**super().to_problem(instance), "field": self.field}


def mpeg_version(rate: int) -> str:
    """'1', '2' or '2.5': the MPEG audio version that carries ``rate``."""
    if rate >= 32000:
        return "1"
    return "2" if rate >= 16000 else "2.5"


def bitrates_for(rate: int) -> tuple[int, ...]:
    """The CBR bitrates (kbit/s) LAME can write at the output rate ``rate``."""
    version = mpeg_version(rate)
    if version == "1":
        return MP3_BITRATES_MPEG1
    if version == "2":
        return MP3_BITRATES_MPEG2
    return tuple(b for b in MP3_BITRATES_MPEG2 if b <= MPEG25_MAX_KBPS)


def mp3_sample_rate(rate: int) -> int:
    """The output rate for a source: its own where MP3 has it, else the nearest family rate."""
    if rate in MP3_SAMPLE_RATES:
        return rate
    if rate > 48000:
        return 44100 if rate % 11025 == 0 else 48000
    return next(r for r in MP3_SAMPLE_RATES if r >= rate)


@dataclass(frozen=True, slots=True)
class Encoding:
    """What ffmpeg is asked for, resolved against the source: every value is from a fixed set."""

    sample_rate: int
    channels: int
    bitrate_kbps: int | None  # CBR; None with vbr_quality
    vbr_quality: int | None


@dataclass(frozen=True, slots=True)
class EncodingOptions:
    """What the client asked for; None means the deployment's default."""

    bitrate_kbps: int | None = None
    vbr_quality: int | None = None
    channels: int | None = None
    sample_rate: int | None = None
    tags: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> EncodingOptions:
        """The options in request fields (strings from a form, or JSON values).

        Fields of other names (``user``, ``token``, ``filename`` ...) are left alone; an empty
        value is the same as an absent one. Raises :class:`InvalidOption` (422) naming the field.
        """
        bitrate = _integer(fields, "bitrate_kbps")
        vbr = _integer(fields, "vbr_quality")
        channels = _integer(fields, "channels")
        rate = _integer(fields, "sample_rate")
        if bitrate is not None and vbr is not None:
            raise InvalidOption(
                "vbr_quality",
                "Give either 'bitrate_kbps' (constant bitrate) or 'vbr_quality' (variable), "
                "not both.",
            )
        if vbr is not None and vbr not in VBR_QUALITIES:
            raise InvalidOption("vbr_quality", "'vbr_quality' must be 0 (best) to 9 (smallest).")
        if channels is not None and channels not in CHANNEL_CHOICES:
            raise InvalidOption("channels", "'channels' must be 1 (mono) or 2 (stereo).")
        if rate is not None and rate not in MP3_SAMPLE_RATES:
            raise InvalidOption(
                "sample_rate",
                f"'sample_rate' must be one of {_listed(MP3_SAMPLE_RATES)} (Hz).",
            )
        if bitrate is not None:
            allowed = bitrates_for(rate) if rate is not None else _ANY_BITRATE
            if bitrate not in allowed:
                raise InvalidOption("bitrate_kbps", _bitrate_detail(rate, allowed))
        tags = {name: value for name in TAG_FIELDS if (value := _tag(fields, name))}
        return cls(bitrate, vbr, channels, rate, tags)

    def resolve(self, source_rate: int, source_channels: int, default_kbps: int) -> Encoding:
        """The encoding for a source of ``source_rate`` Hz and ``source_channels`` channels.

        Without options: the source's rate where MP3 has it, at most two channels, the
        deployment's bitrate (LAME lowers it to the version's maximum at low rates, as before).
        A bitrate the client chose must exist at the output rate: else 422 naming it.
        """
        rate = self.sample_rate or mp3_sample_rate(source_rate)
        channels = self.channels or min(source_channels, 2)
        if self.vbr_quality is not None:
            return Encoding(rate, channels, None, self.vbr_quality)
        if self.bitrate_kbps is None:
            allowed = bitrates_for(rate)
            kbps = default_kbps if default_kbps in allowed else max(allowed)
            return Encoding(rate, channels, kbps, None)
        allowed = bitrates_for(rate)
        if self.bitrate_kbps not in allowed:
            raise InvalidOption("bitrate_kbps", _bitrate_detail(rate, allowed))
        return Encoding(rate, channels, self.bitrate_kbps, None)

    def to_json(self) -> dict[str, Any]:
        return {
            "bitrate_kbps": self.bitrate_kbps,
            "vbr_quality": self.vbr_quality,
            "channels": self.channels,
            "sample_rate": self.sample_rate,
            "tags": dict(self.tags),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> EncodingOptions:
        """Options stored by :meth:`to_json`, checked again (a row is not trusted blindly)."""
        data = data or {}
        tags = data.get("tags") or {}
        fields: dict[str, object] = {k: data.get(k) for k in OPTION_FIELDS}
        if isinstance(tags, Mapping):
            fields.update({k: tags.get(k) for k in TAG_FIELDS})
        return cls.from_fields(fields)


def clean_file_tag(name: str, raw: str) -> str | None:
    """A tag found in the WAV itself, made acceptable: controls dropped, cut to its maximum.

    The file's own metadata is not refused (the client may not even know it is there): what
    cannot be used is left out, and a date that is not an ID3v2.4 timestamp keeps only its
    leading ``yyyy[-MM[-dd]]`` if it has one.
    """
    text = "".join(" " if ch in "\t\r\n" else ch for ch in raw)
    text = without_controls(text).strip()
    if name == "date" and not valid_timestamp(text):
        prefixes = (text[:n] for n in (10, 7, 4) if len(text) >= n)
        text = next((prefix for prefix in prefixes if valid_timestamp(prefix)), "")
    return text[: TAG_MAX_CHARS[name]] or None


def _integer(fields: Mapping[str, object], name: str) -> int | None:
    raw = fields.get(name)
    if raw is None or raw == "":
        return None
    if isinstance(raw, bool):
        raise InvalidOption(name, f"'{name}' must be an integer.")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str) and re.fullmatch(r"[0-9]{1,6}", raw.strip()):
        return int(raw.strip())
    raise InvalidOption(name, f"'{name}' must be an integer.")


def _tag(fields: Mapping[str, object], name: str) -> str | None:
    raw = fields.get(name)
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise InvalidOption(name, f"'{name}' must be a string.")
    bad = first_control(raw)
    if bad is not None:
        raise InvalidOption(
            name, f"'{name}' contains a control character (U+{ord(bad):04X}); send plain text."
        )
    limit = TAG_MAX_CHARS[name]
    if len(raw) > limit:
        raise InvalidOption(name, f"'{name}' is longer than {limit} characters.")
    if name == "date" and not valid_timestamp(raw):
        raise InvalidOption(
            name,
            "'date' must be a real date as an ID3v2.4 timestamp: yyyy, yyyy-MM, yyyy-MM-dd "
            "or longer (such as 2024-05-31).",
        )
    return raw


def _bitrate_detail(rate: int | None, allowed: tuple[int, ...]) -> str:
    where = f"at {rate} Hz (MPEG-{mpeg_version(rate)})" if rate is not None else "in MP3"
    return f"'bitrate_kbps' must be one of {_listed(allowed)} {where}."


def _listed(values: tuple[int, ...]) -> str:
    return ", ".join(map(str, values))
