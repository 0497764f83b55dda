"""Serving a stored MP3: by the router, streamed from the bucket, or by presigned redirect.

``DOWNLOAD_MODE`` chooses: ``accel`` (native and compose stacks: nginx fetches, caches and
serves the object, so no MP3 byte passes Python), ``stream`` (the function streams it, for a
platform without the router: Cloud Run) or ``redirect`` (a 307 to a presigned URL: Lambda).
docs/api.md, ``GET /record``, has each mode's detail.
"""

from __future__ import annotations

import logging

from werkzeug.wrappers import Request, Response

from common.adapters.storage import MP3_CONTENT_TYPE, ObjectMissing, Storage
from common.domain.records import StoredRecord
from common.errors import NotFound, RangeNotSatisfiable
from common.http.responses import content_disposition
from common.settings import DownloadMode, Settings

log = logging.getLogger(__name__)

# The router's internal location that proxies (and caches) the store: infra/nginx.
ROUTER_STORE_PREFIX = "/_store"
# nginx reads a Range's numbers into a signed 64-bit offset and refuses larger ones with 416,
# though RFC 9110 makes `bytes=0-<any number>` valid: the function streams such a range itself.
_ROUTER_MAX_OFFSET = 2**63 - 1


def download_response(
    request: Request, storage: Storage, settings: Settings, record: StoredRecord
) -> Response:
    disposition = content_disposition(record.filename)
    if settings.download_mode is DownloadMode.REDIRECT:
        url = storage.presigned_get(
            record.object_key,
            expires=settings.presign_expires_seconds,
            filename_header=disposition,
            method=request.method,
        )
        return Response(status=307, headers={"Location": url, "Cache-Control": "no-store"})
    headers = {
        "ETag": f'"{record.etag}"',
        "Accept-Ranges": "bytes",
        "Content-Disposition": disposition,
        "Cache-Control": "private, no-cache",
    }
    if request.if_none_match and request.if_none_match.contains_weak(record.etag):
        return Response(status=304, headers=headers)
    size = record.size_bytes
    byte_range = _requested_range(request, record)
    status = 200
    span: tuple[int, int] | None = None
    length = size
    if byte_range is not None:
        first, stop = byte_range
        span = (first, stop - 1)
        length = stop - first
        status = 206
        headers["Content-Range"] = f"bytes {first}-{stop - 1}/{size}"
    headers["Content-Length"] = str(length)
    if request.method == "HEAD":
        return Response(status=status, headers=headers, content_type=MP3_CONTENT_TYPE)
    if settings.download_mode is DownloadMode.ACCEL and _router_reads_range(request):
        # The router sends the object: the range this function accepted, or all of it.
        target = storage.router_get_path(
            record.object_key,
            expires=settings.presign_expires_seconds,
            filename_header=disposition,
        )
        how = "/range" if span is not None else "/whole"
        accel = {"X-Accel-Redirect": ROUTER_STORE_PREFIX + how + target, "Content-Length": "0"}
        return Response(status=200, headers=accel, content_type=MP3_CONTENT_TYPE)
    try:
        stream = storage.open_read(record.object_key, span)
    except ObjectMissing as exc:
        log.error("record without its object", extra={"record_id": str(record.id)})
        raise NotFound("The record's audio is missing from storage.") from exc
    response = Response(iter(stream), status=status, headers=headers, content_type=MP3_CONTENT_TYPE)
    response.call_on_close(stream.close)
    return response


def _requested_range(request: Request, record: StoredRecord) -> tuple[int, int] | None:
    """The single byte range asked for as [first, stop), or None for the whole file."""
    requested = request.range
    if requested is None or requested.units != "bytes":
        return None
    if_range = request.if_range
    if (if_range.etag is not None or if_range.date is not None) and if_range.etag != record.etag:
        return None  # the client's copy may be stale: send it the whole current file
    if len(requested.ranges) != 1:
        return None  # multiple ranges: answering 200 with the whole file is allowed
    start, stop = requested.ranges[0]
    if start < 0 and stop is None and -start >= record.size_bytes > 0:
        return 0, record.size_bytes  # a suffix longer than the file is all of it (RFC 9110)
    span = requested.range_for_length(record.size_bytes)
    if span is None:
        raise RangeNotSatisfiable(record.size_bytes)
    return span


def _router_reads_range(request: Request) -> bool:
    requested = request.range
    if requested is None:
        return True
    return all(
        abs(start) <= _ROUTER_MAX_OFFSET and (stop is None or stop - 1 <= _ROUTER_MAX_OFFSET)
        for start, stop in requested.ranges
    )
