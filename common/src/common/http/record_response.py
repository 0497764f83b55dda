"""The record answers: 201 for a stored record (POST /records, a direct upload's completion that
waited), 200 for a completion repeated after its job is done, and the record inside a job status.
"""

from __future__ import annotations

from typing import Any

import flask

from common.domain.records import NewRecord
from common.http.responses import json_response, public_base_url
from common.settings import Settings


def record_body(request: flask.Request, settings: Settings, record: NewRecord) -> dict[str, Any]:
    url = f"{public_base_url(request, settings)}/record?id={record.id}&user={record.user_id}"
    return {
        "id": str(record.id),
        "url": url,
        "duration_seconds": record.duration_seconds,
        "size_bytes": record.size_bytes,
        "bitrate_kbps": record.bitrate_kbps,
        "sample_rate": record.sample_rate,
        "channels": record.channels,
        "filename": record.filename,
    }


def record_created_response(
    request: flask.Request, settings: Settings, record: NewRecord, *, status: int = 201
) -> flask.Response:
    body = record_body(request, settings, record)
    return json_response(body, status=status, headers={"Location": body["url"]})
