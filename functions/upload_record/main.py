"""upload_record: the WAV uploads, each answered 201 with the MP3's download URL.

* POST /records (user, token, encoding options and tags, WAV file): the WAV in the request
  body, converted as it arrives.
* POST /records/uploads: a presigned POST to send a large WAV straight to the bucket.
* POST /records/uploads/<id>/complete: convert that uploaded WAV (see common.domain.uploads).
"""

from __future__ import annotations

import flask
import functions_framework
from common.domain.encoding import EncodingOptions
from common.domain.records import create_record
from common.domain.uploads import (
    UPLOADS_PATH,
    complete_upload,
    completion_target,
    start_upload,
)
from common.domain.users import authenticate
from common.http.auth import authenticated_user, bearer_token
from common.http.record_response import record_created_response
from common.http.request_body import RequestBody, check_content_length, read_upload
from common.http.responses import (
    function_handler,
    health_response,
    is_health_check,
    json_response,
    public_base_url,
    require_method,
)
from common.platform.runtime import Services, get_services


@functions_framework.http
@function_handler
def upload_record(request: flask.Request) -> flask.Response:
    services = get_services()
    if is_health_check(request):
        return health_response(services.db, services.storage)
    require_method(request, "POST")
    if request.path.rstrip("/") == UPLOADS_PATH:
        return presign_upload(request, services)
    upload_id = completion_target(request.path)
    if upload_id is not None:
        return complete(request, services, upload_id)
    settings = services.settings
    check_content_length(request, settings.max_upload_bytes)
    body = RequestBody(request.stream, settings.max_upload_bytes)
    upload = read_upload(body, request.mimetype, request.mimetype_params.get("boundary"))
    token = bearer_token(request.headers.get("Authorization")) or upload.fields.get("token")
    user_id = authenticate(
        services.db, upload.fields.get("user") or request.args.get("user"), token
    )
    # Encoding options and tags: form fields before the file, or the query of a raw WAV body.
    options = EncodingOptions.from_fields(upload.fields if upload.fields else request.args)
    record = create_record(
        services.db,
        services.storage,
        settings,
        user_id=user_id,
        audio=upload.chunks,
        filename=upload.filename,
        options=options,
    )
    return record_created_response(request, settings, record)


def presign_upload(request: flask.Request, services: Services) -> flask.Response:
    user_id, fields = authenticated_user(services.db, request)
    EncodingOptions.from_fields(fields)  # refused (422) now, not when the job runs
    upload = start_upload(
        services.storage, services.settings, user_id=user_id, filename=fields.get("filename")
    )
    body = upload.to_json(public_base_url(request, services.settings))
    return json_response(body, status=201, headers={"Cache-Control": "no-store"})


def complete(request: flask.Request, services: Services, upload_id: str) -> flask.Response:
    user_id, _ = authenticated_user(services.db, request)
    record = complete_upload(
        services.db, services.storage, services.settings, user_id=user_id, raw_upload_id=upload_id
    )
    return record_created_response(request, services.settings, record)
