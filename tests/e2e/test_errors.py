"""End to end: every error answer is the right status with a problem document."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from devstack import NativeStack, free_port, free_ports, make_data_dir, wavgen
from tests.support import Client

PROBLEM = "application/problem+json"
StartFunction = Callable[..., str]


def assert_problem(response: requests.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == PROBLEM
    body: dict[str, object] = response.json()
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert isinstance(body["type"], str) and body["type"]
    return body


# --- POST /users -------------------------------------------------------------------------


def test_same_name_twice_makes_two_users(client: Client) -> None:
    first, second = client.create_user("Bob"), client.create_user("Bob")
    assert first["id"] != second["id"]
    assert first["token"] != second["token"]


@pytest.mark.parametrize("name", ["Zoë", "李小龙", "Ωmega 🎵", "  trimmed  ", "x" * 100])
def test_names_round_trip(client: Client, name: str) -> None:
    assert client.create_user(name)["name"] == name.strip()


def test_form_encoded_name(client: Client) -> None:
    response = client.session.post(f"{client.base_url}/users", data={"name": "Form"}, timeout=10)
    assert response.status_code == 201
    assert response.json()["name"] == "Form"


@pytest.mark.parametrize(
    "body",
    [{}, {"name": ""}, {"name": "   "}, {"name": "x" * 101}, {"name": "a\x00b"}, {"name": "a\nb"},
     {"name": 42}, {"name": None}, {"name": ["Alice"]}],
)  # fmt: skip
def test_invalid_names_are_422(client: Client, body: dict[str, object]) -> None:
    response = client.session.post(f"{client.base_url}/users", json=body, timeout=10)
    assert_problem(response, 422)


def test_json_that_is_not_an_object_is_422(client: Client) -> None:
    response = client.session.post(f"{client.base_url}/users", json=["Alice"], timeout=10)
    assert_problem(response, 422)


def test_malformed_json_is_400(client: Client) -> None:
    response = client.session.post(
        f"{client.base_url}/users",
        data=b'{"name": "Al',
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert_problem(response, 400)


def test_unsupported_body_type_is_415(client: Client) -> None:
    response = client.session.post(
        f"{client.base_url}/users",
        data=b"<name/>",
        headers={"Content-Type": "text/xml"},
        timeout=10,
    )
    assert_problem(response, 415)


def test_wrong_methods_are_405(client: Client) -> None:
    response = client.session.get(f"{client.base_url}/users", timeout=10)
    assert_problem(response, 405)
    assert response.headers["Allow"] == "POST"
    response = client.session.patch(f"{client.base_url}/record?id=x&user=y", timeout=10)
    assert_problem(response, 405)
    # Every method of the path, though DELETE goes to upload_record and GET to get_record.
    assert response.headers["Allow"] == "DELETE, GET, HEAD"
    response = client.session.put(f"{client.base_url}/records", timeout=10)
    assert_problem(response, 405)
    assert response.headers["Allow"] == "GET, HEAD, POST"


def test_unknown_path_is_404_problem(client: Client) -> None:
    assert_problem(client.session.get(f"{client.base_url}/admin", timeout=10), 404)


def test_big_bodies_to_small_endpoints_are_413(client: Client) -> None:
    response = client.session.post(
        f"{client.base_url}/users", json={"name": "x" * 88_000}, timeout=10
    )
    assert_problem(response, 413)
    # The limit of this endpoint, not the uploads' one.
    assert "at most 65536 bytes" in response.json()["detail"]


# --- POST /records -----------------------------------------------------------------------


def test_wrong_token_and_unknown_user_answer_the_same(client: Client) -> None:
    user = client.create_user("Carol")
    wav = wavgen.wav(seconds=0.2)
    wrong_token = client.upload({"id": user["id"], "token": str(uuid.uuid4())}, wav)
    unknown_user = client.upload({"id": str(uuid.uuid4()), "token": user["token"]}, wav)
    a, b = assert_problem(wrong_token, 401), assert_problem(unknown_user, 401)
    a.pop("instance", None)
    b.pop("instance", None)
    assert a == b
    assert wrong_token.headers["WWW-Authenticate"] == unknown_user.headers["WWW-Authenticate"]


def test_missing_token_is_401(client: Client) -> None:
    user = client.create_user("Dave")
    response = client.session.post(
        f"{client.base_url}/records",
        data={"user": user["id"]},
        files={"file": ("a.wav", wavgen.wav(seconds=0.2))},
        timeout=30,
    )
    assert_problem(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_malformed_user_id_is_422(client: Client) -> None:
    user = client.create_user("Erin")
    assert_problem(client.upload({"id": "not-a-uuid", "token": user["token"]}, b"RIFF"), 422)


def test_missing_file_is_422(client: Client) -> None:
    user = client.create_user("Frank")
    response = client.session.post(
        f"{client.base_url}/records",
        files={"user": (None, user["id"]), "token": (None, user["token"])},
        timeout=30,
    )
    assert_problem(response, 422)


def test_not_a_wav_is_415(client: Client) -> None:
    user = client.create_user("Grace")
    body = assert_problem(client.upload(user, b"ID3\x04\x00" + os.urandom(5000), "song.wav"), 415)
    assert "not a WAV" in str(body["detail"])


def test_compressed_wav_is_415(client: Client) -> None:
    user = client.create_user("Heidi")
    mp3_in_wav = wavgen.riff(wavgen.fmt_chunk(tag=0x55), wavgen.chunk(b"data", os.urandom(4000)))
    assert_problem(client.upload(user, mp3_in_wav), 415)


@pytest.mark.parametrize(
    "wav",
    [
        wavgen.riff(wavgen.fmt_chunk(), wavgen.chunk(b"data", b"")),  # no samples
        wavgen.riff(wavgen.fmt_chunk(rate=1000), wavgen.chunk(b"data", bytes(100))),
        wavgen.riff(wavgen.fmt_chunk(channels=0, block_align=0), wavgen.chunk(b"data", bytes(100))),
        wavgen.wav(seconds=0.1)[:30],  # cut inside the header
    ],
    ids=["empty", "rate-1000", "zero-channels", "truncated-header"],
)
def test_undecodable_wavs_are_422(client: Client, wav: bytes) -> None:
    user = client.create_user("Ivan")
    assert_problem(client.upload(user, wav), 422)


def test_upload_over_the_router_limit_is_refused_before_the_body(stack: NativeStack) -> None:
    """A declared size over MAX_UPLOAD_BYTES gets 413 while the body is still unsent."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.ports.router, timeout=10)
    conn.putrequest("POST", "/records")
    conn.putheader("Content-Type", "multipart/form-data; boundary=b")
    conn.putheader("Content-Length", str(300 * 1024 * 1024))
    conn.endheaders()
    conn.send(b"--b\r\n")
    response = conn.getresponse()
    assert response.status == 413
    assert response.getheader("Content-Type") == PROBLEM
    assert f"at most {256 * 1024 * 1024} bytes" in json.loads(response.read())["detail"]
    conn.close()


