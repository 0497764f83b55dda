"""Encoding options, tags and the exact length header on the real stack (SeaweedFS, HTTP)."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from devstack import wavgen
from tests.support import Client
from tests.support.audio import assert_matches_source
from tests.support.probe import audio_start, ffprobe_warnings, read_id3

MIB = 1024 * 1024


def multipart_upload(
    client: Client, user: dict[str, str], wav: bytes, fields: dict[str, str]
) -> requests.Response:
    return client.session.post(
        f"{client.base_url}/records",
        data={"user": user["id"], "token": user["token"], **fields},
        files={"file": ("take.wav", wav, "audio/wav")},
        timeout=120,
    )


def test_options_and_tags_end_to_end(client: Client, tmp_path: Path) -> None:
    user = client.create_user("Tagger")
    wav = wavgen.wav(seconds=4.321, channels=2, rate=48000)
    fields = {
        "bitrate_kbps": "128", "channels": "1", "sample_rate": "44100",
        "title": "Ein Lied / für dich", "artist": "Ünïcödé", "album": "Demos",
        "date": "2026-12-02", "comment": "first take",
    }  # fmt: skip
    response = multipart_upload(client, user, wav, fields)
    assert response.status_code == 201, response.text
    record = response.json()
    assert (record["bitrate_kbps"], record["channels"], record["sample_rate"]) == (128, 1, 44100)
    assert record["vbr_quality"] is None
    assert record["tags"] == {k: fields[k] for k in ("title", "artist", "album", "date", "comment")}
    assert record["filename"] == "Ein Lied _ für dich.mp3"
    download = requests.get(record["url"], timeout=30)
    assert download.status_code == 200
    assert (
        "filename*=UTF-8''Ein%20Lied%20_%20f%C3%BCr%20dich.mp3"
        in download.headers["Content-Disposition"]
    )
    mp3 = download.content
    tag = read_id3(mp3)
    assert tag.text("TIT2") == fields["title"] and tag.text("TPE1") == fields["artist"]
    assert tag.frames["COMM::XXX"] == ["first take"]
    # Downmixed and resampled: round(4.321 * 48000) * 44100 // 48000 frames, and as loud.
    assert_matches_source(mp3, wav, channels=1, sample_rate=44100)
    assert "Estimating" not in ffprobe_warnings(mp3)


def test_vbr_and_a_raw_wav_body_with_options_in_the_query(client: Client) -> None:
    user = client.create_user("Raw")
    wav = wavgen.wav(seconds=2.0, channels=2, rate=44100)
    response = client.session.post(
        f"{client.base_url}/records",
        params={"user": user["id"], "vbr_quality": "2", "title": "Raw body"},
        headers={"Authorization": f"Bearer {user['token']}", "Content-Type": "audio/wav"},
        data=wav,
        timeout=60,
    )
    assert response.status_code == 201, response.text
    record = response.json()
    assert record["vbr_quality"] == 2 and 32 <= record["bitrate_kbps"] <= 320
    assert record["filename"] == "Raw body.mp3"
    mp3 = requests.get(record["url"], timeout=30).content
    start = audio_start(mp3)
    assert mp3[start + 36 : start + 40] == b"Xing"  # VBR: a Xing header, not Info
    assert_matches_source(mp3, wav)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"bitrate_kbps": "100"}, "bitrate_kbps"),
        ({"bitrate_kbps": "128", "vbr_quality": "4"}, "vbr_quality"),
        ({"channels": "6"}, "channels"),
        ({"sample_rate": "96000"}, "sample_rate"),
        ({"title": "line\r\nContent-Type: text/html"}, "title"),
        ({"comment": "x" * 1001}, "comment"),
        ({"bitrate_kbps": "128"}, "bitrate_kbps"),  # the WAV is 8 kHz: MPEG-2.5, 64 at most
    ],
)
def test_invalid_options_are_422_naming_the_field(
    client: Client, fields: dict[str, str], field: str
) -> None:
    user = client.create_user("Wrong")
    response = multipart_upload(client, user, wavgen.wav(seconds=0.2, rate=8000), fields)
    assert response.status_code == 422, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    problem = response.json()
    assert problem["field"] == field
    assert field in problem["detail"]


def test_a_forms_options_may_be_in_its_query_but_not_twice(client: Client) -> None:
    """A multipart upload's options in the query count (they were ignored once); the same
    option in the query and the form with two values is a 422 naming it."""
    user = client.create_user("Query")
    form = {"user": user["id"], "token": user["token"], "title": "Both"}
    files = {"file": ("take.wav", wavgen.wav(seconds=0.5), "audio/wav")}
    url = f"{client.base_url}/records"
    created = client.session.post(url, params={"bitrate_kbps": "128"}, data=form, files=files)
    assert created.status_code == 201, created.text
    assert (created.json()["bitrate_kbps"], created.json()["tags"]) == (128, {"title": "Both"})
    twice = client.session.post(
        url, params={"bitrate_kbps": "128"}, data={**form, "bitrate_kbps": "96"}, files=files
    )
    assert twice.status_code == 422, twice.text
    assert twice.json()["field"] == "bitrate_kbps"


def test_without_options_the_deployment_default_applies(client: Client) -> None:
    user = client.create_user("Default")
    record = client.upload(user, wavgen.wav(seconds=1.0)).json()
    assert (record["bitrate_kbps"], record["vbr_quality"], record["tags"]) == (192, None, {})


def test_direct_upload_start_refuses_invalid_options(client: Client) -> None:
    user = client.create_user("Direct")
    response = client.session.post(
        f"{client.base_url}/records/uploads",
        json={"filename": "a.wav", "vbr_quality": 11},
        headers={"Authorization": f"Bearer {user['token']}"},
        params={"user": user["id"]},
        timeout=30,
    )
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "vbr_quality"


def test_direct_upload_options_reach_the_job_and_the_list(client: Client) -> None:
    """Options given when the direct upload starts are applied by its job; the list reports
    the effective values and the tags, as the 201 body does."""
    user = client.create_user("Direct options")
    headers = {"Authorization": f"Bearer {user['token']}"}
    started = client.session.post(
        f"{client.base_url}/records/uploads",
        json={"user": user["id"], "filename": "long.wav", "vbr_quality": 5, "channels": 1,
              "sample_rate": 22050, "title": "Direct", "comment": "from the job"},
        headers=headers,
        timeout=30,
    )  # fmt: skip
    assert started.status_code == 201, started.text
    upload = started.json()
    post = upload["upload"]
    wav = wavgen.wav(seconds=2.0)
    sent = requests.post(
        post["url"], data=post["fields"],
        files={post["file_field"]: ("long.wav", wav, "audio/wav")},
        timeout=120,
    )  # fmt: skip
    assert sent.status_code in (200, 201, 204), sent.text
    done = requests.post(
        upload["complete_url"], params={"user": user["id"]},
        headers={**headers, "Prefer": "wait=25"}, timeout=120,
    )  # fmt: skip
    assert done.status_code == 201, done.text
    record = done.json()
    assert (record["vbr_quality"], record["channels"], record["sample_rate"]) == (5, 1, 22050)
    assert record["tags"] == {"title": "Direct", "comment": "from the job"}
    assert record["filename"] == "Direct.mp3"
    listed = client.session.get(
        f"{client.base_url}/records", params={"user": user["id"]}, headers=headers, timeout=30
    ).json()["records"]
    assert [{k: r[k] for k in record if k != "url"} for r in listed] == [
        {k: v for k, v in record.items() if k != "url"}
    ]
    mp3 = requests.get(record["url"], timeout=30).content
    assert read_id3(mp3).text("TIT2") == "Direct"
    assert_matches_source(mp3, wav, channels=1, sample_rate=22050)
