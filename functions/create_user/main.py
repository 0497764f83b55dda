"""create_user: the users and their tokens.

* POST /users {"name": ...} -> 201 {"id", "name", "token"}.
* POST /users/<id>/token -> 200 {"token"}: a new token; the old one is refused from now on.
* DELETE /users/<id> -> 204: the user, its records, its MP3s and pending uploads are erased.

The POSTs take an Idempotency-Key (common.http.idempotency).
"""

from __future__ import annotations

import hashlib
import uuid

from common.domain.tokens import new_token as generate_token
from common.domain.users import ROTATION_REPLAY_WINDOW, authenticate, parse_uuid, rotate_token
from common.domain.users import create_user as create_user_in_db
from common.domain.users import new_user as draw_user
from common.http import Request, Response
from common.http.auth import request_credentials
from common.http.idempotency import Recorder, idempotent
from common.http.request_body import read_fields
from common.http.responses import function_handler, health_response, json_response
from common.http.routes import ROTATE_ROUTE, USERS_PATH, route
from common.platform.runtime import Services, get_services

NO_STORE = {"Cache-Control": "no-store"}


@function_handler
def create_user(request: Request) -> Response:
    target = route("create_user", request.path, request.method)
    services = get_services()
    if target.name == "health":
        return health_response(services.db, services.storage)
    if target.name == "create_user":
        return new_user(request, services)
    user_id = parse_uuid(target.args["user_id"], "user")
    if target.name == "rotate_token":
        return new_token(request, services, user_id)
    return erase(request, services, user_id)


def new_user(request: Request, services: Services) -> Response:
    fields = read_fields(request)

    def run(recorder: Recorder) -> Response:
        user = draw_user(fields.get("name"))
        body = {"id": str(user.id), "name": user.name, "token": user.token}
        response = json_response(body, status=201, headers=NO_STORE)
        create_user_in_db(services.db, user=user, within=recorder.within(response, user_id=user.id))
        return response

    return idempotent(
        request, services.db, services.settings, caller=None, route=USERS_PATH,
        fields=fields, run_with=run, owner_of=_created_user,
    )  # fmt: skip


def _created_user(response: Response) -> uuid.UUID | None:
    body = response.get_json(silent=True) if response.status_code == 201 else None
    return uuid.UUID(body["id"]) if isinstance(body, dict) else None


def new_token(request: Request, services: Services, user_id: uuid.UUID) -> Response:
    """A rotation needs an Idempotency-Key (16+ characters): its answer is the only copy of
    the new token, and it is stored with the rotation, in one transaction, for a repeat that
    lost it. The scope is the path's user, and the fingerprint holds the presented token's
    hash: only the holder of the old token *and* the key gets the replay, for
    ROTATION_REPLAY_WINDOW. Anything else is authenticated first (`guard`)."""
    _, token, fields = request_credentials(request)
    user = str(user_id)

    def run(recorder: Recorder) -> Response:
        new = generate_token()
        response = json_response({"token": new}, headers=NO_STORE)
        rotate_token(services.db, user, token, new, within=recorder.within(response))
        return response

    presented = hashlib.sha256((token or "").encode()).hexdigest()
    return idempotent(
        request, services.db, services.settings, caller=user_id, route=ROTATE_ROUTE,
        fields={**fields, "token_sha256": presented}, run_with=run,
        guard=lambda: authenticate(services.db, user, token),
        required=True, anonymous=True, ttl=ROTATION_REPLAY_WINDOW,
    )  # fmt: skip


def erase(request: Request, services: Services, user_id: uuid.UUID) -> Response:
    _, token, _ = request_credentials(request)
    authenticate(services.db, str(user_id), token)
    # The one route of this function that touches the bucket: its code (and boto3's) loads
    # on the first erasure, not in every cold start.
    from common.domain.erasure import erase_user

    erase_user(services.db, services.storage, services.settings, user_id)
    return Response(status=204, headers=NO_STORE)
