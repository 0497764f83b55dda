"""Per-upload encoding choices: bitrate or VBR quality, channels, sample rate, and ID3 tags.

They come from form fields placed before the file (``POST /records``) or from the JSON body
that starts a direct upload, are kept with a pending upload as JSON, and reach the conversion.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TAG_FIELDS = ("title", "artist", "album", "date", "comment")


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
        """The options in request fields (strings from a form, or JSON values)."""
        # Validation of each field (422 naming it) belongs here: issue 13.
        return cls()

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
        data = data or {}
        return cls(
            bitrate_kbps=data.get("bitrate_kbps"),
            vbr_quality=data.get("vbr_quality"),
            channels=data.get("channels"),
            sample_rate=data.get("sample_rate"),
            tags=dict(data.get("tags") or {}),
        )
