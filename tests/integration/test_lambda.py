"""Lambda mode: each function's handler invoked in-process with real Function URL and HTTP API
(payload 2.0) events, against the stack's real PostgreSQL and SeaweedFS, answering exactly
what the same request over HTTP (nginx -> functions-framework) answers. Then the real Runtime
Interface Client, started by the container entry point, serving an event from a Runtime API.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
import pytest
import requests
from common.adapters.db import sql
from common.adapters.queue import SqsQueue, job_message, make_queue, parse_job_message
from common.platform import aws_lambda, entrypoint
from common.platform.aws_lambda import LambdaHandler, make_handler
from common.platform.runtime import Services, set_services
from common.settings import DownloadMode, JobQueueKind, Settings
from devstack.lambda_events import event, event_fixture, parse_response
from moto import mock_aws

from devstack import NativeStack, wavgen
from tests.support import ROOT, Client
from tests.support.forms import multipart
from tests.support.stack_clients import RecordingQueue, build_services

FUNCTION_URL_HOST = "abcdefghijklmnopqrstuvwxyz012345.lambda-url.us-east-1.on.aws"
HTTP_API_HOST = "a1b2c3d4e5.execute-api.us-east-1.amazonaws.com"
RECORD_FIELDS = ("duration_seconds", "size_bytes", "bitrate_kbps", "sample_rate", "channels")


@pytest.fixture(scope="module")
def lambda_services(stack: NativeStack) -> Services:
    # No router in front of a Lambda: the function itself streams (or redirects, below).
    return build_services(stack, download_mode=DownloadMode.STREAM)


@pytest.fixture
def invoke(lambda_services: Services) -> Iterator[Callable[..., Any]]:
    """invoke(target, event) -> LambdaResponse, with the handlers wired to the stack."""
    handlers: dict[str, LambdaHandler] = {}
    set_services(lambda_services)

    def call(target: str, ev: dict[str, Any]) -> Any:
        if target not in handlers:
            handlers[target] = make_handler(target, str(ROOT / "functions" / target / "main.py"))
        result = handlers[target](ev, None)
        assert set(result) <= {"statusCode", "headers", "body", "isBase64Encoded", "cookies"}
        return parse_response(result)

    yield call
    set_services(None)


def test_create_user_text_and_base64_bodies(invoke: Any, client: Client) -> None:
    over_http = client.create_user("Ada")
    for name in ("function_url_post_json.json", "http_api_post_json_base64.json"):
        response = invoke("create_user", event(name, body='{"name": "Ada"}'))
        assert response.status == 201
        assert response.headers["content-type"] == "application/json"
        assert not response.base64  # JSON goes back as text
        body = response.json()
        assert set(body) == set(over_http) == {"id", "name", "token"}
        assert body["name"] == over_http["name"] == "Ada"
        # The new user is real: its token uploads over HTTP.
        uploaded = client.upload(body, wavgen.wav(seconds=0.2))
        assert uploaded.status_code == 201, uploaded.text


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", "{"),
        ("application/json", "[1, 2]"),
        ("application/json", '{"name": ""}'),
        ("text/plain", "Ada"),
    ],
)
def test_create_user_errors_match_http(
    invoke: Any, client: Client, content_type: str, body: str
) -> None:
    over_http = client.session.post(
        f"{client.base_url}/users", data=body, headers={"Content-Type": content_type}, timeout=10
    )
    for name in ("function_url_post_json.json", "http_api_post_json_base64.json"):
        response = invoke(
            "create_user", event(name, headers={"content-type": content_type}, body=body)
        )
        assert response.status == over_http.status_code
        assert response.status in (400, 415, 422)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json() == over_http.json()


def test_upload_multipart_base64_matches_http(invoke: Any, client: Client) -> None:
    user = client.create_user("Grace")
    wav = wavgen.wav(seconds=1.5, channels=2, rate=44100)
    over_http = client.upload(user, wav, filename="take one.wav")
    assert over_http.status_code == 201, over_http.text
    content_type, body = multipart(
        {"user": user["id"], "token": user["token"]}, ("take one.wav", wav, "audio/wav")
    )
    response = invoke(
        "upload_record",
        event(
            "function_url_post_multipart.json", headers={"content-type": content_type}, body=body
        ),
    )
    assert response.status == 201, response.body
    got, expected = response.json(), over_http.json()
    assert set(got) == set(expected)
    for key in (*RECORD_FIELDS, "filename"):
        assert got[key] == expected[key], key
    assert got["filename"] == "take one.mp3"
    assert got["url"] == f"https://{FUNCTION_URL_HOST}/record?id={got['id']}&user={user['id']}"
    assert response.headers["location"] == got["url"]


def test_upload_raw_wav_with_bearer_and_query(invoke: Any, client: Client) -> None:
    user = client.create_user("Hedy")
    wav = wavgen.wav(seconds=0.5, channels=1, rate=22050, bits=24)
    over_http = client.session.post(
        f"{client.base_url}/records",
        params={"user": user["id"]},
        data=wav,
        headers={"Content-Type": "audio/wav", "Authorization": f"Bearer {user['token']}"},
        timeout=60,
    )
    assert over_http.status_code == 201, over_http.text
    response = invoke(
        "upload_record",
        event(
            "http_api_post_raw_wav.json",
            query={"user": user["id"]},
            headers={"authorization": f"Bearer {user['token']}"},
            body=wav,
        ),
    )
    assert response.status == 201, response.body
    got = response.json()
    for key in RECORD_FIELDS:
        assert got[key] == over_http.json()[key], key
    assert got["url"].startswith(f"https://{HTTP_API_HOST}/record?id=")


@pytest.mark.parametrize(
    ("case", "expected_status"),
    [("not-a-wav", 415), ("bad-token", 401), ("adpcm", 415), ("no-user", 422)],
)
def test_upload_errors_match_http(
    invoke: Any, client: Client, case: str, expected_status: int
) -> None:
    user = client.create_user("Eve")
    wav = wavgen.wav(seconds=0.2)
    query = {"user": user["id"]}
    token = user["token"]
    if case == "not-a-wav":
        wav = b"ID3\x03\x00" + bytes(2000)
    elif case == "bad-token":
        token = "0" * 36
    elif case == "adpcm":
        wav = wavgen.riff(wavgen.fmt_chunk(tag=0x0002, bits=4), wavgen.chunk(b"data", bytes(400)))
    elif case == "no-user":
        query = {}
    headers = {"Content-Type": "audio/wav", "Authorization": f"Bearer {token}"}
    over_http = client.session.post(
        f"{client.base_url}/records", params=query, data=wav, headers=headers, timeout=60
    )
    response = invoke(
        "upload_record",
        event(
            "http_api_post_raw_wav.json",
            query=query,
            headers={"authorization": f"Bearer {token}"},
            body=wav,
        ),
    )
    assert response.status == over_http.status_code == expected_status
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json() == over_http.json()
    if expected_status == 401:
        assert response.headers["www-authenticate"] == over_http.headers["WWW-Authenticate"]


def test_get_record_streams_binary_and_ranges(invoke: Any, client: Client) -> None:
    user = client.create_user("Mary")
    record = client.upload(user, wavgen.wav(seconds=1.0)).json()
    query = {"id": record["id"], "user": user["id"]}
    whole = client.session.get(f"{client.base_url}/record", params=query, timeout=30)
    assert whole.status_code == 200
    response = invoke("get_record", event("function_url_get_query.json", query=query))
    assert response.status == 200
    assert response.base64  # the MP3 goes back base64-encoded, byte for byte
    assert response.headers["content-type"] == "audio/mpeg"
    assert response.body == whole.content
    assert response.headers["etag"] == whole.headers["ETag"]
    assert response.headers["content-disposition"] == whole.headers["Content-Disposition"]

    ranged_http = client.session.get(
        f"{client.base_url}/record", params=query, headers={"Range": "bytes=0-99"}, timeout=30
    )
    ranged = invoke("get_record", event("http_api_get_query.json", query=query))
    assert ranged.status == ranged_http.status_code == 206
    assert ranged.body == ranged_http.content == whole.content[:100]
    assert ranged.headers["content-range"] == ranged_http.headers["Content-Range"]

    head = invoke("get_record", event("function_url_get_query.json", method="HEAD", query=query))
    assert head.status == 200
    assert head.body == b""
    assert head.headers["content-length"] == str(len(whole.content))


@pytest.mark.parametrize("case", ["unknown", "someone-else", "missing-id", "bad-uuid"])
def test_get_record_errors_match_http(invoke: Any, client: Client, case: str) -> None:
    owner = client.create_user("Owner")
    record = client.upload(owner, wavgen.wav(seconds=0.2)).json()
    query = {"id": record["id"], "user": owner["id"]}
    if case == "unknown":
        query["id"] = "6a0f4c2e-1b3d-4e5f-8a7b-9c0d1e2f3a4b"
    elif case == "someone-else":
        query["user"] = client.create_user("Other")["id"]
    elif case == "missing-id":
        del query["id"]
    else:
        query["id"] = "not-a-uuid"
    over_http = client.session.get(f"{client.base_url}/record", params=query, timeout=30)
    response = invoke("get_record", event("http_api_get_query.json", query=query))
    assert response.status == over_http.status_code
    assert response.status in (404, 422)
    assert response.json() == over_http.json()


def test_get_record_redirect_mode_for_response_caps(
    stack: NativeStack, client: Client, lambda_services: Services
) -> None:
    """With DOWNLOAD_MODE=redirect (the Lambda setting) the MP3 never passes the function."""
    user = client.create_user("Rita")
    record = client.upload(user, wavgen.wav(seconds=1.0)).json()
    direct = client.session.get(record["url"], timeout=30).content
    services = build_services(stack, download_mode=DownloadMode.REDIRECT)
    set_services(services)
    try:
        handler = make_handler("get_record", str(ROOT / "functions" / "get_record" / "main.py"))
        query = {"id": record["id"], "user": user["id"]}
        response = parse_response(handler(event("function_url_get_query.json", query=query), None))
    finally:
        set_services(None)
    assert response.status == 307
    location = response.headers["location"]
    assert location.startswith(stack.s3_url + "/")
    fetched = requests.get(location, timeout=30)
    assert fetched.status_code == 200
    assert fetched.content == direct


def test_direct_upload_through_lambda_events(invoke: Any, client: Client) -> None:
    """Presign with an HTTP API event, send the WAV to the bucket, complete with another."""
    user = client.create_user("Zoe")
    wav = wavgen.wav(seconds=1.0)
    started = invoke(
        "upload_record",
        event(
            "http_api_post_json_base64.json",
            path="/records/uploads",
            headers={"authorization": f"Bearer {user['token']}"},
            body=json.dumps({"user": user["id"], "filename": "zoe.wav"}),
        ),
    )
    assert started.status == 201, started.body
    upload = started.json()
    assert upload["complete_url"] == (
        f"https://{HTTP_API_HOST}/records/uploads/{upload['id']}/complete"
    )
    post = upload["upload"]
    sent = requests.post(
        post["url"], data=post["fields"], files={"file": ("zoe.wav", wav)}, timeout=60
    )
    assert sent.status_code in (200, 201, 204), sent.text
    path = f"/records/uploads/{upload['id']}/complete"
    done = invoke(
        "upload_record",
        event(
            "http_api_post_complete_upload.json",
            path=path,
            path_parameters={"id": upload["id"]},
            query={"user": user["id"]},
            headers={"authorization": f"Bearer {user['token']}"},
        ),
    )
    assert done.status == 202, done.body
    assert done.headers["location"] == f"/records/uploads/{upload['id']}"
    # Poll the job with HTTP API events (the stack's worker runs it: JOB_QUEUE=postgres).
    record = poll_status(invoke, upload["id"], user)["record"]
    assert record["filename"] == "zoe.mp3"
    assert record["url"].startswith(f"https://{HTTP_API_HOST}/record?id=")
    over_http = client.upload(user, wav).json()
    for key in RECORD_FIELDS:
        assert record[key] == over_http[key], key
    # Someone else's completion call: not found, as over HTTP.
    other = client.create_user("Yan")
    theirs = invoke(
        "upload_record",
        event(
            "http_api_post_complete_upload.json",
            path=path,
            path_parameters={"id": upload["id"]},
            query={"user": other["id"]},
            headers={"authorization": f"Bearer {other['token']}"},
        ),
    )
    assert theirs.status == 404


def status_event(upload_id: str, user: dict[str, str]) -> dict[str, Any]:
    return event(
        "http_api_get_query.json",
        path=f"/records/uploads/{upload_id}",
        query={"user": user["id"]},
        headers={"authorization": f"Bearer {user['token']}"},
    )


def poll_status(invoke: Any, upload_id: str, user: dict[str, str]) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        answer = invoke("upload_record", status_event(upload_id, user))
        assert answer.status == 200, answer.body
        body: dict[str, Any] = answer.json()
        if body["status"] in ("done", "failed") or time.monotonic() > deadline:
            return body
        assert answer.headers["retry-after"]
        time.sleep(0.2)


def sqs_event(*bodies: str) -> dict[str, Any]:
    """The SQS event fixture, with one message per body (a batch, as the mapping sends it)."""
    template = event_fixture("sqs_job_message.json")["Records"][0]
    records = []
    for n, body in enumerate(bodies):
        record = copy.deepcopy(template)
        record["messageId"] = f"{template['messageId'][:-2]}{n:02d}"
        record["body"] = body
        records.append(record)
    return {"Records": records}


def queued_through_lambda(
    invoke: Any, user: dict[str, str], queue: RecordingQueue, wav: bytes
) -> str:
    started = invoke(
        "upload_record",
        event(
            "http_api_post_json_base64.json",
            path="/records/uploads",
            headers={"authorization": f"Bearer {user['token']}"},
            body=json.dumps({"user": user["id"]}),
        ),
    ).json()
    post = started["upload"]
    requests.post(post["url"], data=post["fields"], files={"file": ("a.wav", wav)}, timeout=60)
    done = invoke(
        "upload_record",
        event(
            "http_api_post_complete_upload.json",
            path=f"/records/uploads/{started['id']}/complete",
            path_parameters={"id": started["id"]},
            query={"user": user["id"]},
            headers={"authorization": f"Bearer {user['token']}"},
        ),
    )
    assert done.status == 202, done.body
    assert queue.sent[-1] == uuid.UUID(started["id"])
    return str(started["id"])


def test_sqs_events_run_the_job_once(
    client: Client, lambda_services: Services, invoke: Any
) -> None:
    """JOB_QUEUE=sqs: completion sends a message; the SQS event runs the job in the handler."""
    queue = RecordingQueue()
    set_services(lambda_services.replace(queue=queue))
    user = client.create_user("Sasha")
    wav = wavgen.wav(seconds=1.0)
    upload_id = queued_through_lambda(invoke, user, queue, wav)
    # The stack's polling worker leaves an SQS job alone: it is still queued.
    time.sleep(1.5)
    assert invoke("upload_record", status_event(upload_id, user)).json()["status"] == "queued"

    message = job_message(uuid.UUID(upload_id))
    assert json.loads(message) == {"upload_id": upload_id}
    assert aws_lambda.handler(sqs_event(message), None) == {"batchItemFailures": []}
    body = invoke("upload_record", status_event(upload_id, user)).json()
    assert body["status"] == "done"
    over_http = client.upload(user, wav).json()
    for key in RECORD_FIELDS:
        assert body["record"][key] == over_http[key], key
    # A duplicate delivery (at least once): acknowledged, and no second record.
    assert aws_lambda.handler(sqs_event(message, message), None) == {"batchItemFailures": []}
    rows = lambda_services.db.execute(
        sql("SELECT count(*) FROM records WHERE id = :id"), {"id": uuid.UUID(body["record"]["id"])}
    )
    assert rows[0][0] == 1


def test_sqs_batch_reports_only_the_jobs_to_deliver_again(
    client: Client, lambda_services: Services, invoke: Any
) -> None:
    queue = RecordingQueue()
    set_services(lambda_services.replace(queue=queue))
    user = client.create_user("Batch")
    held = queued_through_lambda(invoke, user, queue, wavgen.wav(seconds=0.2))
    lambda_services.db.execute(
        sql("UPDATE uploads SET status = 'converting', lease_until = now() + interval '1 hour' "
            "WHERE id = :id"), {"id": uuid.UUID(held)},
    )  # fmt: skip
    bad_wav = queued_through_lambda(invoke, user, queue, b"RIFF" + bytes(100))
    result = aws_lambda.handler(
        sqs_event(
            job_message(uuid.UUID(held)),  # another delivery holds it: deliver again later
            job_message(uuid.UUID(bad_wav)),  # fails for good: acknowledged
            "not json",  # can never be mended: dropped
            job_message(uuid.uuid4()),  # no such upload (erased): acknowledged
        ),
        None,
    )
    first_id = sqs_event("x")["Records"][0]["messageId"]  # the batch's first message
    assert result == {"batchItemFailures": [{"itemIdentifier": first_id}]}
    failed = invoke("upload_record", status_event(bad_wav, user)).json()
    assert failed["status"] == "failed"
    assert failed["error"]["status"] == 415


def test_sqs_queue_sends_the_job_message() -> None:
    """SqsQueue.enqueue is one SendMessage of {"upload_id": ...} to JOB_QUEUE_URL (moto)."""
    with mock_aws():
        sqs = boto3.client("sqs", region_name="us-east-1")
        url = sqs.create_queue(QueueName="record-service-jobs")["QueueUrl"]
        settings = dataclasses.replace(
            Settings.from_env({}), job_queue=JobQueueKind.SQS, job_queue_url=url
        )
        queue = make_queue(settings)
        assert isinstance(queue, SqsQueue)
        upload_id = uuid.uuid4()
        queue.enqueue(upload_id)
        (message,) = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0)["Messages"]
        assert json.loads(message["Body"]) == {"upload_id": str(upload_id)}
        assert parse_job_message(message["Body"]) == upload_id


def test_health_check_through_lambda(invoke: Any) -> None:
    response = invoke("get_record", event("function_url_get_query.json", path="/healthz", query={}))
    assert response.status == 200
    assert response.json() == {"status": "ok"}


def test_origin_header_checked_before_the_real_app(
    lambda_services: Services, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind CloudFront: the real get_record app answers a request with the origin secret
    exactly as it answers one without the check; without the secret nothing reaches it."""
    secret = "origin-secret-of-this-test-0123456789abcdefghijkl"
    user = client.create_user("Olga")
    record = client.upload(user, wavgen.wav(seconds=0.3)).json()
    app = make_handler("get_record", str(ROOT / "functions" / "get_record" / "main.py"))
    monkeypatch.setattr(aws_lambda, "_handler", app)
    settings = dataclasses.replace(lambda_services.settings, origin_verify_secret=secret)
    set_services(lambda_services.replace(settings=settings))
    try:
        ev = event(
            "http_api_get_records.json",
            query={"user": user["id"]},
            headers={"authorization": f"Bearer {user['token']}"},
        )
        direct = parse_response(app(copy.deepcopy(ev), None))
        through_cloudfront = parse_response(
            aws_lambda.handler(
                {**ev, "headers": {**ev["headers"], "x-origin-verify": secret}}, None
            )
        )
        assert through_cloudfront.status == direct.status == 200
        assert through_cloudfront.json() == direct.json()
        assert [r["id"] for r in direct.json()["records"]] == [record["id"]]
        around = parse_response(aws_lambda.handler(copy.deepcopy(ev), None))
        assert around.status == 403
        assert around.json()["type"] == "urn:record-service:problem:origin-not-verified"
    finally:
        set_services(None)


