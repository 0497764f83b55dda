"""The 201 answer for a stored record, shared by POST /records and the direct-upload completion."""

from __future__ import annotations

import flask

from common.domain.records import NewRecord
from common.http.responses import json_response, public_base_url
from common.settings import Settings


def record_created_response(
    request: flask.Request, settings: Settings, record: NewRecord
) -> flask.Response:
    url = f"{public_base_url(request, settings)}/record?id={record.id}&user={record.user_id}"
    return json_response(
        {
            "id": str(record.id),
            "url": url,
            "duration_seconds": record.duration_seconds,
            "size_bytes": record.size_bytes,
            "bitrate_kbps": record.bitrate_kbps,
            "sample_rate": record.sample_rate,
            "channels": record.channels,
            "filename": record.filename,
        },
        status=201,
        headers={"Location": url},
    )
