"""In-process clients for the native stack's servers, with settings overridden per test."""

from __future__ import annotations

import dataclasses
import os
import uuid
from typing import Any

from common.platform.runtime import Services
from common.settings import JobQueueKind, Settings

from devstack import NativeStack


class RecordingQueue:
    """A cloud job queue without the cloud: what would be sent is kept for the test to deliver
    (the stack's own worker polls only the Postgres queue, so it never sees these jobs)."""

    def __init__(self, kind: JobQueueKind = JobQueueKind.SQS) -> None:
        self.kind = kind
        self.sent: list[uuid.UUID] = []

    def enqueue(self, upload_id: uuid.UUID) -> None:
        self.sent.append(upload_id)


_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def build_services(stack: NativeStack, **overrides: Any) -> Services:
    """Clients for the stack's Postgres and SeaweedFS; S3 credentials from the stack's env.

    boto3 reads the credentials when a client is created, so they are put in the process
    environment only for that moment.
    """
    env = stack.app_env()
    saved = {k: os.environ.get(k) for k in _CREDENTIALS}
    os.environ.update({k: env[k] for k in _CREDENTIALS})
    try:
        settings = dataclasses.replace(Settings.from_env(env), **overrides)
        return Services.from_settings(settings)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
