"""create_user: POST /users {"name": ...} -> 201 {"id", "name", "token"}."""

from __future__ import annotations

import flask
import functions_framework
from common.domain.users import create_user as create_user_in_db
from common.http.request_body import read_fields
from common.http.responses import (
    function_handler,
    health_response,
    is_health_check,
    json_response,
    require_method,
)
from common.platform.runtime import get_services


@functions_framework.http
@function_handler
def create_user(request: flask.Request) -> flask.Response:
    services = get_services()
    if is_health_check(request):
        return health_response(services.db, services.storage)
    require_method(request, "POST")
    fields = read_fields(request)
    user = create_user_in_db(services.db, fields.get("name"))
    return json_response(
        {"id": str(user.id), "name": user.name, "token": user.token},
        status=201,
        headers={"Cache-Control": "no-store"},
    )
