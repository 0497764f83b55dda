"""HEAD of a record answers like GET without the body, in every download mode (unit, moto).

In redirect mode the 307 points at a URL presigned for the request's own method: SigV4 signs
the method, so a HEAD sent to a URL presigned for GET gets 403 from S3 (and SeaweedFS). The
end-to-end twin against SeaweedFS and nginx is in tests/e2e/test_records.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace

import boto3
import pytest
import requests
from common.adapters.storage import Storage
from common.domain.records import StoredRecord
from common.http import Request, Response
from common.http.downloads import download_response
from common.settings import DownloadMode, Settings
from moto import mock_aws
from werkzeug.test import EnvironBuilder

BODY = bytes(range(256)) * 40
KEY = "users/u/records/r.mp3"


@pytest.fixture
def storage(monkeypatch: pytest.MonkeyPatch) -> Iterator[Storage]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="records")
        put = client.put_object(Bucket="records", Key=KEY, Body=BODY, ContentType="audio/mpeg")
        storage = Storage(client, "records", part_size=5 * 1024 * 1024)
        storage.etag = put["ETag"].strip('"')  # type: ignore[attr-defined]
        yield storage


def _record(storage: Storage) -> StoredRecord:
    return StoredRecord(
        id=uuid.uuid4(),
        user_id=uuid.uuid4(),
        object_key=KEY,
        filename="take.mp3",
        size_bytes=len(BODY),
        etag=storage.etag,  # type: ignore[attr-defined]
        duration_seconds=1.0,
        bitrate_kbps=192,
        sample_rate=44100,
        channels=2,
        vbr_quality=None,
        tags=None,
    )


def _answer(storage: Storage, mode: DownloadMode, method: str) -> Response:
    settings = replace(Settings.from_env({}), download_mode=mode)
    request = Request(EnvironBuilder(path="/record", method=method).get_environ())
    return download_response(request, storage, settings, _record(storage))


@pytest.mark.parametrize("mode", list(DownloadMode))
def test_head_has_the_status_and_headers_of_get(storage: Storage, mode: DownloadMode) -> None:
    get = _answer(storage, mode, "GET")
    head = _answer(storage, mode, "HEAD")
    assert head.status_code == get.status_code
    ignored = {"Location", "X-Accel-Redirect"}  # a URL signed per method; the router's
    if mode is DownloadMode.ACCEL:
        # GET hands the body to the router; HEAD is answered by the function itself.
        assert head.headers["Content-Length"] == str(len(BODY))
        assert head.headers["Content-Type"] == get.headers["Content-Type"]
        return
    assert {k: v for k, v in head.headers if k not in ignored} == {
        k: v for k, v in get.headers if k not in ignored
    }
    assert head.get_data() == b""


def test_redirect_for_head_is_presigned_for_head(storage: Storage) -> None:
    get = _answer(storage, DownloadMode.REDIRECT, "GET")
    head = _answer(storage, DownloadMode.REDIRECT, "HEAD")
    assert get.status_code == head.status_code == 307
    # stream: moto answers a mocked HEAD with no body, which requests would try to read.
    followed_head = requests.head(head.headers["Location"], timeout=10, stream=True)
    assert followed_head.status_code == 200
    assert followed_head.headers["Content-Length"] == str(len(BODY))
    assert followed_head.headers["Content-Type"] == "audio/mpeg"
    followed_get = requests.get(get.headers["Location"], timeout=10)
    assert followed_get.status_code == 200 and followed_get.content == BODY