# --- the real Runtime Interface Client ---------------------------------------------------------


def test_entrypoint_chooses_lambda_mode_only_on_lambda() -> None:
    base = {"FUNCTION_TARGET": "upload_record", "PORT": "9090"}
    served = entrypoint.command(base)
    assert served[1:] == ["-m", "common.platform.serve"]  # reads FUNCTION_TARGET and PORT itself
    on_lambda = entrypoint.command({**base, "AWS_LAMBDA_RUNTIME_API": "127.0.0.1:9001"})
    assert on_lambda[1:] == ["-m", "awslambdaric", "common.platform.aws_lambda.handler"]
    with pytest.raises(SystemExit):
        entrypoint.command({"AWS_LAMBDA_RUNTIME_API": "127.0.0.1:9001"})


class FakeRuntimeApi(ThreadingHTTPServer):
    """The Lambda Runtime API (2018-06-01) as the service speaks it: one queued event."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        super().__init__(("127.0.0.1", 0), _RuntimeApiHandler)
        self.daemon_threads = True
        self.events = list(events)
        self.responses: dict[str, Any] = {}
        self.errors: list[str] = []
        self.answered = threading.Event()
        self.closing = threading.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _RuntimeApiHandler(BaseHTTPRequestHandler):
    server: FakeRuntimeApi

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        assert self.path == "/2018-06-01/runtime/invocation/next"
        if not self.server.events:
            self.server.closing.wait(30)  # long poll, as the real API does
            self.send_response(500)
            self.end_headers()
            return
        ev = self.server.events.pop(0)
        body = json.dumps(ev).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Lambda-Runtime-Aws-Request-Id", "req-1")
        self.send_header("Lambda-Runtime-Deadline-Ms", str(int(time.time() * 1000) + 60_000))
        self.send_header(
            "Lambda-Runtime-Invoked-Function-Arn",
            "arn:aws:lambda:us-east-1:123456789012:function:create-user",
        )
        self.send_header("Lambda-Runtime-Trace-Id", "Root=1-6741a8f2-1c2b3d4e5f60718293a4b5c6")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length)
        if self.path.endswith("/response"):
            self.server.responses[self.path.split("/")[-2]] = json.loads(data)
        else:
            self.server.errors.append(f"{self.path}: {data.decode(errors='replace')}")
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.server.answered.set()


def test_runtime_interface_client_serves_function_url_event(stack: NativeStack) -> None:
    api = FakeRuntimeApi([event("function_url_post_json.json", body='{"name": "Lin"}')])
    thread = threading.Thread(target=api.serve_forever, daemon=True)
    thread.start()
    env = {
        **stack.app_env(),
        "AWS_LAMBDA_RUNTIME_API": api.address,
        "FUNCTION_TARGET": "create_user",
        "APP_DIR": str(ROOT),
        "AWS_LAMBDA_FUNCTION_NAME": "create-user",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "1024",
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/create-user",
        "AWS_LAMBDA_LOG_STREAM_NAME": "stream",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "common.platform.entrypoint"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert api.answered.wait(60), "the runtime client never answered"
    finally:
        api.closing.set()
        proc.kill()
        output = proc.communicate()[0].decode(errors="replace")
        api.shutdown()
        api.server_close()
    assert not api.errors, (api.errors, output)
    response = parse_response(api.responses["req-1"])
    assert response.status == 201, output
    body = response.json()
    assert body["name"] == "Lin"
    assert set(body) == {"id", "name", "token"}


# --- the record lifecycle (docs/lifecycle.md) as Lambda events --------------------------------


def test_list_delete_rotate_and_erase_as_http_api_events(
    invoke: Any, client: Client, stack: NativeStack
) -> None:
    user = client.create_user("Lambda")
    auth = {"authorization": f"Bearer {user['token']}"}
    records = [client.upload(user, wavgen.wav(seconds=0.2)).json() for _ in range(2)]
    listed = invoke(
        "get_record", event("http_api_get_records.json", query={"user": user["id"], "limit": "1"},
                            headers=auth),
    )  # fmt: skip
    assert listed.status == 200, listed.body
    page = listed.json()
    assert [r["id"] for r in page["records"]] == [records[1]["id"]]
    assert page["records"][0]["url"].startswith(f"https://{HTTP_API_HOST}/record?id=")
    assert page["next_cursor"]
    forged = invoke(
        "get_record",
        event("http_api_get_records.json", query={"user": user["id"], "cursor": "x.y"},
              headers=auth),
    )  # fmt: skip
    assert forged.status == 422

    target = records[0]
    query = {"id": target["id"], "user": user["id"]}
    deleted = invoke("upload_record", event("http_api_delete_record.json", query=query,
                                            headers=auth))  # fmt: skip
    assert deleted.status == 204, deleted.body
    again = invoke("upload_record", event("http_api_delete_record.json", query=query,
                                          headers=auth))  # fmt: skip
    assert again.status == 404
    # Gone at once for every download mode a Lambda runs in (stream here, redirect below).
    for name in ("function_url_get_query.json", "http_api_get_query.json"):
        assert invoke("get_record", event(name, query=query)).status == 404
    redirect = build_services(stack, download_mode=DownloadMode.REDIRECT)
    set_services(redirect)
    try:
        assert invoke("get_record", event("http_api_get_query.json", query=query)).status == 404
        kept = {"id": records[1]["id"], "user": user["id"]}
        assert invoke("get_record", event("http_api_get_query.json", query=kept)).status == 307
    finally:
        set_services(None)
    set_services(build_services(stack, download_mode=DownloadMode.STREAM))

    path = f"/users/{user['id']}/token"
    rotated = invoke(
        "create_user",
        event("http_api_post_rotate_token.json", path=path,
              path_parameters={"user_id": user["id"]}, headers=auth),
    )  # fmt: skip
    assert rotated.status == 200, rotated.body
    replayed = invoke(
        "create_user",
        event("http_api_post_rotate_token.json", path=path,
              path_parameters={"user_id": user["id"]}, headers=auth),
    )  # fmt: skip
    assert replayed.status == 200 and replayed.json() == rotated.json()
    assert replayed.headers["idempotent-replayed"] == "true"
    new_auth = {"authorization": f"Bearer {rotated.json()['token']}"}
    stale = invoke("get_record", event("http_api_get_records.json",
                                       query={"user": user["id"]}, headers=auth))  # fmt: skip
    assert stale.status == 401

    erase = event("http_api_delete_user.json", path=f"/users/{user['id']}",
                  path_parameters={"user_id": user["id"]}, headers=new_auth)  # fmt: skip
    assert invoke("create_user", erase).status == 204
    assert invoke("create_user", erase).status == 401
    kept_url = client.session.get(records[1]["url"], timeout=30)
    assert kept_url.status_code == 404
    bad = event(
        "http_api_delete_user.json", path="/users/nope", path_parameters={"user_id": "nope"},
        headers=new_auth,
    )  # fmt: skip
    assert invoke("create_user", bad).status == 422
