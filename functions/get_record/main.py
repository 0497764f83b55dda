"""get_record: GET|HEAD /record?id=<record>&user=<user> -> the MP3 (streamed or redirected)."""

from __future__ import annotations

import flask
import functions_framework
from common.domain.records import find_record
from common.http.downloads import download_response
from common.http.responses import function_handler, health_response, is_health_check, require_method
from common.platform.runtime import get_services


@functions_framework.http
@function_handler
def get_record(request: flask.Request) -> flask.Response:
    services = get_services()
    if is_health_check(request):
        return health_response(services.db, services.storage)
    require_method(request, "GET", "HEAD")
    record = find_record(services.db, request.args.get("id"), request.args.get("user"))
    return download_response(request, services.storage, services.settings, record)
