"""The API document against the live service: schemathesis, the docs page, the rate limits.

* ``api/openapi.yaml`` is served by the router and renders in a real browser (headless
  Chromium), every operation of the document on the page, with no asset from outside.
* schemathesis generates a few hundred requests from the document against the native stack:
  no 5xx, and every status, header, content type and body conforms to the document.
* The router's per-client rate limits answer 429 problems with Retry-After.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from devstack.wavgen import wav

from devstack import NativeStack, free_port, make_data_dir
from tests.support import ROOT, Client

SPEC_PATH = ROOT / "api" / "openapi.yaml"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def load_spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
    return spec


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in HTTP_METHODS
    ]


def test_router_serves_the_document_it_is_tested_against(client: Client) -> None:
    response = client.session.get(f"{client.base_url}/openapi.yaml", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/yaml")
    assert response.content == SPEC_PATH.read_bytes()
    assert yaml.safe_load(response.text)["openapi"].startswith("3.1")
    # The root openapi.yaml is the same document (a link into api/).
    assert (ROOT / "openapi.yaml").read_bytes() == SPEC_PATH.read_bytes()


def test_docs_page_assets_are_all_local(client: Client) -> None:
    page = client.session.get(f"{client.base_url}/docs", timeout=10)
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert refs, page.text
    for ref in refs:
        if ref.startswith("data:"):
            continue
        assert ref.startswith("/"), f"{ref} is not served by the router"
        asset = client.session.get(f"{client.base_url}{ref}", timeout=10)
        assert asset.status_code == 200, ref
        assert len(asset.content) > 0
    script = client.session.get(f"{client.base_url}/docs/init.js", timeout=10)
    assert script.headers["Content-Type"].startswith("text/javascript")
    assert "//" not in re.sub(r"^\s*//.*$", "", script.text, flags=re.M).replace('"/', "")


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Chromium is missing: `make test-tools` installs Debian's chromium"
    return found


def test_docs_page_renders_every_operation_in_chromium(client: Client) -> None:
    spec = load_spec()
    with tempfile.TemporaryDirectory(prefix="records-chromium-") as profile:
        result = subprocess.run(
            [
                chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-extensions", "--disable-sync", "--no-first-run",
                "--disable-component-update", "--disable-default-apps",
                f"--user-data-dir={profile}", "--virtual-time-budget=20000",
                "--dump-dom", f"{client.base_url}/docs",
            ],
            capture_output=True,
            timeout=120,
            check=False,
        )  # fmt: skip
    dom = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    assert "swagger-ui" in dom
    assert "errors-wrapper" not in dom, "Swagger UI reported errors in the document"
    assert spec["info"]["title"] in dom
    for path, method, op in operations(spec):
        tag = op["tags"][0]
        block = f'id="operations-{tag}-{op["operationId"]}"'
        assert block in dom, f"{method.upper()} {path} is not on the docs page"
        assert f'<span class="opblock-summary-method">{method.upper()}</span>' in dom


def test_every_operation_documents_its_errors_as_problems() -> None:
    spec = load_spec()
    responses = spec["components"]["responses"]
    for path, method, op in operations(spec):
        for status, response in op["responses"].items():
            if "$ref" in response:
                response = responses[response["$ref"].rsplit("/", 1)[1]]
            if int(status) >= 400 and method != "head":
                assert "application/problem+json" in response["content"], (path, status)
            if status in ("429", "502", "503", "504") and method != "head":
                assert "Retry-After" in response["headers"], (path, status)
        if method in ("post",) or path == "/record":
            assert "503" in op["responses"], (path, method)
        # The router answers these on any path (tests/e2e/test_edge_errors.py).
        assert {"400", "414", "431"} <= set(op["responses"]), (path, method)


def test_schemathesis_finds_no_server_error_and_no_nonconformance(
    client: Client, tmp_path: Path
) -> None:
    """A bounded property-based run over every operation (a few hundred requests)."""
    user = client.create_user("Schemathesis")
    uploaded = client.upload(user, wav(seconds=0.5), filename="contract.wav")
    assert uploaded.status_code == 201, uploaded.text
    record = uploaded.json()
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        "[[operations]]\n"
        'include-operation-id = ["getRecord", "headRecord"]\n'
        f'parameters = {{ "query.id" = "{record["id"]}", "query.user" = "{user["id"]}" }}\n'
    )
    st = Path(sys.executable).parent / "st"
    command = [
        str(st), "--config-file", str(config), "run", str(SPEC_PATH),
        "--url", client.base_url,
        "--checks", ",".join((
            "not_a_server_error", "status_code_conformance", "content_type_conformance",
            "response_headers_conformance", "response_schema_conformance",
        )),
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", "60", "--workers", "1",
        "--request-timeout", "30", "--seed", "1", "--no-color",
    ]  # fmt: skip
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.support.schemathesis_hooks",  # raw audio/wav bodies
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=240, check=False, cwd=tmp_path, env=env
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    generated = re.search(r"(\d+) generated", output)
    assert generated, output[-3000:]
    assert int(generated.group(1)) >= 200, output[-3000:]
    assert re.search(r"\d+ generated, \d+ passed\s*$", output, flags=re.M), output[-3000:]


@pytest.fixture
def strict_router(stack: NativeStack) -> Any:
    """A second router in front of the session's functions, with a tiny rate limit."""
    data_dir = make_data_dir("records-ratelimit-")
    router = NativeStack(
        data_dir,
        ports=replace(stack.ports, router=free_port()),
        extra_env={"RATE_LIMIT_RPS": "1", "RATE_LIMIT_BURST": "3"},
    )
    router.logs.mkdir(parents=True, exist_ok=True)
    router.start_router()
    try:
        router.wait_healthy(30)
        yield router
    finally:
        router.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_rate_limits_answer_429_problems_with_retry_after(strict_router: NativeStack) -> None:
    base = strict_router.base_url
    with requests.Session() as session:
        statuses = []
        for _ in range(12):
            response = session.post(f"{base}/users", json={"name": ""}, timeout=10)
            statuses.append(response.status_code)
            if response.status_code == 429:
                assert response.headers["Content-Type"] == "application/problem+json"
                assert int(response.headers["Retry-After"]) >= 1
                assert response.json()["status"] == 429
        # The burst passes (422: empty name), the rest of the quick succession is limited.
        assert statuses[:4] == [422] * 4, statuses
        assert statuses.count(429) >= 6, statuses
        limited = session.post(
            f"{base}/records", data=b"RIFF", headers={"Content-Type": "audio/wav"}, timeout=10
        )
        statuses = [limited.status_code]
        for _ in range(5):
            statuses.append(
                session.post(
                    f"{base}/records", data=b"RIFF", headers={"Content-Type": "audio/wav"},
                    timeout=10,
                ).status_code
            )  # fmt: skip
        assert 429 in statuses, statuses
        # Downloads and health are not limited.
        for _ in range(10):
            assert session.get(f"{base}/healthz", timeout=10).status_code == 200
