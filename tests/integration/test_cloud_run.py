"""Cloud Run: JSON logs with Cloud Logging's trace fields, Postgres over a unix socket (as the
Cloud SQL connector mounts it), and the container entry point serving on $PORT quickly.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator

import flask
import flask.testing
import pytest
import requests
from common.adapters.db import Database, sql
from common.adapters.queue import CloudTasksQueue
from common.domain import uploads
from common.errors import DependencyUnavailable
from common.http.jobs import presigned_upload_body
from common.platform.runtime import Services, set_services
from common.settings import JobQueueKind, Settings

from devstack import NativeStack, free_port, wavgen
from tests.support import ROOT, Client
from tests.support.stack_clients import RecordingQueue, build_services

TRACE_ID = "105445aa7843bc8bf206b12000100000"
PROJECT = "records-prod"


def test_postgres_over_its_unix_socket(stack: NativeStack) -> None:
    """The stack's PostgreSQL also listens on a socket, as Cloud SQL's does under /cloudsql."""
    password = stack.credentials()["db_password"]
    sock_dir = stack.data_dir / "pg-socket"
    for url in (
        f"postgresql://records:{password}@/records?unix_sock={sock_dir}/.s.PGSQL.{stack.ports.postgres}",
        f"postgresql://records:{password}@:{stack.ports.postgres}/records?host={sock_dir}",
    ):
        db = Database.from_settings(Settings.from_env({"DATABASE_URL": url}))
        try:
            db.check()
        finally:
            db.dispose()


def test_container_entrypoint_serves_on_port_and_starts_fast(stack: NativeStack) -> None:
    """`python -m common.platform.entrypoint` (the image's ENTRYPOINT) as Cloud Run runs it."""
    port = free_port()
    env = {
        **stack.app_env(),
        "PORT": str(port),
        "FUNCTION_TARGET": "get_record",
        "APP_DIR": str(ROOT),
        "K_SERVICE": "get-record",
        "GOOGLE_CLOUD_PROJECT": PROJECT,
    }
    env.pop("AWS_LAMBDA_RUNTIME_API", None)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "common.platform.entrypoint"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        ready = None
        while time.monotonic() - started < 30 and proc.poll() is None:
            try:
                with urllib.request.urlopen(
                    urllib.request.Request(
                        f"http://127.0.0.1:{port}/record?id=x&user=y",
                        headers={"X-Cloud-Trace-Context": f"{TRACE_ID}/5;o=1"},
                    ),
                    timeout=5,
                ):
                    pass
            except urllib.error.HTTPError as exc:
                ready = exc.code
                break
            except OSError:
                time.sleep(0.05)
        elapsed = time.monotonic() - started
    finally:
        proc.terminate()
        stderr = proc.communicate(timeout=20)[1].decode(errors="replace")
    assert ready == 422, stderr  # the function answered (a bad id): it is serving on $PORT
    assert elapsed < 10, f"first answer after {elapsed:.1f}s"
    # Its log line for that request is JSON with the request's trace.
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    traced = [line for line in lines if "logging.googleapis.com/trace" in line]
    assert traced, stderr
    assert traced[0]["logging.googleapis.com/trace"] == f"projects/{PROJECT}/traces/{TRACE_ID}"
    assert traced[0]["severity"] == "INFO"
    print(f"\nentrypoint: first answer on $PORT after {elapsed:.2f}s")
    assert os.environ.get("AWS_LAMBDA_RUNTIME_API") is None


# --- Cloud Tasks: the job pushed to upload_record with an OIDC token -------------------------

TASKS_ACCOUNT = "record-tasks@records-prod.iam.gserviceaccount.com"
TASKS_URL = "https://upload-record-abc123-ew.a.run.app/_tasks/convert"
TASKS_QUEUE = "projects/records-prod/locations/europe-west1/queues/record-jobs"


class Google:
    """Google's signing side, locally: an RSA key, its certificate served as Google serves
    https://www.googleapis.com/oauth2/v1/certs ({key id: PEM}), and ID tokens signed with it."""

    def __init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-google")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256())
        )  # fmt: skip
        self.key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        certs = {"test-key-1": cert.public_bytes(serialization.Encoding.PEM).decode()}
        body = json.dumps(certs).encode()

        class Certs(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Certs)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.certs_url = f"http://127.0.0.1:{self.server.server_address[1]}/oauth2/v1/certs"

    def token(self, **claims: object) -> str:
        from google.auth import crypt, jwt

        now = int(time.time())
        payload: dict[str, object] = {
            "iss": "https://accounts.google.com", "aud": TASKS_URL, "azp": "1234567890",
            "sub": "1234567890", "email": TASKS_ACCOUNT, "email_verified": True,
            "iat": now, "exp": now + 3600,
        }  # fmt: skip
        payload.update(claims)
        signer = crypt.RSASigner.from_string(self.key_pem, key_id="test-key-1")  # type: ignore[no-untyped-call]
        encoded: bytes = jwt.encode(signer, payload)  # type: ignore[no-untyped-call]
        return encoded.decode()


