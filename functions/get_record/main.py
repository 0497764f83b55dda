"""get_record: the read-only side of the records.

* GET|HEAD /record?id=<record>&user=<user> -> the MP3 (streamed, redirected or by the router).
* GET /records?user=<user> (Bearer token) -> 200 {"records": [...], "next_cursor"}: newest
  first, ``limit`` 1-100 (default 20), ``cursor`` from the previous page.
"""

from __future__ import annotations

from common.domain.records import find_record, list_records, parse_limit
from common.http import Request, Response
from common.http.auth import bearer_user
from common.http.downloads import download_response
from common.http.record_response import record_list_response
from common.http.responses import function_handler, health_response
from common.http.routes import route
from common.platform.runtime import get_services


@function_handler
def get_record(request: Request) -> Response:
    target = route("get_record", request.path, request.method)
    services = get_services()
    if target.name == "health":
        return health_response(services.db, services.storage)
    if target.name == "list_records":
        user_id = bearer_user(services.db, request)
        page = list_records(
            services.db,
            services.settings,
            user_id=user_id,
            limit=parse_limit(request.args.get("limit")),
            cursor=request.args.get("cursor"),
        )
        return record_list_response(request, services.settings, page)
    record = find_record(services.db, request.args.get("id"), request.args.get("user"))
    return download_response(request, services.storage, services.settings, record)
