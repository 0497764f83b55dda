"""The 201 answer for a stored record, shared by POST /records and the direct-upload completion."""

from __future__ import annotations

from typing import Any

import flask

from common.adapters.models import Record
from common.domain.records import NewRecord
from common.http.responses import json_response, public_base_url
from common.settings import Settings


def record_fields(record: NewRecord | Record) -> dict[str, Any]:
    """A record's description, as the 201 body and the records list give it.

    The encoding values are the effective ones (what the MP3 is, not only what was asked):
    ``bitrate_kbps`` is the CBR bitrate, or the average with ``vbr_quality`` (LAME -V) set.
    """
    return {
        "id": str(record.id),
        "duration_seconds": record.duration_seconds,
        "size_bytes": record.size_bytes,
        "bitrate_kbps": record.bitrate_kbps,
        "vbr_quality": record.vbr_quality,
        "sample_rate": record.sample_rate,
        "channels": record.channels,
        "tags": dict(record.tags or {}),
        "filename": record.filename,
    }


def record_created_response(
    request: flask.Request, settings: Settings, record: NewRecord
) -> flask.Response:
    url = f"{public_base_url(request, settings)}/record?id={record.id}&user={record.user_id}"
    body = record_fields(record)
    body["url"] = url
    return json_response(body, status=201, headers={"Location": url})
