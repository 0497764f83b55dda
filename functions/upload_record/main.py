"""upload_record: WAV uploads, the conversion jobs of direct uploads, and record deletion.

``POST /records`` converts a WAV as it arrives (201); ``POST /records/uploads``, its
``/complete`` and ``GET /records/uploads/<id>`` run a direct upload as a job
(:mod:`common.domain.uploads`, :mod:`common.http.jobs`); ``DELETE /record`` deletes a record;
``POST /_tasks/convert`` takes a job pushed by Cloud Tasks (on Lambda, jobs arrive as SQS events:
:mod:`common.platform.aws_lambda`). The POSTs take an Idempotency-Key
(:mod:`common.http.idempotency`). docs/api.md and docs/direct-uploads.md have the routes.
"""

from __future__ import annotations

from collections.abc import Iterator

from common.domain.encoding import EncodingOptions
from common.domain.jobs import Outcome, run_job
from common.domain.new_records import create_record
from common.domain.records import NewRecord, delete_record
from common.domain.uploads import (
    Completion,
    PresignedUpload,
    complete_upload,
    start_upload,
    upload_status,
    wait_for_job,
)
from common.domain.users import authenticate
from common.http import Request, Response
from common.http.auth import authenticated_user, bearer_token
from common.http.idempotency import Recorder, idempotent, idempotent_upload
from common.http.jobs import (
    completion_response,
    conversion_in_progress,
    preferred_wait,
    presigned_upload_body,
    status_response,
)
from common.http.record_response import record_created_response
from common.http.request_body import RequestBody, check_content_length, encoding_fields, read_upload
from common.http.responses import (
    function_handler,
    health_response,
    json_response,
    public_base_url,
)
from common.http.routes import COMPLETE_ROUTE, RECORDS_PATH, UPLOADS_PATH, route
from common.http.tasks import pushed_job
from common.platform.runtime import Services, get_services


@function_handler
def upload_record(request: Request) -> Response:
    target = route("upload_record", request.path, request.method)
    services = get_services()
    if target.name == "health":
        return health_response(services.db, services.storage)
    if target.name == "pushed_task":
        return convert_pushed_task(request, services)
    if target.name == "delete_record":
        return remove(request, services)
    if target.name == "start_upload":
        return presign_upload(request, services)
    if target.name == "complete":
        return complete(request, services, target.args["upload_id"])
    if target.name == "upload_status":
        return job_status(request, services, target.args["upload_id"])
    return upload(request, services)


def upload(request: Request, services: Services) -> Response:
    settings = services.settings
    check_content_length(request, settings.max_upload_bytes)
    body = RequestBody(request.stream, settings.max_upload_bytes)
    upload = read_upload(body, request.mimetype, request.mimetype_params.get("boundary"))
    token = bearer_token(request.headers.get("Authorization")) or upload.fields.get("token")
    user_id = authenticate(
        services.db, upload.fields.get("user") or request.args.get("user"), token
    )
    # Encoding options and tags: form fields before the file, or the query (of any body).
    chosen = encoding_fields(request.args, upload.fields)
    options = EncodingOptions.from_fields(chosen)

    def answer(record: NewRecord) -> Response:
        return record_created_response(request, settings, record)

    def run(audio: Iterator[bytes], recorder: Recorder) -> Response:
        record = create_record(
            services.db, services.storage, settings, user_id=user_id, audio=audio,
            filename=upload.filename, options=options, within=recorder.storing(answer),
        )  # fmt: skip
        return answer(record)

    fields = {**upload.fields, **chosen, "filename": upload.filename,
              "content_type": request.mimetype}  # fmt: skip
    return idempotent_upload(
        request, services.db, settings, caller=user_id, route=RECORDS_PATH,
        fields=fields, audio=upload.chunks, run=run,
    )  # fmt: skip


def presign_upload(request: Request, services: Services) -> Response:
    user_id, fields = authenticated_user(services.db, request)

    def answer(upload: PresignedUpload) -> Response:
        body = presigned_upload_body(upload, public_base_url(request, services.settings))
        return json_response(body, status=201, headers={"Cache-Control": "no-store"})

    def run(recorder: Recorder) -> Response:
        upload = start_upload(
            services.db, services.storage, services.settings, user_id=user_id,
            filename=fields.get("filename"), options=EncodingOptions.from_fields(fields),
            within=recorder.storing(answer),
        )  # fmt: skip
        return answer(upload)

    return idempotent(
        request, services.db, services.settings, caller=user_id, route=UPLOADS_PATH,
        fields=fields, run_with=run,
    )  # fmt: skip


def complete(request: Request, services: Services, upload_id: str) -> Response:
    user_id, fields = authenticated_user(services.db, request)
    settings = services.settings

    def answer(completion: Completion) -> Response:  # the winner's, without waiting
        return completion_response(request, settings, completion, waited=0)

    def run(recorder: Recorder) -> Response:
        completion = complete_upload(
            services.db, services.storage, services.queue, settings,
            user_id=user_id, raw_upload_id=upload_id, within=recorder.storing(answer),
        )  # fmt: skip
        wait = preferred_wait(request, settings) if completion.won else 0
        if wait:
            job = wait_for_job(services.db, settings, completion.job, wait)
            completion = Completion(won=True, job=job)
        return completion_response(request, settings, completion, waited=wait)

    return idempotent(
        request, services.db, settings, caller=user_id, route=COMPLETE_ROUTE,
        fields=fields, run_with=run,
    )  # fmt: skip


def job_status(request: Request, services: Services, upload_id: str) -> Response:
    user_id, _ = authenticated_user(services.db, request)
    job = upload_status(services.db, services.settings, user_id=user_id, raw_upload_id=upload_id)
    return status_response(request, services.settings, job)


def remove(request: Request, services: Services) -> Response:
    user_id, _ = authenticated_user(services.db, request)
    delete_record(services.db, services.storage, user_id=user_id, raw_id=request.args.get("id"))
    return Response(status=204)


def convert_pushed_task(request: Request, services: Services) -> Response:
    upload_id = pushed_job(request, services.settings)
    outcome = run_job(services.db, services.storage, services.settings, upload_id)
    if outcome is Outcome.BUSY:  # another delivery holds the job: Cloud Tasks retries later
        raise conversion_in_progress(
            "Another worker is converting this upload.",
            upload_id,
            services.settings.job_lease_seconds,
        )
    return json_response({"upload_id": str(upload_id), "outcome": outcome.value})
