"""``POST /_tasks/convert``: a conversion job pushed by Cloud Tasks to upload_record on Cloud Run.

The body is ``{"upload_id": "<uuid>"}``. Only an OIDC token signed by Google for
``TASKS_SERVICE_ACCOUNT`` with the audience ``TASKS_AUDIENCE`` is accepted (none or a bad one:
401; another account's: 403): the router never routes ``/_tasks/``, but Cloud Run would, so the
token is what keeps the route closed. Any 2xx tells Cloud Tasks the task is finished; anything
else makes it retry with backoff. docs/direct-uploads.md, "Jobs", has the queue's rules.
"""

from __future__ import annotations

import logging
import uuid

from werkzeug.wrappers import Request

from common.adapters.oidc import (
    CertsUnavailable,
    InvalidToken,
    WrongIdentity,
    verify_service_account_token,
)
from common.adapters.queue import parse_job_message
from common.errors import (
    DependencyUnavailable,
    Forbidden,
    InvalidField,
    Unauthorized,
)
from common.http.auth import bearer_token
from common.settings import Settings

log = logging.getLogger(__name__)

MAX_TASK_BODY = 4096


def pushed_job(request: Request, settings: Settings) -> uuid.UUID:
    """The upload id of an authenticated Cloud Tasks push; 401/403 for anyone else."""
    audience = settings.tasks_audience or settings.tasks_target_url
    account = settings.tasks_service_account
    token = bearer_token(request.headers.get("Authorization"))
    if not token:
        raise Unauthorized("A Cloud Tasks OIDC token is required.")
    if not (audience and account):  # not configured for Cloud Tasks: nobody may push
        raise Forbidden("This service does not accept pushed tasks.")
    try:
        verify_service_account_token(
            token, audience=audience, service_account=account, certs_url=settings.tasks_certs_url
        )
    except InvalidToken as exc:
        log.warning("task push with an invalid token: %s", exc)
        raise Unauthorized("The OIDC token is not valid for this service.") from exc
    except WrongIdentity as exc:
        log.warning("task push signed by another account: %s", exc)
        raise Forbidden("The OIDC token is not the task queue's service account's.") from exc
    except CertsUnavailable as exc:
        raise DependencyUnavailable("token verifier", settings.retry_after_seconds) from exc
    body = request.stream.read(MAX_TASK_BODY + 1)
    try:
        if len(body) > MAX_TASK_BODY:
            raise ValueError("too long")
        upload_id = parse_job_message(body)
    except ValueError as exc:
        raise InvalidField('A task body is {"upload_id": "<uuid>"}.') from exc
    log.info(
        "conversion task received",
        extra={
            "upload_id": str(upload_id),
            "task": request.headers.get("X-CloudTasks-TaskName"),
            "queue": request.headers.get("X-CloudTasks-QueueName"),
            "retry_count": request.headers.get("X-CloudTasks-TaskRetryCount"),
        },
    )
    return upload_id
