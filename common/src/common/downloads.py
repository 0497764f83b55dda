"""Serving a stored MP3: streamed from the bucket (Range, HEAD, ETag) or by presigned redirect."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import flask

from common.errors import NotFound, RangeNotSatisfiable
from common.http import content_disposition
from common.models import Record
from common.settings import DownloadMode, Settings
from common.storage import MP3_CONTENT_TYPE, ObjectMissing, Storage

log = logging.getLogger(__name__)


class ObjectCache:
    """The most recently served objects, whole, in memory: least recently used goes first.

    Objects never change under a key (each record has its own key and ETag), so a hit needs
    no check with the store; the record's row is still read, so access rules are unchanged.
    Objects over a quarter of the capacity are not kept: a long recording streams instead.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.max_object = capacity // 4
        self._items: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: str, etag: str) -> bytes | None:
        with self._lock:
            data = self._items.get((key, etag))
            if data is not None:
                self._items.move_to_end((key, etag))
            return data

    def put(self, key: str, etag: str, data: bytes) -> None:
        if len(data) > self.max_object:
            return
        with self._lock:
            if (key, etag) in self._items:
                return
            self._items[(key, etag)] = data
            self._size += len(data)
            while self._size > self.capacity:
                _, dropped = self._items.popitem(last=False)
                self._size -= len(dropped)


_cache_lock = threading.Lock()
_caches: dict[int, ObjectCache] = {}


def object_cache(settings: Settings) -> ObjectCache | None:
    """This process's cache (DOWNLOAD_CACHE_BYTES), or None when it is turned off."""
    capacity = settings.download_cache_bytes
    if capacity <= 0:
        return None
    with _cache_lock:
        cache = _caches.get(capacity)
        if cache is None:
            cache = _caches[capacity] = ObjectCache(capacity)
        return cache


def download_response(
    request: flask.Request, storage: Storage, settings: Settings, record: Record
) -> flask.Response:
    disposition = content_disposition(record.filename)
    if settings.download_mode is DownloadMode.REDIRECT:
        url = storage.presigned_get(
            record.object_key,
            expires=settings.presign_expires_seconds,
            filename_header=disposition,
        )
        return flask.Response(status=307, headers={"Location": url, "Cache-Control": "no-store"})
    headers = {
        "ETag": f'"{record.etag}"',
        "Accept-Ranges": "bytes",
        "Content-Disposition": disposition,
        "Cache-Control": "private, max-age=3600",
    }
    if request.if_none_match and request.if_none_match.contains_weak(record.etag):
        return flask.Response(status=304, headers=headers)
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
        return flask.Response(status=status, headers=headers, content_type=MP3_CONTENT_TYPE)
    cache = object_cache(settings)
    if cache is not None and size <= cache.max_object:
        data = _cached_object(cache, storage, record)
        if data is not None:
            body = data if span is None else data[span[0] : span[1] + 1]
            # An iterator: served as it is (functions-framework would otherwise copy it).
            return flask.Response(
                iter((body,)), status=status, headers=headers, content_type=MP3_CONTENT_TYPE
            )
    try:
        stream = storage.open_read(record.object_key, span)
    except ObjectMissing as exc:
        log.error("record without its object", extra={"record_id": str(record.id)})
        raise NotFound("The record's audio is missing from storage.") from exc
    response = flask.Response(
        iter(stream), status=status, headers=headers, content_type=MP3_CONTENT_TYPE
    )
    response.call_on_close(stream.close)
    return response


def _cached_object(cache: ObjectCache, storage: Storage, record: Record) -> bytes | None:
    """The whole object from the cache, else read from the store and kept (None if changed)."""
    data = cache.get(record.object_key, record.etag)
    if data is not None:
        return data
    try:
        stream = storage.open_read(record.object_key)
    except ObjectMissing as exc:
        log.error("record without its object", extra={"record_id": str(record.id)})
        raise NotFound("The record's audio is missing from storage.") from exc
    data = b"".join(stream)
    if len(data) != record.size_bytes:
        log.error("stored object size differs from its record", extra={"record_id": str(record.id)})
        return None
    cache.put(record.object_key, record.etag, data)
    return data


def _requested_range(request: flask.Request, record: Record) -> tuple[int, int] | None:
    """The single byte range asked for as [first, stop), or None for the whole file."""
    requested = request.range
    if requested is None or requested.units != "bytes":
        return None
    if_range = request.if_range
    if (if_range.etag is not None or if_range.date is not None) and if_range.etag != record.etag:
        return None  # the client's copy may be stale: send it the whole current file
    if len(requested.ranges) != 1:
        return None  # multiple ranges: answering 200 with the whole file is allowed
    span = requested.range_for_length(record.size_bytes)
    if span is None:
        raise RangeNotSatisfiable(record.size_bytes)
    return span
