"""Fast storage unit tests against moto's S3: multipart streaming, abort, ranged reads."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import EndpointConnectionError
from common.adapters.storage import ObjectMissing, Storage
from common.errors import DependencyUnavailable
from moto import mock_aws

PART = 5 * 1024 * 1024


@pytest.fixture
def storage(monkeypatch: pytest.MonkeyPatch) -> Iterator[Storage]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="records")
        yield Storage(client, "records", part_size=PART)


def test_small_objects_are_one_put(storage: Storage) -> None:
    writer = storage.open_writer("users/u/records/r.mp3")
    writer.write_part(1, b"abcdef")
    stored = writer.complete()
    assert stored.size == 6
    obj = storage.client.get_object(Bucket="records", Key="users/u/records/r.mp3")
    assert obj["Body"].read() == b"abcdef"
    assert obj["ContentType"] == "audio/mpeg"


def test_large_objects_stream_in_parts(storage: Storage) -> None:
    writer = storage.open_writer("big.mp3")
    piece = bytes(range(256)) * 4096  # 1 MiB
    whole = piece * 12
    parts = [whole[start : start + PART] for start in range(0, len(whole), PART)]
    for number, part in [*enumerate(parts, start=1)][1:]:  # part 1 last, as the conversion
        writer.write_part(number, part)
    uploads = storage.client.list_multipart_uploads(Bucket="records").get("Uploads", [])
    assert len(uploads) == 1  # in progress, not visible as an object yet
    assert "Contents" not in storage.client.list_objects_v2(Bucket="records")
    writer.write_part(1, parts[0])
    stored = writer.complete()
    assert stored.size == 12 * len(piece)
    assert storage.client.get_object(Bucket="records", Key="big.mp3")["Body"].read() == piece * 12


def test_abort_leaves_nothing(storage: Storage) -> None:
    writer = storage.open_writer("gone.mp3")
    writer.write_part(2, bytes(PART + 10))
    writer.abort()
    assert not storage.client.list_multipart_uploads(Bucket="records").get("Uploads")
    assert "Contents" not in storage.client.list_objects_v2(Bucket="records")


def test_abort_after_complete_deletes_the_object(storage: Storage) -> None:
    writer = storage.open_writer("x.mp3")
    writer.write_part(1, b"x")
    writer.complete()
    writer.abort()
    assert "Contents" not in storage.client.list_objects_v2(Bucket="records")


def test_ranged_read(storage: Storage) -> None:
    storage.client.put_object(Bucket="records", Key="k", Body=b"0123456789")
    stream = storage.open_read("k", (2, 5))
    assert stream.length == 4
    assert b"".join(stream) == b"2345"


def test_missing_object(storage: Storage) -> None:
    with pytest.raises(ObjectMissing):
        storage.open_read("nope")


def test_unreachable_store_is_503() -> None:
    client = boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:9",
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="y",
    )
    storage = Storage(client, "records", part_size=PART, retry_after=3)
    with pytest.raises(DependencyUnavailable) as info:
        storage.check()
    assert info.value.retry_after == 3
    assert isinstance(info.value.__cause__, EndpointConnectionError)


def test_numbered_parts_in_any_order_part_one_last(storage: Storage) -> None:
    """The conversion's way: parts 2..N while ffmpeg writes, part 1 (the header) at the end."""
    first, second, last = b"1" * PART, b"2" * PART, b"3" * 1000
    writer = storage.open_writer("ordered.mp3")
    assert writer.part_size == PART
    writer.write_part(2, second)
    writer.write_part(3, last)
    writer.write_part(1, first)
    stored = writer.complete()
    assert stored.size == 2 * PART + 1000
    body = storage.client.get_object(Bucket="records", Key="ordered.mp3")["Body"].read()
    assert body == first + second + last


def test_part_one_alone_is_a_single_put(storage: Storage) -> None:
    writer = storage.open_writer("voice.mp3")
    writer.write_part(1, bytearray(b"ID3 tag and a few frames"))
    assert not storage.client.list_multipart_uploads(Bucket="records").get("Uploads")
    assert writer.complete().size == 24
    body = storage.client.get_object(Bucket="records", Key="voice.mp3")["Body"].read()
    assert body == b"ID3 tag and a few frames"


def test_clients_are_made_when_a_route_first_needs_them() -> None:
    """A redirecting download only signs: from_settings makes no client, and signing makes
    only the public endpoint's (a botocore client costs a cold start about 0.1 s)."""
    from common.adapters import storage as storage_module
    from common.settings import Settings

    made: list[str] = []

    def count(**_: Any) -> None:
        made.append("s3")

    session = storage_module._boto_session()
    session.register("creating-client-class.s3", count)
    try:
        settings = Settings(
            s3_endpoint_url="http://storage.internal:8333",
            s3_public_endpoint_url="http://127.0.0.1:8333",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        storage = Storage.from_settings(settings)
        assert made == []
        url = storage.presigned_get("a.mp3", expires=60, filename_header="a.mp3")
        assert url.startswith("http://127.0.0.1:8333/records/a.mp3?")
        assert made == ["s3"]
        storage.presigned_get("b.mp3", expires=60, filename_header="b.mp3")
        assert made == ["s3"]  # one client, made once
        assert storage.client.meta.endpoint_url == "http://storage.internal:8333"
        assert made == ["s3", "s3"]
        same = Storage.from_settings(Settings(s3_endpoint_url="http://storage.internal:8333"))
        assert same.client is same.presign_client
    finally:
        session.unregister("creating-client-class.s3", count)
