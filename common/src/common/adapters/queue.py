"""Where a conversion job goes once its upload is completed: one adapter per platform's queue.

Every queue carries ``{"upload_id": "<uuid>"}``; the job's state is its ``uploads`` row, so a
message delivered twice is harmless. ``postgres`` (make dev, compose): the row is the queue
entry, polled by ``python -m common.platform.worker``. ``sqs`` (AWS): ``SendMessage`` to
``JOB_QUEUE_URL``. ``cloudtasks`` (Cloud Run): an HTTP task with an OIDC token, created through
the REST API (no gRPC client, which would outweigh the rest of the image's Python), with a new
name per enqueue (Cloud Tasks keeps a name taken for an hour). docs/direct-uploads.md, "Jobs".
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import uuid
from typing import TYPE_CHECKING, Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from common.errors import DependencyUnavailable
from common.settings import JobQueueKind, Settings, SettingsError

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

log = logging.getLogger(__name__)

CLOUD_TASKS_API = "https://cloudtasks.googleapis.com"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
# Cloud Tasks' largest dispatch deadline for HTTP targets.
TASK_DISPATCH_DEADLINE_SECONDS = 1800


def job_message(upload_id: uuid.UUID) -> str:
    return json.dumps({"upload_id": str(upload_id)})


def parse_job_message(body: str | bytes) -> uuid.UUID:
    """The upload id of a job message; ValueError for anything else."""
    try:
        data = json.loads(body)
    except RecursionError as exc:  # nesting deeper than the parser's recursion
        raise ValueError("a job message is a flat JSON object") from exc
    if not isinstance(data, dict) or not isinstance(data.get("upload_id"), str):
        raise ValueError('a job message is {"upload_id": "<uuid>"}')
    return uuid.UUID(data["upload_id"])


class JobQueue(Protocol):
    kind: JobQueueKind

    def enqueue(self, upload_id: uuid.UUID) -> None: ...


class PostgresQueue:
    """The uploads row set to ``queued`` is the queue entry: nothing to send."""

    kind = JobQueueKind.POSTGRES

    def enqueue(self, upload_id: uuid.UUID) -> None:
        return None


class SqsQueue:
    kind = JobQueueKind.SQS

    def __init__(self, settings: Settings, client: SQSClient | None = None) -> None:
        self.settings = settings
        self._client = client
        self._lock = threading.Lock()

    @property
    def client(self) -> SQSClient:
        with self._lock:
            if self._client is None:
                import botocore.session

                made: SQSClient = botocore.session.get_session().create_client(  # type: ignore[assignment]
                    "sqs", region_name=self.settings.s3_region
                )
                self._client = made
            return self._client

    def enqueue(self, upload_id: uuid.UUID) -> None:
        url = self.settings.job_queue_url
        if not url:
            raise SettingsError("JOB_QUEUE=sqs needs JOB_QUEUE_URL (the SQS queue's URL)")
        try:
            self.client.send_message(QueueUrl=url, MessageBody=job_message(upload_id))
        except (BotoCoreError, ClientError) as exc:
            log.error("could not queue a conversion job: %s", exc)
            raise DependencyUnavailable("job queue", self.settings.retry_after_seconds) from exc


class CloudTasksQueue:
    kind = JobQueueKind.CLOUD_TASKS

    def __init__(
        self, settings: Settings, http: Any = None, *, api_root: str = CLOUD_TASKS_API
    ) -> None:
        self.settings = settings
        self.api_root = api_root.rstrip("/")
        self._http = http
        self._lock = threading.Lock()

    @property
    def http(self) -> Any:
        """An urllib3 pool that adds the function's own access token (metadata server)."""
        with self._lock:
            if self._http is None:
                import google.auth
                from google.auth.transport.urllib3 import AuthorizedHttp

                credentials, _project = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
                self._http = AuthorizedHttp(credentials)  # type: ignore[no-untyped-call]
            return self._http

    def task(self, upload_id: uuid.UUID) -> dict[str, Any]:
        s = self.settings
        if not (s.cloud_tasks_queue and s.tasks_target_url and s.tasks_service_account):
            raise SettingsError(
                "JOB_QUEUE=cloudtasks needs CLOUD_TASKS_QUEUE, TASKS_TARGET_URL and "
                "TASKS_SERVICE_ACCOUNT"
            )
        body = base64.b64encode(job_message(upload_id).encode()).decode("ascii")
        return {
            # A name per enqueue: Cloud Tasks refuses a name used in the last hour (even by a
            # task that ran or was deleted), so a job sent again (the sweep, a completion
            # after an unqueue) needs a new one. A duplicate delivery is harmless: the row is
            # the job, and a second delivery finds it claimed or finished.
            "name": f"{s.cloud_tasks_queue}/tasks/{upload_id}-{uuid.uuid4().hex}",
            "dispatchDeadline": f"{TASK_DISPATCH_DEADLINE_SECONDS}s",
            "httpRequest": {
                "url": s.tasks_target_url,
                "httpMethod": "POST",
                "headers": {"Content-Type": "application/json"},
                "body": body,
                "oidcToken": {
                    "serviceAccountEmail": s.tasks_service_account,
                    "audience": s.tasks_audience or s.tasks_target_url,
                },
            },
        }

    def enqueue(self, upload_id: uuid.UUID) -> None:
        task = self.task(upload_id)
        url = f"{self.api_root}/v2/{self.settings.cloud_tasks_queue}/tasks"
        retry_after = self.settings.retry_after_seconds
        try:
            response = self.http.request(
                "POST",
                url,
                body=json.dumps({"task": task}).encode(),
                headers={"Content-Type": "application/json"},
                timeout=10.0,
            )
        except Exception as exc:  # urllib3 and google-auth transport errors alike
            log.error("could not reach Cloud Tasks: %s", exc)
            raise DependencyUnavailable("job queue", retry_after) from exc
        if response.status == 409:  # ALREADY_EXISTS: an earlier try of this enqueue landed
            return
        if response.status != 200:
            detail = response.data[:500].decode("utf-8", "replace")
            log.error(
                "Cloud Tasks refused the task", extra={"status": response.status, "body": detail}
            )
            raise DependencyUnavailable("job queue", retry_after)


def make_queue(settings: Settings) -> JobQueue:
    if settings.job_queue is JobQueueKind.SQS:
        return SqsQueue(settings)
    if settings.job_queue is JobQueueKind.CLOUD_TASKS:
        return CloudTasksQueue(settings)
    return PostgresQueue()