@pytest.fixture(scope="module")
def google() -> Iterator[Google]:
    fake = Google()
    yield fake
    fake.server.shutdown()


@pytest.fixture
def tasks_app(
    stack: NativeStack, google: Google
) -> Iterator[tuple[flask.testing.FlaskClient, Services]]:
    services = build_services(
        stack,
        job_queue=JobQueueKind.CLOUD_TASKS,
        cloud_tasks_queue=TASKS_QUEUE,
        tasks_target_url=TASKS_URL,
        tasks_service_account=TASKS_ACCOUNT,
        tasks_certs_url=google.certs_url,
    )
    services = services.replace(queue=RecordingQueue(JobQueueKind.CLOUD_TASKS))
    set_services(services)
    import functions_framework

    app = functions_framework.create_app(  # type: ignore[no-untyped-call]
        "upload_record", str(ROOT / "functions" / "upload_record" / "main.py")
    )
    yield app.test_client(), services
    set_services(None)


def task_headers(token: str | None, retry: int = 0) -> dict[str, str]:
    """What Cloud Tasks sends with an HTTP task (and Cloud Run passes on)."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Google-Cloud-Tasks",
        "X-CloudTasks-QueueName": "record-jobs",
        "X-CloudTasks-TaskName": "0f0e0d0c-0b0a-4909-8807-060504030201",
        "X-CloudTasks-TaskRetryCount": str(retry),
        "X-CloudTasks-TaskExecutionCount": str(retry),
        "X-CloudTasks-TaskETA": f"{time.time():.6f}",
    }
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def queued_for_tasks(client: Client, services: Services, wav: bytes) -> tuple[str, dict[str, str]]:
    user = client.create_user("Tasha")
    started = uploads.start_upload(services.db, services.storage, services.settings,
                                   user_id=uuid.UUID(user["id"]), filename="t.wav")  # fmt: skip
    body = presigned_upload_body(started, client.base_url)["upload"]
    requests.post(body["url"], data=body["fields"], files={"file": ("t.wav", wav)}, timeout=60)
    completion = uploads.complete_upload(
        services.db, services.storage, services.queue, services.settings,
        user_id=uuid.UUID(user["id"]), raw_upload_id=str(started.id),
    )  # fmt: skip
    assert completion.won
    return str(started.id), user


def test_cloud_tasks_push_runs_the_job(
    tasks_app: tuple[flask.testing.FlaskClient, Services], client: Client, google: Google
) -> None:
    app, services = tasks_app
    upload_id, user = queued_for_tasks(client, services, wavgen.wav(seconds=1.0))
    body = json.dumps({"upload_id": upload_id})
    pushed = app.post("/_tasks/convert", data=body, headers=task_headers(google.token()))
    assert pushed.status_code == 200, pushed.get_data(as_text=True)
    assert pushed.get_json() == {"upload_id": upload_id, "outcome": "done"}
    job = uploads.upload_status(services.db, services.settings, user_id=uuid.UUID(user["id"]),
                                raw_upload_id=upload_id)  # fmt: skip
    assert job.status == "done" and job.record is not None
    # Cloud Tasks retrying a task that had in fact finished: acknowledged, no second record.
    again = app.post("/_tasks/convert", data=body, headers=task_headers(google.token(), retry=1))
    assert again.status_code == 200
    assert again.get_json()["outcome"] == "skipped"
    rows = services.db.execute(
        sql("SELECT count(*) FROM records WHERE user_id = :u"), {"u": uuid.UUID(user["id"])}
    )
    assert rows[0][0] == 1


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", 401),
        ("not-a-jwt", 401),
        ("other-audience", 401),
        ("expired", 401),
        ("other-issuer", 401),
        ("other-key", 401),
        ("other-account", 403),
        ("unverified-email", 403),
    ],
)
def test_cloud_tasks_push_needs_the_queues_oidc_token(
    tasks_app: tuple[flask.testing.FlaskClient, Services], google: Google, case: str,
    expected: int,
) -> None:  # fmt: skip
    app, _ = tasks_app
    now = int(time.time())
    makers: dict[str, Callable[[], str | None]] = {
        "missing": lambda: None,
        "not-a-jwt": lambda: "abc.def.ghi",
        "other-audience": lambda: google.token(aud="https://elsewhere.example/_tasks/convert"),
        "expired": lambda: google.token(iat=now - 7200, exp=now - 3600),
        "other-issuer": lambda: google.token(iss="https://evil.example"),
        "other-key": lambda: Google().token(),
        "other-account": lambda: google.token(email="someone@example.com"),
        "unverified-email": lambda: google.token(email_verified=False),
    }
    token = makers[case]()
    body = json.dumps({"upload_id": str(uuid.uuid4())})
    pushed = app.post("/_tasks/convert", data=body, headers=task_headers(token))
    assert pushed.status_code == expected, pushed.get_data(as_text=True)
    assert pushed.headers["Content-Type"] == "application/problem+json"


def test_cloud_tasks_push_bad_bodies(
    tasks_app: tuple[flask.testing.FlaskClient, Services], google: Google
) -> None:
    app, _ = tasks_app
    for body in ("", "[]", '{"upload_id": "nope"}', "x" * 5000):
        pushed = app.post("/_tasks/convert", data=body, headers=task_headers(google.token()))
        assert pushed.status_code == 422, body[:20]
    assert app.get("/_tasks/convert", headers=task_headers(google.token())).status_code == 405


def test_cloud_tasks_queue_creates_a_named_http_task_with_oidc() -> None:
    """CloudTasksQueue.enqueue: the REST call Cloud Tasks documents (projects.locations.queues
    .tasks.create), against a local stand-in; ALREADY_EXISTS (a retried enqueue) is fine."""
    seen: list[tuple[str, dict[str, object]]] = []
    answers = [200, 409, 503]

    class Api(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            seen.append((self.path, json.loads(self.rfile.read(length))))
            self.send_response(answers.pop(0))
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = dataclasses.replace(
            Settings.from_env({}), job_queue=JobQueueKind.CLOUD_TASKS,
            cloud_tasks_queue=TASKS_QUEUE, tasks_target_url=TASKS_URL,
            tasks_service_account=TASKS_ACCOUNT,
        )  # fmt: skip
        import urllib3

        queue = CloudTasksQueue(
            settings, urllib3.PoolManager(), api_root=f"http://127.0.0.1:{server.server_address[1]}"
        )
        upload_id = uuid.uuid4()
        queue.enqueue(upload_id)
        queue.enqueue(upload_id)  # 409: the first try had landed
        with pytest.raises(DependencyUnavailable):
            queue.enqueue(upload_id)
    finally:
        server.shutdown()
    path, body = seen[0]
    assert path == f"/v2/{TASKS_QUEUE}/tasks"
    task = body["task"]
    assert isinstance(task, dict)
    assert task["name"].startswith(f"{TASKS_QUEUE}/tasks/{upload_id}-")
    assert task["dispatchDeadline"] == "1800s"
    request = task["httpRequest"]
    assert request["url"] == TASKS_URL and request["httpMethod"] == "POST"
    assert request["oidcToken"] == {"serviceAccountEmail": TASKS_ACCOUNT, "audience": TASKS_URL}
    assert json.loads(base64.b64decode(request["body"])) == {"upload_id": str(upload_id)}


def test_a_job_sent_again_within_the_hour_is_delivered() -> None:
    """Cloud Tasks refuses (409) a task name used in the last hour, even by a task that ran;
    a stand-in that enforces that rule still gets a second task for the same upload."""
    names: list[str] = []

    class Api(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            name = json.loads(self.rfile.read(length))["task"]["name"]
            fresh = name not in names  # a name seen within the hour: ALREADY_EXISTS, no task
            names.append(name)
            self.send_response(200 if fresh else 409)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = dataclasses.replace(
            Settings.from_env({}), job_queue=JobQueueKind.CLOUD_TASKS,
            cloud_tasks_queue=TASKS_QUEUE, tasks_target_url=TASKS_URL,
            tasks_service_account=TASKS_ACCOUNT,
        )  # fmt: skip
        import urllib3

        queue = CloudTasksQueue(
            settings, urllib3.PoolManager(), api_root=f"http://127.0.0.1:{server.server_address[1]}"
        )
        upload_id = uuid.uuid4()
        queue.enqueue(upload_id)  # completed, the task ran
        queue.enqueue(upload_id)  # the sweep sends the stalled job again, minutes later
    finally:
        server.shutdown()
    assert len(names) == 2 and len(set(names)) == 2  # two tasks created, none refused
