"""A client generated from api/openapi.yaml by openapi-python-client, and the whole flow run
with it: what a client developer gets from the document alone.

The output is imported as generated (by spec, under a package name of its own). The generator
configuration maps ``audio/wav`` and ``audio/mpeg`` to ``application/octet-stream`` (its
``content_type_overrides``): without it the raw WAV body and the MP3 responses are dropped
(docs/api.md, "Generated clients").
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import time
import uuid
from io import BytesIO
from pathlib import Path
from types import ModuleType
from typing import Any

import requests

from tests.support import ROOT

SPEC = ROOT / "api" / "openapi.yaml"
PACKAGE = "record_service_client"
GENERATOR_CONFIG = """\
content_type_overrides:
  audio/wav: application/octet-stream
  audio/mpeg: application/octet-stream
post_hooks: []
"""


def generate_client(workdir: Path, package: str = PACKAGE) -> ModuleType:
    """Generate the client into ``workdir`` and import it, unedited."""
    config = workdir / "generator.yaml"
    config.write_text(GENERATOR_CONFIG)
    target = workdir / package
    generator = Path(sys.executable).parent / "openapi-python-client"
    result = subprocess.run(
        [
            str(generator), "generate", "--path", str(SPEC), "--output-path", str(target),
            "--meta", "none", "--config", str(config), "--overwrite",
        ],
        capture_output=True, text=True, timeout=120, check=False, env=dict(os.environ),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    # Every operation and both bodies made it: nothing dropped with a warning.
    assert "Unsupported content" not in result.stdout + result.stderr, result.stdout
    assert "will be omitted" not in result.stdout + result.stderr, result.stdout
    spec = importlib.util.spec_from_file_location(
        package, target / "__init__.py", submodule_search_locations=[str(target)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module  # its modules import each other relatively
    spec.loader.exec_module(module)
    return module


class Generated:
    """The generated package's modules, by the names the generator gave them."""

    def __init__(self, package: ModuleType) -> None:
        name = package.__name__
        self.package = package

        def load(path: str) -> Any:
            return importlib.import_module(f"{name}.{path}")

        self.client = load("client")
        self.types = load("types")
        self.models = load("models")
        self.create_user = load("api.users.create_user")
        self.rotate_token = load("api.users.rotate_token")
        self.erase_user = load("api.users.erase_user")
        self.upload_record = load("api.records.upload_record")
        self.get_record = load("api.records.get_record")
        self.head_record = load("api.records.head_record")
        self.list_records = load("api.records.list_records")
        self.delete_record = load("api.records.delete_record")
        self.start_direct_upload = load("api.records.start_direct_upload")
        self.complete_direct_upload = load("api.records.complete_direct_upload")
        self.get_direct_upload_status = load("api.records.get_direct_upload_status")


