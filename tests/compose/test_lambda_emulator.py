"""The function images under AWS's Lambda Runtime Interface Emulator, as Lambda runs them.

devstack's lambda-emulator.yaml runs each image's own entry point under the emulator binary
from the aws-sam-cli wheel (devstack.lambda_emulator), with the memory, /tmp size and timeout
of infra/aws/template.yaml, a read-only root, on the compose network with docker-compose.yml's
PostgreSQL and SeaweedFS, and an SQS API (moto) as the job queue. The events are AWS's shapes:
API Gateway HTTP API 2.0 for every route, SQS for a conversion job (the message upload_record
itself sent, received from the queue as the event source mapping would), and the template's
EventBridge Scheduler input for the sweep.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pg8000.native
import pytest
import requests
from botocore.config import Config
from devstack.lambda_events import LambdaResponse, event, event_fixture, parse_response

from devstack import lambda_emulator as rie
from devstack import wavgen

from .conftest import ROOT, Compose, free_port

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]

TEMPLATE = ROOT / "infra" / "aws" / "template.yaml"
FUNCTIONS = ("create_user", "upload_record", "get_record", "sweep")
QUEUE = "record-jobs"
LEASE_SECONDS = 3  # a killed job is taken again this soon
API_HOST = "a1b2c3d4e5.execute-api.us-east-1.amazonaws.com"  # the fixtures' HTTP API


def dotenv() -> dict[str, str]:
    lines = (ROOT / ".env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


@dataclass
class Emulated:
    compose: Compose
    ports: dict[str, int]
    sqs_port: int
    limits: dict[str, rie.Limits]

    def invoke(self, function: str, ev: dict[str, Any], timeout: float = 120) -> Any:
        return rie.invoke(self.ports[function], ev, timeout=timeout).result

    def http(self, function: str, ev: dict[str, Any]) -> LambdaResponse:
        result = self.invoke(function, ev)
        assert "statusCode" in result, result
        return parse_response(result)

    def container(self, function: str) -> str:
        (container,) = self.compose.container_ids(f"lambda_{function}")
        return container

    def sqs(self) -> Any:
        return boto3.client(
            "sqs", endpoint_url=f"http://127.0.0.1:{self.sqs_port}", region_name="us-east-1",
            aws_access_key_id="test", aws_secret_access_key="test",
        )  # fmt: skip

    def s3(self) -> Any:
        env = dotenv()
        return boto3.client(
            "s3", endpoint_url=f"http://127.0.0.1:{self.compose.storage_port}",
            region_name="us-east-1", aws_access_key_id=env["STORAGE_ACCESS_KEY"],
            aws_secret_access_key=env["STORAGE_SECRET_KEY"],
            config=Config(s3={"addressing_style": "path"},
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"),
        )  # fmt: skip

    def sql(self, statement: str, **params: Any) -> list[list[Any]]:
        env = dotenv()
        connection = pg8000.native.Connection(
            env["POSTGRES_USER"], password=env["POSTGRES_PASSWORD"], database=env["POSTGRES_DB"],
            host="127.0.0.1", port=self.compose.postgres_port, timeout=10,
        )  # fmt: skip
        try:
            rows: list[list[Any]] = connection.run(statement, **params)
            return rows
        finally:
            connection.close()


@pytest.fixture(scope="module")
def emulated(compose: Compose) -> Emulated:
    limits = rie.template_limits(TEMPLATE)
    ports = {function: free_port() for function in FUNCTIONS}
    sqs_port = free_port()
    compose.env.update(
        COMPOSE_FILE=f"docker-compose.yml:{rie.OVERRIDE.relative_to(ROOT)}",
        COMPOSE_PROFILES="lambda",
        LAMBDA_RIE=str(rie.rie_binary()),
        SQS_IMAGE=compose.env.get("SQS_IMAGE", "local/s3:moto"),
        SQS_PORT=str(sqs_port),
        LAMBDA_JOB_LEASE_SECONDS=str(LEASE_SECONDS),
        LAMBDA_SWEEP_GRACE_SECONDS="0",
        **{f"LAMBDA_{f.upper()}_PORT": str(port) for f, port in ports.items()},
        **rie.compose_variables(limits),
    )
    compose.run("build", "create_user", "upload_record", "get_record")
    compose.run("up", "-d", "--wait", "postgres", "storage", "sqs")
    emulated = Emulated(compose, ports, sqs_port, limits)
    emulated.sqs().create_queue(QueueName=QUEUE)
    compose.run("up", "-d", *(f"lambda_{f}" for f in FUNCTIONS))  # after migrate and bucket
    for port in ports.values():
        rie.wait_listening(port)
    return emulated


def new_user(emulated: Emulated, name: str) -> dict[str, str]:
    answer = emulated.http(
        "create_user", event("http_api_post_json_base64.json", body=json.dumps({"name": name}))
    )
    assert answer.status == 201, answer.body
    user: dict[str, str] = answer.json()
    return user


def auth(user: dict[str, str]) -> dict[str, str]:
    return {"authorization": f"Bearer {user['token']}"}


def upload_raw(emulated: Emulated, user: dict[str, str], wav: bytes) -> LambdaResponse:
    return emulated.http(
        "upload_record",
        event("http_api_post_raw_wav.json", query={"user": user["id"], "filename": "take.wav"},
              headers=auth(user), body=wav),
    )  # fmt: skip


def test_each_function_runs_with_the_template_limits(emulated: Emulated) -> None:
    for function in FUNCTIONS:
        info = json.loads(emulated.compose.docker("inspect", emulated.container(function)))[0]
        limit = emulated.limits[function]
        host = info["HostConfig"]
        assert host["ReadonlyRootfs"] is True, function
        assert host["Memory"] == limit.memory_mb * 2**20, function
        assert host["Tmpfs"] == {"/tmp": f"size={limit.tmp_mb}m"}, function
        assert info["Config"]["Entrypoint"] == ["/opt/rie/aws-lambda-rie"], function
        assert f"AWS_LAMBDA_FUNCTION_TIMEOUT={limit.timeout_seconds}" in info["Config"]["Env"]
        assert f"FUNCTION_TARGET={function}" in info["Config"]["Env"]
    # upload_record's own setting (1769 MB: a full vCPU for ffmpeg) and /tmp, not a default
    assert emulated.limits["upload_record"] == rie.Limits(1769, 512, 900)


def test_create_upload_download_list_delete_rotate_erase(emulated: Emulated) -> None:
    user = new_user(emulated, "Emulated")
    wav = wavgen.wav(seconds=3.0, channels=2, rate=44100)
    created = upload_raw(emulated, user, wav)
    assert created.status == 201, created.body
    record = created.json()
    assert record["duration_seconds"] == 3.0
    assert record["url"] == f"https://{API_HOST}/record?id={record['id']}&user={user['id']}"
    query = {"id": record["id"], "user": user["id"]}
    redirect = emulated.http("get_record", event("http_api_get_query.json", query=query))
    assert redirect.status == 307, redirect.body
    location = redirect.headers["location"]
    assert urlsplit(location).netloc == f"127.0.0.1:{emulated.compose.storage_port}", location
    mp3 = requests.get(location, timeout=30)
    assert mp3.status_code == 200 and len(mp3.content) == record["size_bytes"]
    assert mp3.content[:3] == b"ID3" or mp3.content[0] == 0xFF

    second = upload_raw(emulated, user, wavgen.wav(seconds=0.5)).json()
    listed = emulated.http(
        "get_record",
        event("http_api_get_records.json", query={"user": user["id"], "limit": "1"},
              headers=auth(user)),
    )  # fmt: skip
    assert listed.status == 200, listed.body
    assert [r["id"] for r in listed.json()["records"]] == [second["id"]]
    assert listed.json()["next_cursor"]

    deleted = emulated.http(
        "upload_record", event("http_api_delete_record.json", query=query, headers=auth(user))
    )
    assert deleted.status == 204, deleted.body
    gone = emulated.http("get_record", event("http_api_get_query.json", query=query))
    assert gone.status == 404

    path = f"/users/{user['id']}/token"
    rotated = emulated.http(
        "create_user",
        event("http_api_post_rotate_token.json", path=path,
              path_parameters={"user_id": user["id"]}, headers=auth(user)),
    )  # fmt: skip
    assert rotated.status == 200, rotated.body
    fresh = {"id": user["id"], "token": rotated.json()["token"]}
    stale = emulated.http(
        "get_record", event("http_api_get_records.json", query={"user": user["id"]},
                            headers=auth(user)),
    )  # fmt: skip
    assert stale.status == 401

    erase = event("http_api_delete_user.json", path=f"/users/{user['id']}",
                  path_parameters={"user_id": user["id"]}, headers=auth(fresh))  # fmt: skip
    assert emulated.http("create_user", erase).status == 204
    kept = {"id": second["id"], "user": user["id"]}
    assert emulated.http("get_record", event("http_api_get_query.json", query=kept)).status == 404
    assert emulated.http("create_user", erase).status == 401
    left = emulated.s3().list_objects_v2(Bucket="records", Prefix=f"users/{user['id']}/")
    assert left.get("KeyCount", 0) == 0


def test_a_body_over_the_limit_gets_a_problem_pointing_to_the_direct_upload(
    emulated: Emulated,
) -> None:
    """MAX_UPLOAD_BYTES (4 MiB, the template's) keeps a base64 event under Lambda's 6 MB;
    a body over it is refused with a problem that names the direct upload."""
    user = new_user(emulated, "Too big")
    limit = int(emulated.compose.service_env("lambda_upload_record")["MAX_UPLOAD_BYTES"])
    # Over the limit by 100 kB, and still under 6 MB once base64-encoded into the event.
    over = wavgen.wav(seconds=(limit + 100_000) / (44100 * 4), channels=2, rate=44100)
    refused = upload_raw(emulated, user, over)
    assert refused.status == 413, refused.body
    assert refused.headers["content-type"] == "application/problem+json"
    problem = refused.json()
    assert str(limit) in problem["detail"]
    assert "POST /records/uploads" in problem["detail"]
    # What the limit is for: the same WAV just under it fits in one Lambda invocation.
    fits = wavgen.wav(seconds=limit / (44100 * 4) - 0.1, channels=2, rate=44100)
    assert len(fits) <= limit
    ev = event("http_api_post_raw_wav.json", query={"user": user["id"]}, headers=auth(user),
               body=fits)  # fmt: skip
    assert len(json.dumps(ev)) < 6 * 1000 * 1000
    assert upload_raw(emulated, user, fits).status == 201


def sqs_delivery(emulated: Emulated, wait: float = 20) -> dict[str, Any]:
    """The next job message on the queue, as the SQS event source mapping hands it over."""
    client = emulated.sqs()
    url = client.get_queue_url(QueueName=QUEUE)["QueueUrl"]
    got = client.receive_message(
        QueueUrl=url, MaxNumberOfMessages=1, WaitTimeSeconds=int(wait),
        MessageSystemAttributeNames=["All"], VisibilityTimeout=1,
    )  # fmt: skip
    assert got.get("Messages"), "upload_record sent no job message"
    (message,) = got["Messages"]
    record = event_fixture("sqs_job_message.json")["Records"][0]
    record.update(
        messageId=message["MessageId"], receiptHandle=message["ReceiptHandle"],
        body=message["Body"], md5OfBody=message["MD5OfBody"],
        attributes={**record["attributes"], **message.get("Attributes", {})},
        eventSourceARN=f"arn:aws:sqs:us-east-1:123456789012:{QUEUE}",
    )  # fmt: skip
    return {"Records": [record]}


def acknowledge(emulated: Emulated, delivery: dict[str, Any]) -> None:
    client = emulated.sqs()
    url = client.get_queue_url(QueueName=QUEUE)["QueueUrl"]
    for record in delivery["Records"]:
        client.delete_message(QueueUrl=url, ReceiptHandle=record["receiptHandle"])


def direct_upload(emulated: Emulated, user: dict[str, str], wav: bytes) -> str:
    """Presign, send the WAV to the bucket, complete: the upload id (its job is queued)."""
    started = emulated.http(
        "upload_record",
        event("http_api_post_json_base64.json", path="/records/uploads", headers=auth(user),
              body=json.dumps({"user": user["id"], "filename": "direct.wav"})),
    )  # fmt: skip
    assert started.status == 201, started.body
    upload = started.json()
    post = upload["upload"]
    sent = requests.post(post["url"], data=post["fields"],
                         files={post["file_field"]: ("direct.wav", wav)}, timeout=120)  # fmt: skip
    assert sent.status_code in (200, 201, 204), sent.text
    done = emulated.http(
        "upload_record",
        event("http_api_post_complete_upload.json",
              path=f"/records/uploads/{upload['id']}/complete",
              path_parameters={"id": upload["id"]}, query={"user": user["id"]},
              headers=auth(user)),
    )  # fmt: skip
    assert done.status == 202, done.body
    upload_id: str = upload["id"]
    return upload_id


def job_status(emulated: Emulated, user: dict[str, str], upload_id: str) -> dict[str, Any]:
    answer = emulated.http(
        "upload_record",
        event("http_api_get_query.json", path=f"/records/uploads/{upload_id}",
              query={"user": user["id"]}, headers=auth(user)),
    )  # fmt: skip
    assert answer.status == 200, answer.body
    body: dict[str, Any] = answer.json()
    return body


def test_direct_upload_and_its_sqs_job(emulated: Emulated) -> None:
    user = new_user(emulated, "Direct")
    upload_id = direct_upload(emulated, user, wavgen.wav(seconds=2.0, rate=48000))
    delivery = sqs_delivery(emulated)
    assert json.loads(delivery["Records"][0]["body"]) == {"upload_id": upload_id}
    assert emulated.invoke("upload_record", delivery) == {"batchItemFailures": []}
    acknowledge(emulated, delivery)
    status = job_status(emulated, user, upload_id)
    assert status["status"] == "done", status
    record = status["record"]
    assert record["duration_seconds"] == 2.0
    query = parse_qs(urlsplit(record["url"]).query)
    redirect = emulated.http(
        "get_record", event("http_api_get_query.json",
                            query={"id": query["id"][0], "user": user["id"]}),
    )  # fmt: skip
    assert redirect.status == 307
    assert requests.get(redirect.headers["location"], timeout=30).status_code == 200
    # A second delivery of the same message (SQS is at least once) makes nothing new.
    assert emulated.invoke("upload_record", delivery) == {"batchItemFailures": []}
    assert records_of(emulated, user) == 1


def records_of(emulated: Emulated, user: dict[str, str]) -> int:
    ((count,),) = emulated.sql(
        "SELECT count(*) FROM records WHERE user_id = CAST(:u AS uuid)", u=user["id"]
    )
    return int(count)


def test_a_job_whose_function_is_killed_mid_conversion_ends_in_one_record(
    emulated: Emulated,
) -> None:
    user = new_user(emulated, "Killed")
    upload_id = direct_upload(emulated, user, wavgen.wav(seconds=240.0, channels=2, rate=44100))
    delivery = sqs_delivery(emulated)
    answers: list[Any] = []

    def run() -> None:
        try:
            answers.append(emulated.invoke("upload_record", delivery, timeout=600))
        except OSError as exc:  # the environment died under the invocation
            answers.append(exc)

    invocation = threading.Thread(target=run)
    invocation.start()
    deadline = time.monotonic() + 120
    while True:
        ((status, progress),) = emulated.sql(
            "SELECT status, progress FROM uploads WHERE id = CAST(:id AS uuid)", id=upload_id
        )
        if status == "converting" and progress > 0:
            break
        assert status in ("queued", "converting") and time.monotonic() < deadline, status
        time.sleep(0.05)
    emulated.compose.docker("kill", "-s", "KILL", emulated.container("upload_record"))
    invocation.join(timeout=60)
    assert answers and not isinstance(answers[0], dict), answers  # it never finished
    assert records_of(emulated, user) == 0
    # A new execution environment; SQS delivers the message again after its visibility timeout.
    emulated.compose.run("up", "-d", "lambda_upload_record")
    rie.wait_listening(emulated.ports["upload_record"])
    redelivered = sqs_delivery(emulated)
    assert redelivered["Records"][0]["body"] == delivery["Records"][0]["body"]
    deadline = time.monotonic() + 120
    while True:  # BUSY (batchItemFailures) until the dead environment's lease runs out
        result = emulated.invoke("upload_record", redelivered, timeout=600)
        if result == {"batchItemFailures": []}:
            break
        assert result["batchItemFailures"], result
        assert time.monotonic() < deadline, "the job was never taken again"
        time.sleep(1)
    acknowledge(emulated, redelivered)
    status = job_status(emulated, user, upload_id)
    assert status["status"] == "done", status
    assert records_of(emulated, user) == 1
    ((attempts,),) = emulated.sql(
        "SELECT attempts FROM uploads WHERE id = CAST(:id AS uuid)", id=upload_id
    )
    assert attempts == 2


def test_the_scheduled_sweep_runs_with_the_templates_input(emulated: Emulated) -> None:
    """EventBridge Scheduler invokes the sweep with the target's Input (the template's)."""
    schedule = rie._tagless_yaml(TEMPLATE.read_text())["Resources"]["SweepScheduleRule"]
    scheduled = json.loads(schedule["Properties"]["Target"]["Input"])
    orphan = f"users/{uuid.uuid4()}/records/{uuid.uuid4()}.mp3"  # an object without a row
    s3 = emulated.s3()
    s3.put_object(Bucket="records", Key=orphan, Body=b"\xff\xfb" + b"\0" * 100)
    time.sleep(1.1)  # older than the grace period (0 s here) by the store's clock
    assert emulated.invoke("sweep", scheduled) == {"target": "sweep", "status": "done"}
    assert s3.list_objects_v2(Bucket="records", Prefix=orphan).get("KeyCount", 0) == 0
