"""A record as JSON: the 201 of POST /records and of a direct-upload completion that waited,
the 200 of a completion repeated after its job is done, the record inside a job status, and the
items of GET /records (the same fields, plus ``created_at``)."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from werkzeug.wrappers import Request, Response

from common.domain.records import NewRecord, RecordPage
from common.http.responses import json_response, public_base_url
from common.settings import Settings


def record_body(base_url: str, record: NewRecord) -> dict[str, Any]:
    """A record's description, as the 201 body and the records list give it.

    The encoding values are the effective ones (what the MP3 is, not only what was asked):
    ``bitrate_kbps`` is the CBR bitrate, or the average with ``vbr_quality`` (LAME -V) set.
    """
    return {
        "id": str(record.id),
        "url": f"{base_url}/record?id={record.id}&user={record.user_id}",
        "duration_seconds": record.duration_seconds,
        "size_bytes": record.size_bytes,
        "bitrate_kbps": record.bitrate_kbps,
        "sample_rate": record.sample_rate,
        "channels": record.channels,
        "vbr_quality": record.vbr_quality,
        "tags": dict(record.tags),
        "filename": record.filename,
    }


def record_created_response(
    request: Request, settings: Settings, record: NewRecord, *, status: int = 201
) -> Response:
    body = record_body(public_base_url(request, settings), record)
    return json_response(body, status=status, headers={"Location": body["url"]})


def record_list_response(request: Request, settings: Settings, page: RecordPage) -> Response:
    base_url = public_base_url(request, settings)
    records = [
        {
            **record_body(base_url, item.record),
            "created_at": item.created_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        }
        for item in page.records
    ]
    return json_response(
        {"records": records, "next_cursor": page.next_cursor},
        headers={"Cache-Control": "no-store"},
    )
