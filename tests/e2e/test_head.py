"""End to end: HEAD of a record answers like GET (no body) in each download mode.

Through nginx, against SeaweedFS, with get_record restarted in each mode. In redirect mode a
client that follows the 307 (``curl -I -L``) must end in 200: the Location of a HEAD is
presigned for HEAD, since SigV4 signs the method and the store refuses a HEAD on a URL signed
for GET (the control below shows that it does).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
import requests

from devstack import ScratchStack, wavgen
from tests.support import Client

# Headers a download carries whatever the method (Date and the like aside).
COMPARED = ("Content-Length", "Content-Type", "ETag", "Accept-Ranges", "Cache-Control",
            "Content-Disposition")  # fmt: skip


@pytest.fixture(params=["accel", "stream", "redirect"])
def mode(request: pytest.FixtureRequest, stack: ScratchStack) -> Iterator[str]:
    with stack.download_mode(request.param) as mode:
        yield mode


def test_head_matches_get_in_every_mode(client: Client, mode: str) -> None:
    user = client.create_user("Head")
    record = client.upload(user, wavgen.wav(seconds=1.0), filename="song.wav").json()
    url = record["url"]
    get = client.session.get(url, allow_redirects=False, timeout=30)
    head = client.session.head(url, allow_redirects=False, timeout=30)
    assert head.status_code == get.status_code == (307 if mode == "redirect" else 200)
    assert head.content == b""
    if mode == "redirect":
        assert head.headers["Cache-Control"] == get.headers["Cache-Control"]
        assert head.headers["Location"] != get.headers["Location"]  # signed per method
        final_get = requests.get(get.headers["Location"], timeout=30)
        final_head = requests.head(head.headers["Location"], timeout=30)
        # The control: HEAD on the URL presigned for GET is what failed before.
        wrong = requests.head(get.headers["Location"], timeout=30)
        assert wrong.status_code == 403
    else:
        final_get, final_head = get, head
    assert final_get.status_code == final_head.status_code == 200
    assert len(final_get.content) == record["size_bytes"]
    assert final_head.content == b""
    for name in COMPARED:
        if mode == "redirect" and name in ("ETag", "Accept-Ranges", "Cache-Control"):
            continue  # the store's own values after the redirect
        assert final_head.headers.get(name) == final_get.headers.get(name), name
    assert final_head.headers["Content-Length"] == str(record["size_bytes"])
    assert "song.mp3" in final_head.headers["Content-Disposition"]


def test_curl_head_follows_the_redirect_to_200(client: Client, stack: ScratchStack) -> None:
    user = client.create_user("CurlHead")
    record = client.upload(user, wavgen.wav(seconds=0.5)).json()
    stack.restart_function("get_record", {"DOWNLOAD_MODE": "redirect"})
    try:
        out = subprocess.run(
            ["curl", "-s", "-I", "-L", record["url"]],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout  # fmt: skip
    finally:
        stack.restart_function("get_record")
    statuses = [line.split()[1] for line in out.splitlines() if line.startswith("HTTP/")]
    assert statuses == ["307", "200"], out
