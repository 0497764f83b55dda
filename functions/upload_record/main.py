"""upload_record: POST /records (user, token, WAV file) -> 201 with the MP3's download URL."""

from __future__ import annotations

import flask
import functions_framework
from common.auth import bearer_token
from common.http import (
    check_content_length,
    function_handler,
    health_response,
    is_health_check,
    json_response,
    public_base_url,
    require_method,
)
from common.records import create_record
from common.runtime import get_services
from common.upload_form import RequestBody, read_upload
from common.users import authenticate


@functions_framework.http
@function_handler
def upload_record(request: flask.Request) -> flask.Response:
    services = get_services()
    if is_health_check(request):
        return health_response(services)
    require_method(request, "POST")
    settings = services.settings
    check_content_length(request, settings.max_upload_bytes)
    body = RequestBody(request.stream, settings.max_upload_bytes)
    upload = read_upload(body, request.mimetype, request.mimetype_params.get("boundary"))
    token = bearer_token(request.headers.get("Authorization")) or upload.fields.get("token")
    user_id = authenticate(
        services.db, upload.fields.get("user") or request.args.get("user"), token
    )
    record = create_record(
        services.db,
        services.storage,
        settings,
        user_id=user_id,
        audio=upload.chunks,
        filename=upload.filename,
    )
    url = f"{public_base_url(request, settings)}/record?id={record.id}&user={record.user_id}"
    return json_response(
        {
            "id": str(record.id),
            "url": url,
            "duration_seconds": record.duration_seconds,
            "size_bytes": record.size_bytes,
            "bitrate_kbps": record.bitrate_kbps,
            "sample_rate": record.sample_rate,
            "channels": record.channels,
            "filename": record.filename,
        },
        status=201,
        headers={"Location": url},
    )
