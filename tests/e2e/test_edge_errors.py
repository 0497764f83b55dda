"""End to end, through the router, without credentials: what the edge answers to requests that
are hostile or odd. Always a problem document with the right status, never a 5xx or HTML,
never a header twice; 405s carry the path's Allow from the one route table."""

from __future__ import annotations

import json
import socket
import uuid
from urllib.parse import urlsplit

import pytest

from devstack import ScratchStack, wavgen
from tests.support import Client

PROBLEM = "application/problem+json"
ID = str(uuid.uuid4())
# Every public path and the methods it serves (the API document's, and common/http/routes.py).
PATHS = {
    "/users": "POST",
    f"/users/{ID}": "DELETE",
    f"/users/{ID}/token": "POST",
    "/records": "GET, HEAD, POST",
    "/records/uploads": "POST",
    f"/records/uploads/{ID}": "GET, HEAD",
    f"/records/uploads/{ID}/complete": "POST",
    "/record": "DELETE, GET, HEAD",
    "/healthz": "GET, HEAD",
    "/openapi.yaml": "GET, HEAD",
    "/docs": "GET, HEAD",
}
SINGLE_HEADERS = ("content-type", "content-length", "cache-control", "x-content-type-options")


class Answer:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:]]

    def header(self, name: str) -> str | None:
        found = [value for key, value in self.headers if key.lower() == name]
        assert len(found) <= 1, f"{name} sent {len(found)} times: {self.headers}"
        return found[0] if found else None

    def problem(self, status: int) -> dict[str, object]:
        assert self.status == status, (self.status, self.headers, self.body[:300])
        for name in SINGLE_HEADERS:
            self.header(name)
        assert self.header("content-type") == PROBLEM, self.headers
        body: dict[str, object] = json.loads(self.body)
        assert body["status"] == status and body["title"] and body["detail"]
        return body


def send(stack: ScratchStack, request: bytes) -> Answer:
    """One raw request on a new connection; the answer read until nginx closes it."""
    address = urlsplit(stack.base_url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return Answer(data)


def request(method: str, target: str, *headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost", "Connection: close", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@pytest.mark.parametrize("path", list(PATHS))
def test_trace_is_405_with_the_paths_methods(stack: ScratchStack, path: str) -> None:
    answer = send(stack, request("TRACE", path))
    answer.problem(405)
    assert answer.header("allow") == PATHS[path]


def test_methods_a_path_lacks_are_405_with_allow_from_router_and_functions(
    stack: ScratchStack,
) -> None:
    for path, allowed in PATHS.items():
        for method in ("PUT", "PATCH", "OPTIONS", "GET", "POST", "DELETE"):
            if method in allowed.split(", "):
                continue
            answer = send(stack, request(method, path, "Content-Length: 0"))
            answer.problem(405)
            assert answer.header("allow") == allowed, (method, path)


def test_trace_on_an_unknown_path_is_404(stack: ScratchStack) -> None:
    send(stack, request("TRACE", "/nowhere")).problem(404)


def test_a_request_line_over_8_kib_is_414(stack: ScratchStack) -> None:
    send(stack, request("GET", "/records?user=" + "a" * 9000)).problem(414)


def test_a_header_over_8_kib_is_431(stack: ScratchStack) -> None:
    send(stack, request("GET", "/healthz", "X-Big: " + "a" * 9000)).problem(431)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /x y z HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET relative HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET /docs/../../README.md HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET /records/%2e%2e/%2e%2e/x HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET /%00 HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET /healthz HTTP/9.9\r\nHost: localhost\r\n\r\n",
        b"POST /users HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ],
    ids=[
        "spaces", "garbage", "relative", "dot-dot", "encoded-dot-dot", "nul", "http-9",
        "transfer-coding", "two-hosts",
    ],
)  # fmt: skip
def test_malformed_requests_and_bad_paths_are_400(stack: ScratchStack, raw: bytes) -> None:
    send(stack, raw).problem(400)


JSON_ROUTES = (
    "/users",
    f"/users/{ID}/token",
    "/records/uploads",
    f"/records/uploads/{ID}/complete",
)


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_deeply_nested_json_is_400_on_every_json_route(stack: ScratchStack, path: str) -> None:
    body = b'{"name":' + b"[" * 5000 + b"]" * 5000 + b"}"
    answer = send(
        stack,
        request("POST", path, "Content-Type: application/json", f"Content-Length: {len(body)}")
        + body,
    )
    assert "nested deeper than 32 levels" in str(answer.problem(400)["detail"])


def test_a_huge_valid_range_is_206_with_the_whole_file(stack: ScratchStack, client: Client) -> None:
    user = client.create_user("Ranger")
    uploaded = client.upload(user, wavgen.wav(seconds=0.5))
    assert uploaded.status_code == 201, uploaded.text
    record = uploaded.json()
    target = f"/record?id={record['id']}&user={user['id']}"
    for spec in (
        "bytes=0-99999999999999999999999", "bytes=0-9223372036854775808",
        "bytes=-99999999999999999999999", "bytes=-99999999",
    ):  # fmt: skip
        answer = send(stack, request("GET", target, f"Range: {spec}"))
        assert answer.status == 206, (spec, answer.headers, answer.body[:200])
        size = record["size_bytes"]
        assert answer.header("content-range") == f"bytes 0-{size - 1}/{size}"
        assert answer.header("content-type") == "audio/mpeg"
        for name in SINGLE_HEADERS:
            answer.header(name)
    # Ranges nginx reads itself are served as before, and an unsatisfiable one is a problem.
    answer = send(stack, request("GET", target, "Range: bytes=0-99999999999"))
    assert answer.status == 206 and answer.header("content-range") is not None
    send(stack, request("GET", target, "Range: bytes=99999999999999999999999-")).problem(416)


def test_a_204_has_no_body_headers(stack: ScratchStack, client: Client) -> None:
    user = client.create_user("Brief")
    record = client.upload(user, wavgen.wav(seconds=0.5)).json()
    bearer = f"Authorization: Bearer {user['token']}"
    for target in (f"/record?id={record['id']}&user={user['id']}", f"/users/{user['id']}"):
        answer = send(stack, request("DELETE", target, bearer))
        assert answer.status == 204, (target, answer.headers)
        assert answer.header("content-type") is None and answer.header("content-length") is None
        assert answer.body == b""
