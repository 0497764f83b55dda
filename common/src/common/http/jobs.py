"""The HTTP side of conversion jobs: ``Prefer: wait`` and the answers of completion and status.

Completion answers (the one promise: never two records for one upload):

* the call that queued the job: ``202`` + ``Location: /records/uploads/<id>`` and the status
  body, or, with ``Prefer: wait=N`` and the job finished within N seconds, ``201`` + the
  record (or the job's problem, if it failed);
* any other call: ``409`` + ``Retry-After`` + ``Location`` while queued or converting, ``200``
  + the record once done, the stored problem document once failed.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from werkzeug.wrappers import Request, Response

from common.domain.uploads import Completion, JobStatus, PresignedUpload
from common.errors import ConversionInProgress, NotFound, StoredProblem
from common.http.record_response import record_body, record_created_response
from common.http.request_body import FILE_FIELD
from common.http.responses import json_response, public_base_url
from common.http.routes import upload_path
from common.settings import Settings

# Seconds a client polling a queued or converting job is asked to wait between looks.
POLL_RETRY_AFTER_SECONDS = 1
# RFC 7240: preference = token [ BWS "=" BWS word ] *( OWS ";" [ OWS parameter ] )
_WAIT = re.compile(r"^\s*wait\s*=\s*\"?([0-9]{1,9})\"?\s*$", re.IGNORECASE)


def preferred_wait(request: Request, settings: Settings) -> int:
    """Seconds of ``Prefer: wait=N`` (RFC 7240), clamped to JOB_WAIT_MAX_SECONDS; else 0.

    Preferences that cannot be parsed are ignored, as the RFC asks; of several ``wait``
    preferences the first counts.
    """
    for header in request.headers.getlist("Prefer"):
        for preference in header.split(","):
            match = _WAIT.match(preference.split(";", 1)[0])
            if match:
                return min(int(match.group(1)), settings.job_wait_max_seconds)
    return 0


def presigned_upload_body(upload: PresignedUpload, base_url: str) -> dict[str, Any]:
    """The answer to ``POST /records/uploads``: the form to send the WAV with, and what next."""
    status_url = f"{base_url}{upload_path(upload.id)}"
    return {
        "id": str(upload.id),
        "upload": {
            "method": "POST",
            "url": upload.url,
            "fields": upload.fields,
            "file_field": FILE_FIELD,
            "enctype": "multipart/form-data",
        },
        "max_bytes": upload.max_bytes,
        "expires_at": upload.expires_at.isoformat().replace("+00:00", "Z"),
        "complete_url": f"{status_url}/complete",
        "status_url": status_url,
    }


def status_location(job: JobStatus) -> str:
    return upload_path(job.id)


def conversion_in_progress(
    detail: str, upload_id: uuid.UUID, retry_after: int
) -> ConversionInProgress:
    """The 409 of a job still queued or converting, pointing at its status URL."""
    return ConversionInProgress(detail, retry_after=retry_after, status_url=upload_path(upload_id))


def job_problem(job: JobStatus) -> dict[str, Any]:
    """The failed job's stored problem document, its ``instance`` the job's status URL."""
    return {**(job.error or {}), "instance": status_location(job)}


def status_body(request: Request, settings: Settings, job: JobStatus) -> dict[str, Any]:
    body: dict[str, Any] = {"id": str(job.id), "status": job.status, "progress": job.progress}
    if job.status == "done":
        body["record"] = (
            record_body(public_base_url(request, settings), job.record) if job.record else None
        )
    if job.status == "failed":
        body["error"] = job_problem(job)
    return body


def status_response(request: Request, settings: Settings, job: JobStatus) -> Response:
    headers = {"Cache-Control": "no-store"}
    if job.pending:
        headers["Retry-After"] = str(POLL_RETRY_AFTER_SECONDS)
    return json_response(status_body(request, settings, job), headers=headers)


def completion_response(
    request: Request, settings: Settings, completion: Completion, *, waited: int
) -> Response:
    job = completion.job
    if job.status == "failed":
        raise StoredProblem(job_problem(job))
    if job.status == "done":
        if job.record is None:
            raise NotFound("The upload was converted, but its record has been deleted since.")
        response = record_created_response(
            request, settings, job.record, status=201 if completion.won else 200
        )
        if waited:
            response.headers["Preference-Applied"] = f"wait={waited}"
        return response
    if not completion.won:
        raise conversion_in_progress(
            f"The upload's conversion is {job.status} already; poll its status URL.",
            job.id,
            POLL_RETRY_AFTER_SECONDS,
        )
    headers = {
        "Location": status_location(job),
        "Retry-After": str(POLL_RETRY_AFTER_SECONDS),
        "Cache-Control": "no-store",
    }
    return json_response(status_body(request, settings, job), status=202, headers=headers)