@pytest.fixture(scope="module")
def function_factory(stack: NativeStack) -> Iterator[StartFunction]:
    """Start extra function processes with a changed environment, reached directly."""
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str, **env: str) -> str:
        port = free_port()
        log = (stack.logs / f"extra-{name}-{port}.log").open("wb")
        function_env = {**stack.function_env(name), "PORT": str(port), **env}
        proc = subprocess.Popen(
            [sys.executable, "-m", "common.platform.serve"],
            env=function_env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                requests.get(url + "/ping", timeout=1)
                return url
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError(f"{name} did not start")

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(10)


def test_function_refuses_a_declared_size_over_its_limit(
    function_factory: StartFunction, client: Client
) -> None:
    url = function_factory("upload_record", MAX_UPLOAD_BYTES="100000")
    user = client.create_user("Judy")
    response = requests.post(
        f"{url}/records",
        data={"user": user["id"], "token": user["token"]},
        files={"file": ("big.wav", wavgen.wav(seconds=2.0))},
        timeout=30,
    )
    assert_problem(response, 413)


def test_database_outage_is_503_with_retry_after(function_factory: StartFunction) -> None:
    dead = f"postgresql+pg8000://records:x@127.0.0.1:{free_port()}/records"
    url = function_factory("create_user", DATABASE_URL=dead, DB_CONNECT_TIMEOUT_SECONDS="2")
    response = requests.post(f"{url}/users", json={"name": "Ken"}, timeout=30)
    body = assert_problem(response, 503)
    assert response.headers["Retry-After"].isdigit()
    assert "database" in str(body["detail"])
    health = requests.get(f"{url}/healthz", timeout=30)
    assert_problem(health, 503)


def test_storage_outage_is_503_and_leaves_no_row(
    function_factory: StartFunction, client: Client, stack: NativeStack
) -> None:
    url = function_factory("upload_record", S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    user = client.create_user("Liam")
    response = requests.post(
        f"{url}/records",
        data={"user": user["id"], "token": user["token"]},
        files={"file": ("a.wav", wavgen.wav(seconds=1.0))},
        timeout=60,
    )
    body = assert_problem(response, 503)
    assert response.headers["Retry-After"].isdigit()
    assert "object store" in str(body["detail"])
    from common.adapters.db import Database, sql
    from common.settings import Settings

    db = Database.from_settings(Settings.from_env(stack.app_env()))
    try:
        rows = db.execute(
            sql("SELECT count(*) FROM records WHERE user_id = :u"), {"u": uuid.UUID(user["id"])}
        )
    finally:
        db.dispose()
    assert rows[0][0] == 0


# --- GET /record -------------------------------------------------------------------------


def test_unknown_and_foreign_records_are_404(client: Client) -> None:
    alice, mallory = client.create_user("Alice"), client.create_user("Mallory")
    record = client.upload(alice, wavgen.wav(seconds=0.2)).json()
    foreign = client.session.get(
        f"{client.base_url}/record?id={record['id']}&user={mallory['id']}", timeout=10
    )
    unknown = client.session.get(
        f"{client.base_url}/record?id={uuid.uuid4()}&user={alice['id']}", timeout=10
    )
    a, b = assert_problem(foreign, 404), assert_problem(unknown, 404)
    assert a["detail"] == b["detail"]
    assert (
        client.session.head(
            f"{client.base_url}/record?id={record['id']}&user={mallory['id']}", timeout=10
        ).status_code
        == 404
    )


@pytest.mark.parametrize("query", ["", "?id=", "?user=x", "?id=nope&user=nope", "?id=1&user=2"])
def test_malformed_download_queries_are_422(client: Client, query: str) -> None:
    assert_problem(client.session.get(f"{client.base_url}/record{query}", timeout=10), 422)


def test_persistence_across_a_restart_of_the_stack(tmp_path: Path) -> None:
    """Everything created before a restart of the native stack is still there after it."""
    data = make_data_dir("records-restart-")
    first = NativeStack(data, ports=free_ports())
    first.start(timeout=120)
    try:
        with requests.Session() as session:
            client = Client(first.base_url, session)
            user = client.create_user("Persistent")
            record = client.upload(user, wavgen.wav(seconds=0.5)).json()
            before = session.get(record["url"], timeout=30).content
    finally:
        first.stop()
    second = NativeStack(data, ports=first.ports)
    second.start(timeout=120)
    try:
        after = requests.get(record["url"], timeout=30)
        assert after.status_code == 200
        assert after.content == before
        again = requests.post(
            f"{second.base_url}/records",
            data={"user": user["id"], "token": user["token"]},
            files={"file": ("b.wav", wavgen.wav(seconds=0.2))},
            timeout=60,
        )
        assert again.status_code == 201  # the token still works
    finally:
        second.stop()
        import shutil

        shutil.rmtree(data, ignore_errors=True)


def curl_form(client: Client, tmp_path: Path, *parts: str) -> tuple[int, dict[str, object]]:
    """POST /records through the router with curl's -F parts, in the order given."""
    (tmp_path / "x.wav").write_bytes(wavgen.wav(seconds=0.5))
    args = [arg for part in parts for arg in ("-F", part)]
    done = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", *args, f"{client.base_url}/records"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60, check=True,
    )  # fmt: skip
    body, _, code = done.stdout.rpartition("\n")
    problem: dict[str, object] = json.loads(body)
    return int(code), problem


def records_of(client: Client, user: dict[str, str]) -> list[object]:
    listed = client.session.get(
        f"{client.base_url}/records",
        params={"user": user["id"]},
        headers={"Authorization": f"Bearer {user['token']}"},
        timeout=30,
    )
    assert listed.status_code == 200, listed.text
    records: list[object] = listed.json()["records"]
    return records


def test_a_field_after_the_file_is_422_naming_it_and_stores_nothing(
    client: Client, tmp_path: Path
) -> None:
    user = client.create_user("Late field")
    code, problem = curl_form(
        client, tmp_path, f"user={user['id']}", f"token={user['token']}", "file=@x.wav",
        "bitrate_kbps=999",
    )  # fmt: skip
    assert code == 422, problem
    assert problem["type"] == "urn:record-service:problem:field-after-file"
    assert problem["field"] == "bitrate_kbps"
    assert records_of(client, user) == []


def test_a_token_after_the_file_is_401_and_stores_nothing(client: Client, tmp_path: Path) -> None:
    """The credentials are checked when the file starts: a token after it is not seen."""
    user = client.create_user("Late token")
    code, problem = curl_form(
        client, tmp_path, f"user={user['id']}", "file=@x.wav", f"token={user['token']}"
    )
    assert code == 401, problem
    assert problem["status"] == 401
    assert records_of(client, user) == []
