"""The S3-compatible object store: streaming multipart writes, ranged reads, presigned URLs.

Works against AWS S3, SeaweedFS, Cloud Storage's XML API and moto. For non-AWS endpoints the
client uses path-style addressing and sends checksums only when an operation requires them
(boto3 1.36+ adds them by default and some stores reject them). Every failure to reach the
store becomes :class:`DependencyUnavailable` (503 with Retry-After).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote, urlsplit

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from common.errors import DependencyUnavailable
from common.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef, LifecycleRuleTypeDef

log = logging.getLogger(__name__)

MP3_CONTENT_TYPE = "audio/mpeg"
DOWNLOAD_CHUNK = 256 * 1024
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
# Keys per DeleteObjects call (and per listing page): the S3 API's maximum.
DELETE_BATCH = 1000
# Signed router URLs kept per process (a few hundred bytes each).
ROUTER_URLS_KEPT = 4096


class ObjectMissing(Exception):
    """The object named by a record is not in the bucket."""


def make_s3_client(settings: Settings, *, public: bool = False) -> S3Client:
    """A client for the store; ``public`` signs URLs for the endpoint clients can reach."""
    endpoint = settings.s3_endpoint_url
    if public and settings.s3_public_endpoint_url:
        endpoint = settings.s3_public_endpoint_url
    config = Config(
        region_name=settings.s3_region,
        signature_version="s3v4",
        connect_timeout=min(settings.s3_timeout_seconds, 5.0),
        read_timeout=settings.s3_timeout_seconds,
        retries={"max_attempts": 2, "mode": "standard"},
        max_pool_connections=32,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"} if endpoint else {},
        tcp_keepalive=True,
    )
    client: S3Client = _boto_session().create_client(  # type: ignore[assignment]
        "s3",
        endpoint_url=endpoint,
        config=config,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=settings.aws_secret_access_key,
        aws_session_token=settings.aws_session_token,
    )
    return client


_session_lock = threading.Lock()
_session: botocore.session.Session | None = None


def _boto_session() -> botocore.session.Session:
    """One botocore session per process: its clients share one loaded S3 model instead of one
    each. botocore's own, not boto3's: boto3 adds s3transfer and multiprocessing to a cold
    start for nothing this adapter uses."""
    global _session
    with _session_lock:
        if _session is None:
            _session = botocore.session.get_session()
        return _session


def _same_endpoint(settings: Settings) -> bool:
    public = settings.s3_public_endpoint_url
    return not public or public == settings.s3_endpoint_url


@dataclass(frozen=True, slots=True)
class StoredObject:
    etag: str
    size: int


@dataclass(frozen=True, slots=True)
class PresignedPost:
    """A browser-style form upload to the store: POST ``fields`` and the file to ``url``."""

    url: str
    fields: dict[str, str]


@dataclass(frozen=True, slots=True)
class ListedObject:
    key: str
    last_modified: datetime


@dataclass(frozen=True, slots=True)
class MultipartUpload:
    """A multipart upload that was started and not yet completed or aborted."""

    key: str
    upload_id: str
    initiated: datetime


@dataclass(slots=True)
class ObjectStream:
    """An open read of (part of) an object; iterate it to stream the bytes."""

    body: Any
    length: int
    retry_after: int = 5

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self.body.iter_chunks(DOWNLOAD_CHUNK)
        except (BotoCoreError, OSError) as exc:
            # A download has sent its status line already and can only be cut short; a job
            # reading its WAV is retried by its queue.
            log.warning("object store read failed mid-stream: %s", exc)
            raise DependencyUnavailable("object store", self.retry_after) from exc
        finally:
            self.body.close()

    def close(self) -> None:
        self.body.close()


class _MadeOnce:
    """A client given as is, or made by its factory on first use (once, by any thread)."""

    def __init__(self, given: S3Client | Callable[[], S3Client]) -> None:
        self._client: S3Client | None = None
        self._factory: Callable[[], S3Client] | None = None
        if hasattr(given, "generate_presigned_url"):
            self._client = cast("S3Client", given)
        else:
            self._factory = given
        self._lock = threading.Lock()

    def get(self) -> S3Client:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    assert self._factory is not None
                    self._client = self._factory()
                client = self._client
        return client


class Storage:
    def __init__(
        self,
        client: S3Client | Callable[[], S3Client],
        bucket: str,
        *,
        part_size: int,
        retry_after: int = 5,
        presign_client: S3Client | Callable[[], S3Client] | None = None,
    ) -> None:
        """``client`` (and ``presign_client``, which defaults to it) may be a factory: the
        client is then made on first use, so a route that never needs it never pays for it."""
        self._client = _MadeOnce(client)
        self._presign = self._client if presign_client is None else _MadeOnce(presign_client)
        self.bucket = bucket
        self.part_size = part_size
        self.retry_after = retry_after
        self._router_urls = _UrlCache(ROUTER_URLS_KEPT)

    @property
    def client(self) -> S3Client:
        """The client for the store's own endpoint."""
        return self._client.get()

    @property
    def presign_client(self) -> S3Client:
        """The client that signs URLs for outside callers."""
        return self._presign.get()

    def prepare(self) -> None:
        """Make the clients now (a server, before its first request), not on first use."""
        self._client.get()
        self._presign.get()

    @classmethod
    def from_settings(cls, settings: Settings) -> Storage:
        # Each client is made when first needed (building one costs a cold start about 0.1 s):
        # a redirecting get_record signs URLs and never calls the store itself. A second
        # client only when URLs must name another endpoint.
        return cls(
            lambda: make_s3_client(settings),
            settings.s3_bucket,
            part_size=settings.s3_part_size_bytes,
            retry_after=settings.retry_after_seconds,
            presign_client=(
                None if _same_endpoint(settings) else lambda: make_s3_client(settings, public=True)
            ),
        )

    @contextmanager
    def translate_errors(self) -> Iterator[None]:
        try:
            yield
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING_CODES:
                raise ObjectMissing(code) from exc
            log.error("object store error: %s", exc)
            raise DependencyUnavailable("object store", self.retry_after) from exc
        except (BotoCoreError, OSError) as exc:
            log.error("object store unreachable: %s", exc)
            raise DependencyUnavailable("object store", self.retry_after) from exc

    def open_writer(self, key: str, content_type: str = MP3_CONTENT_TYPE) -> ObjectWriter:
        return ObjectWriter(self, key, content_type)

    def open_read(self, key: str, byte_range: tuple[int, int] | None = None) -> ObjectStream:
        """Open ``key`` for streaming; ``byte_range`` is inclusive, as in HTTP."""
        with self.translate_errors():
            if byte_range is None:
                response = self.client.get_object(Bucket=self.bucket, Key=key)
            else:
                first, last = byte_range
                response = self.client.get_object(
                    Bucket=self.bucket, Key=key, Range=f"bytes={first}-{last}"
                )
        return ObjectStream(response["Body"], int(response["ContentLength"]), self.retry_after)

    def size(self, key: str) -> int:
        """The size of ``key`` in bytes (a HEAD); :class:`ObjectMissing` if there is none."""
        with self.translate_errors():
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        return int(head["ContentLength"])

    def presigned_post(
        self,
        key: str,
        *,
        content_type: str,
        metadata: dict[str, str],
        max_bytes: int,
        expires: int,
    ) -> PresignedPost:
        """A form upload of ``key`` on the public endpoint: the policy pins the key, its type
        and metadata (values percent-encoded: S3 keeps ASCII), and the store refuses a file of
        more than ``max_bytes``."""
        fields = {"Content-Type": content_type}
        fields.update({f"x-amz-meta-{k}": quote(v, safe="") for k, v in metadata.items()})
        conditions: list[Any] = [
            ["content-length-range", 1, max_bytes],
            *({name: value} for name, value in fields.items()),
        ]
        try:
            post = self.presign_client.generate_presigned_post(
                self.bucket, key, Fields=fields, Conditions=conditions, ExpiresIn=expires
            )
        except (BotoCoreError, ClientError) as exc:  # no credentials to sign with
            log.error("could not presign an upload: %s", exc)
            raise DependencyUnavailable("object store", self.retry_after) from exc
        return PresignedPost(post["url"], {k: str(v) for k, v in post["fields"].items()})

    def presigned_get(
        self, key: str, *, expires: int, filename_header: str, method: str = "GET"
    ) -> str:
        """A presigned GET (or HEAD) of ``key`` on the public endpoint (for clients).

        SigV4 signs the HTTP method: a URL presigned for GET answers a HEAD with 403, so a
        HEAD request is redirected to a URL presigned for HEAD (``head_object``).
        """
        operation = "head_object" if method == "HEAD" else "get_object"
        return self._sign_get(self.presign_client, key, expires, filename_header, operation)

    def _sign_get(
        self,
        client: S3Client,
        key: str,
        expires: int,
        filename_header: str,
        operation: str = "get_object",
    ) -> str:
        return client.generate_presigned_url(
            operation,
            Params={
                "Bucket": self.bucket,
                "Key": key,
                "ResponseContentType": MP3_CONTENT_TYPE,
                "ResponseContentDisposition": filename_header,
            },
            ExpiresIn=expires,
        )

    def router_get_path(self, key: str, *, expires: int, filename_header: str) -> str:
        """The path and query of a presigned GET on the store's own (internal) endpoint.

        For the router, which fetches the object itself (DOWNLOAD_MODE=accel). Signing costs
        more than the rest of a download request, so a URL is reused for the first half of its
        validity: the router uses it at once, and the object under a key never changes.
        """
        cache_key = (key, filename_header)
        now = time.monotonic()
        cached = self._router_urls.get(cache_key, now)
        if cached is not None:
            return cached
        parts = urlsplit(self._sign_get(self.client, key, expires, filename_header))
        path = f"{parts.path}?{parts.query}"
        self._router_urls.put(cache_key, path, now + expires / 2)
        return path

    def delete(self, key: str) -> None:
        with self.translate_errors():
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def discard(self, key: str) -> None:
        """Delete ``key`` if the store lets us now; a failure is logged, not raised (what is
        left is found later: by ``make sweep``, or the bucket's lifecycle rule for uploads/)."""
        try:
            self.delete(key)
        except (DependencyUnavailable, ObjectMissing) as exc:
            log.warning("could not delete %s: %s", key, exc)

    def list_keys(self, prefix: str) -> Iterator[list[str]]:
        """The keys under ``prefix``, a page (at most 1000) at a time."""
        with self.translate_errors():
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": DELETE_BATCH}
            )
            for page in pages:
                keys = [obj["Key"] for obj in page.get("Contents", [])]
                if keys:
                    yield keys

    def list_objects(self, prefix: str) -> Iterator[ListedObject]:
        """Every object under ``prefix``, with the time it was written."""
        with self.translate_errors():
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": DELETE_BATCH}
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    yield ListedObject(obj["Key"], obj["LastModified"])

    def multipart_uploads(self, prefix: str = "") -> Iterator[MultipartUpload]:
        """The multipart uploads under ``prefix`` that are neither completed nor aborted."""
        with self.translate_errors():
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                for upload in page.get("Uploads", []):
                    yield MultipartUpload(upload["Key"], upload["UploadId"], upload["Initiated"])

    def abort_multipart(self, upload: MultipartUpload) -> None:
        with self.translate_errors():
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=upload.key, UploadId=upload.upload_id
            )

    def delete_many(self, keys: list[str]) -> None:
        """Delete ``keys`` with DeleteObjects, 1000 per call (S3's, GCS's and SeaweedFS's cap).

        A key that is already gone counts as deleted; any other per-key error is an outage.
        """
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start : start + DELETE_BATCH]
            with self.translate_errors():
                response = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
                )
            errors = [e for e in response.get("Errors", []) if e.get("Code") not in _MISSING_CODES]
            if errors:
                log.error("object store refused deletes: %s", errors[:3])
                raise DependencyUnavailable("object store", self.retry_after)

    def check(self) -> None:
        with self.translate_errors():
            self.client.head_bucket(Bucket=self.bucket)

    def ensure_bucket(self, lifecycle_rules: list[dict[str, Any]], *, attempts: int = 30) -> None:
        """Create the bucket unless it exists (waiting up to ``attempts`` seconds for the store
        to answer), then install ``lifecycle_rules`` (S3's LifecycleConfiguration shape)."""
        for attempt in range(attempts):
            try:
                try:
                    self.client.head_bucket(Bucket=self.bucket)
                except ClientError as exc:
                    code = str(exc.response.get("Error", {}).get("Code"))
                    if code not in ("404", "NoSuchBucket"):
                        raise
                    self.client.create_bucket(Bucket=self.bucket)
                    log.info("created bucket %s", self.bucket)
                break
            except (BotoCoreError, ClientError) as exc:
                if attempt == attempts - 1:
                    raise
                log.info("object store not ready (%s); retrying", exc)
                time.sleep(1)
        rules = cast("list[LifecycleRuleTypeDef]", lifecycle_rules)
        try:
            self.client.put_bucket_lifecycle_configuration(
                Bucket=self.bucket, LifecycleConfiguration={"Rules": rules}
            )
        except ClientError as exc:  # some stores have no lifecycle API: `make sweep` covers them
            log.warning("could not set the bucket lifecycle rule: %s", exc)