def run_flow(gen: Generated, base_url: str, wav: bytes) -> None:
    """Every step of docs/api.md with the generated client, asserting what comes back."""
    models, types = gen.models, gen.types
    anonymous = gen.client.Client(base_url=base_url, timeout=120)
    created = gen.create_user.sync_detailed(
        client=anonymous,
        body=models.NewUser(name="Generated client"),
        idempotency_key=str(uuid.uuid4()),
    )
    assert created.status_code == 201, created.content
    user = created.parsed
    assert isinstance(user, models.User)
    client = gen.client.AuthenticatedClient(base_url=base_url, token=str(user.token), timeout=120)

    def wav_file(name: str = "take.wav") -> Any:
        return types.File(payload=BytesIO(wav), file_name=name, mime_type="audio/wav")

    # The multipart model sends its required parts first (user, file), then the optional ones:
    # a token there comes after the file, when the credentials were already checked (401),
    # and an option or tag after the file is a 422 naming it; nothing is stored.
    late_token = gen.upload_record.sync_detailed(
        client=anonymous,
        body=models.UploadRecordFilesBody(user=user.id, file=wav_file(), token=user.token),
    )
    assert late_token.status_code == 401, late_token.content
    late_title = gen.upload_record.sync_detailed(
        client=client,
        body=models.UploadRecordFilesBody(user=user.id, file=wav_file(), title="Too late"),
    )
    assert late_title.status_code == 422, late_title.content
    assert late_title.parsed.field == "title"
    assert late_title.parsed.type_ == "urn:record-service:problem:field-after-file"

    # The multipart model with the token as a Bearer header and no optional part: a WAV
    # typed as a File, under its own name.
    plain = gen.upload_record.sync_detailed(
        client=client, body=models.UploadRecordFilesBody(user=user.id, file=wav_file("a.wav"))
    )
    assert plain.status_code == 201, plain.content
    assert plain.parsed.filename == "a.mp3"

    # Options and tags with the generated call: the raw WAV body (a File), whose options and
    # tags are query parameters, so they arrive before any audio.
    tagged = gen.upload_record.sync_detailed(
        client=client,
        body=types.File(payload=BytesIO(wav), mime_type="audio/wav"),
        user=user.id,
        bitrate_kbps=models.BitrateKbps.VALUE_96,
        channels=models.Channels.VALUE_1,
        title="Generated take",
        artist="openapi-python-client",
        idempotency_key=str(uuid.uuid4()),
    )
    assert tagged.status_code == 201, tagged.content
    record = tagged.parsed
    assert isinstance(record, models.Record)
    assert (record.bitrate_kbps, record.channels) == (96, 1)
    assert (record.tags.title, record.tags.artist) == ("Generated take", "openapi-python-client")
    assert record.filename == "Generated take.mp3"

    # Download: the MP3 as a File (the override keeps the audio/mpeg responses).
    download = gen.get_record.sync_detailed(client=anonymous, id=record.id, user=user.id)
    assert download.status_code == 200, download.content
    mp3 = download.parsed.payload.read()
    assert len(mp3) == record.size_bytes
    assert mp3[:3] == b"ID3"
    head = gen.head_record.sync_detailed(client=anonymous, id=record.id, user=user.id)
    assert head.status_code == 200
    assert int(head.headers["Content-Length"]) == record.size_bytes

    # List one per page and follow the cursor to the end.
    third = gen.upload_record.sync_detailed(
        client=client, body=models.UploadRecordFilesBody(user=user.id, file=wav_file("c.wav"))
    )
    assert third.status_code == 201, third.content
    expected = {plain.parsed.id, record.id, third.parsed.id}
    seen: list[Any] = []
    cursor: Any = types.UNSET
    for _ in range(10):
        page = gen.list_records.sync_detailed(client=client, user=user.id, limit=1, cursor=cursor)
        assert page.status_code == 200, page.content
        seen += [item.id for item in page.parsed.records]
        if page.parsed.next_cursor is None:
            break
        cursor = page.parsed.next_cursor
    assert len(seen) == 3 and set(seen) == expected, seen

    # Delete: 204, then the download is 404.
    deleted = gen.delete_record.sync_detailed(client=client, id=third.parsed.id, user=user.id)
    assert deleted.status_code == 204, deleted.content
    gone = gen.get_record.sync_detailed(client=anonymous, id=third.parsed.id, user=user.id)
    assert gone.status_code == 404

    # Rotate (a key is required), then only the new token works.
    rotated = gen.rotate_token.sync_detailed(
        user_id=user.id, client=client, idempotency_key=str(uuid.uuid4())
    )
    assert rotated.status_code == 200, rotated.content
    old = gen.list_records.sync_detailed(client=client, user=user.id)
    assert old.status_code == 401
    client = gen.client.AuthenticatedClient(
        base_url=base_url, token=str(rotated.parsed.token), timeout=120
    )
    listed = gen.list_records.sync_detailed(client=client, user=user.id)
    assert listed.status_code == 200 and len(listed.parsed.records) == 2

    # Direct upload: start, send the WAV to the bucket with the presigned form, complete, poll.
    started = gen.start_direct_upload.sync_detailed(
        client=client,
        body=models.DirectUploadRequest(filename="direct.wav", title="Direct"),
        user=user.id,
    )
    assert started.status_code == 201, started.content
    upload = started.parsed
    form = upload.upload
    sent = requests.post(
        form.url,
        data=form.fields.additional_properties,
        files={form.file_field: ("direct.wav", wav, "audio/wav")},
        timeout=120,
    )
    assert sent.status_code in (200, 201, 204), sent.text
    completed = gen.complete_direct_upload.sync_detailed(
        upload_id=upload.id, client=client, user=user.id
    )
    assert completed.status_code == 202, completed.content
    status = completed.parsed
    deadline = time.monotonic() + 120
    while status.status not in (models.UploadStatusStatus.DONE, models.UploadStatusStatus.FAILED):
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
        polled = gen.get_direct_upload_status.sync_detailed(
            upload_id=upload.id, client=client, user=user.id
        )
        assert polled.status_code == 200, polled.content
        status = polled.parsed
    assert status.status == models.UploadStatusStatus.DONE, status
    assert status.record.tags.title == "Direct"

    # Erase: 204, and the token is refused from then on.
    erased = gen.erase_user.sync_detailed(user_id=user.id, client=client)
    assert erased.status_code == 204, erased.content
    after = gen.list_records.sync_detailed(client=client, user=user.id)
    assert after.status_code == 401
