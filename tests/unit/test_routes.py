"""The route table (common.http.routes): each function's 404s and 405s, and the router's Allow
lists, all from the one table."""

from __future__ import annotations

import re
import uuid

import flask
import functions_framework
import pytest
from common.http import Request, Response
from common.http.responses import function_handler
from common.http.routes import EVERY_FUNCTION, ROUTER, ROUTES, TASKS_PATH, allowed_methods, route
from common.platform.runtime import set_services
from devstack.native import FUNCTIONS
from werkzeug.test import EnvironBuilder

from tests.support import ROOT

ID = str(uuid.uuid4())
# One concrete path for every rule of the table.
PATHS = (
    "/users", f"/users/{ID}", f"/users/{ID}/token", "/records", "/records/uploads",
    f"/records/uploads/{ID}", f"/records/uploads/{ID}/complete", "/record", "/healthz",
    TASKS_PATH, "/openapi.yaml", "/docs", "/docs/init.js",
)  # fmt: skip
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")
TEMPLATE = ROOT / "infra" / "nginx" / "router.conf.template"


def test_every_rule_has_a_sample_path() -> None:
    matched = set()
    adapter = ROUTES.bind("localhost")
    for path in PATHS:
        for method in allowed_methods(path):
            endpoint, _ = adapter.match(path, method=method)
            matched.add(endpoint)
    assert matched == {rule.endpoint for rule in ROUTES.iter_rules()}


def test_a_path_lists_the_methods_of_every_function() -> None:
    assert allowed_methods("/record") == ["DELETE", "GET", "HEAD"]
    assert allowed_methods("/records") == ["GET", "HEAD", "POST"]
    assert allowed_methods(f"/users/{ID}") == ["DELETE"]
    assert allowed_methods("/nowhere") == []


@pytest.fixture(scope="module")
def apps() -> dict[str, flask.testing.FlaskClient]:
    set_services(None)  # nothing below may reach a service: routing comes first
    clients = {}
    for name in FUNCTIONS:
        app = functions_framework.create_app(  # type: ignore[no-untyped-call]
            name, str(ROOT / "functions" / name / "main.py")
        )
        clients[name] = app.test_client()
    return clients


@pytest.mark.parametrize("function", FUNCTIONS)
def test_each_function_answers_405_with_every_method_of_the_path(
    apps: dict[str, flask.testing.FlaskClient], function: str
) -> None:
    for path in PATHS:
        allowed = allowed_methods(path)
        for method in METHODS:
            if method in allowed:
                continue
            response = apps[function].open(path, method=method)
            assert response.status_code == 405, (function, method, path)
            assert response.headers["Allow"] == ", ".join(allowed), (function, method, path)
            assert response.content_type == "application/problem+json"
            if method != "HEAD":
                assert response.get_json()["status"] == 405


@pytest.mark.parametrize("function", FUNCTIONS)
def test_each_function_answers_404_for_paths_it_does_not_serve(
    apps: dict[str, flask.testing.FlaskClient], function: str
) -> None:
    client = apps[function]
    for path in ("/nowhere", "/users/", f"/users/{ID}/token/x", "/records/uploads/", "/docs"):
        response = client.get(path) if path != "/users/" else client.post(path)
        assert response.status_code == 404, (function, path)
        assert response.get_json()["type"].endswith(":not-found")
    adapter = ROUTES.bind("localhost")
    for path in PATHS:
        for method in allowed_methods(path):
            endpoint, _ = adapter.match(path, method=method)
            if endpoint.function in (function, EVERY_FUNCTION):
                continue
            assert client.open(path, method=method).status_code == 404, (function, method, path)


def test_route_gives_the_endpoint_and_its_arguments() -> None:
    found = route("upload_record", f"/records/uploads/{ID}/complete", "POST")
    assert (found.name, found.args) == ("complete", {"upload_id": ID})
    assert route("get_record", "/record", "HEAD").name == "download"
    assert route("create_user", "/healthz", "GET").name == "health"


def _router_allow_map() -> list[tuple[str, str]]:
    text = TEMPLATE.read_text()
    block = re.search(r"map \$uri \$route_allow \{(.*?)\n\}", text, flags=re.S)
    assert block, "the router has no Allow map"
    entries = re.findall(r'^\s+(\S+)\s+"([^"]*)";', block.group(1), flags=re.M)
    return [(key, value) for key, value in entries if key != "default"]


def _router_allow(entries: list[tuple[str, str]], uri: str) -> str:
    """nginx's map lookup: an exact key first, then the regular expressions in order."""
    for key, value in entries:
        if key == uri:
            return value
    for key, value in entries:
        if key.startswith("~") and re.search(key[1:], uri):
            return value
    return ""


def test_the_routers_allow_lists_are_the_route_tables() -> None:
    entries = _router_allow_map()
    for path in PATHS:
        expected = "" if path == TASKS_PATH else ", ".join(allowed_methods(path))
        assert _router_allow(entries, path) == expected, path
    # The internal paths the router rewrites to keep their public path's list.
    assert _router_allow(entries, "/_list/records") == ", ".join(allowed_methods("/records"))
    assert _router_allow(entries, "/_delete/record") == ", ".join(allowed_methods("/record"))
    for path in ("/nowhere", "/users/a/b", "/records/uploads/a/b", "/_tasks/convert"):
        assert _router_allow(entries, path) == "", path


def test_router_only_paths_are_not_served_by_a_function() -> None:
    served = {rule.endpoint.function for rule in ROUTES.iter_rules()}
    assert served == {*FUNCTIONS, EVERY_FUNCTION, ROUTER}


def test_a_204_carries_no_body_headers() -> None:
    @function_handler
    def no_content(request: Request) -> Response:
        return Response(status=204, headers={"Cache-Control": "no-store"})

    request = Request(EnvironBuilder(method="DELETE", path="/record").get_environ())
    response = no_content(request)
    assert response.status_code == 204
    assert "Content-Type" not in response.headers and "Content-Length" not in response.headers
    assert response.headers["Cache-Control"] == "no-store"
    assert response.get_data() == b""