class _UrlCache:
    """A small LRU of signed URLs, each with the monotonic time it stops being handed out."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str], now: float) -> str | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[1] <= now:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: tuple[str, str], value: str, until: float) -> None:
        with self._lock:
            self._entries[key] = (value, until)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)


class ObjectWriter:
    """Writes one object as it is produced: a multipart upload once a second part arrives.

    :meth:`write_part` takes numbered parts in any order (the conversion sends part 1, which
    holds the MP3's length header, last). Parts are uploaded by a background thread while the next
    one is produced, so the producer never waits for the store unless a whole part is still in
    flight when the next is ready. Memory: at most one part being produced and one in flight.
    Nothing is visible in the bucket until :meth:`complete`; :meth:`abort` discards it all.
    """

    def __init__(self, storage: Storage, key: str, content_type: str) -> None:
        self.storage = storage
        self.key = key
        self.content_type = content_type
        self._whole: bytes | bytearray | None = None  # part 1 given alone: one PUT
        self._upload_id: str | None = None
        self._parts: list[CompletedPartTypeDef] = []
        self._size = 0
        self.completed = False
        self._queue: queue.SimpleQueue[tuple[int, bytes | bytearray] | None] = queue.SimpleQueue()
        self._in_flight = threading.Semaphore(1)
        self._uploader: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def _client(self) -> S3Client:
        return self.storage.client

    @property
    def part_size(self) -> int:
        return self.storage.part_size

    def write_part(self, number: int, data: bytes | bytearray) -> None:
        """Part ``number`` (from 1) of the object; every part but the last is ``part_size``
        or more. Part 1 given while no other part has been is the whole object (one PUT)."""
        self._raise_upload_error()
        self._size += len(data)
        if number == 1 and self._upload_id is None:
            self._whole = data
            return
        self._submit(data, number)

    def _submit(self, part: bytes | bytearray, number: int) -> None:
        if self._upload_id is None:
            with self.storage.translate_errors():
                created = self._client.create_multipart_upload(
                    Bucket=self.storage.bucket, Key=self.key, ContentType=self.content_type
                )
            self._upload_id = created["UploadId"]
        if self._uploader is None:
            self._uploader = threading.Thread(
                target=self._upload_parts, name="part-uploader", daemon=True
            )
            self._uploader.start()
        self._in_flight.acquire()  # the previous part has been sent: bounded memory
        self._raise_upload_error()
        self._queue.put((number, part))

    def _upload_parts(self) -> None:
        while (item := self._queue.get()) is not None:
            number, data = item
            try:
                if self._error is None:
                    self._upload_part(number, data)
            except BaseException as exc:  # re-raised in the producer's thread
                self._error = exc
            finally:
                del data, item
                self._in_flight.release()

    def _upload_part(self, number: int, data: bytes | bytearray) -> None:
        assert self._upload_id is not None
        with self.storage.translate_errors():
            response = self._client.upload_part(
                Bucket=self.storage.bucket,
                Key=self.key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=data,  # type: ignore[arg-type]  # botocore takes bytearray as bytes
            )
        self._parts.append({"ETag": response["ETag"], "PartNumber": number})

    def _finish_uploads(self) -> None:
        if self._uploader is not None:
            self._queue.put(None)
            self._uploader.join()
            self._uploader = None

    def _raise_upload_error(self) -> None:
        if self._error is not None:
            raise self._error

    def complete(self) -> StoredObject:
        bucket = self.storage.bucket
        if self._upload_id is None:
            body = self._whole if self._whole is not None else b""
            with self.storage.translate_errors():
                put = self._client.put_object(
                    Bucket=bucket, Key=self.key, Body=bytes(body), ContentType=self.content_type,
                )  # fmt: skip
            self._whole = None
            etag = put["ETag"]
        else:
            self._finish_uploads()
            self._raise_upload_error()
            assert self._upload_id is not None
            parts = sorted(self._parts, key=lambda part: part["PartNumber"])
            with self.storage.translate_errors():
                done = self._client.complete_multipart_upload(
                    Bucket=bucket,
                    Key=self.key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": parts},
                )
            etag = done["ETag"]
        self.completed = True
        return StoredObject(etag=etag.strip('"'), size=self._size)

    def abort(self) -> None:
        """Discard everything written; best effort (the bucket lifecycle rule is the backstop)."""
        self._whole = None
        self._finish_uploads()
        try:
            if self.completed:
                self._client.delete_object(Bucket=self.storage.bucket, Key=self.key)
            elif self._upload_id is not None:
                self._client.abort_multipart_upload(
                    Bucket=self.storage.bucket, Key=self.key, UploadId=self._upload_id
                )
        except (BotoCoreError, ClientError, OSError) as exc:
            log.warning("could not discard %s: %s", self.key, exc)
