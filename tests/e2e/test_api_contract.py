"""The API document against the live service: schemathesis, the docs page, the rate limits.

* ``api/openapi.yaml`` is served by the router and renders in a real browser (headless
  Chromium), every operation of the document on the page, with no asset from outside.
* schemathesis, every check and phase, over 1,000 cases as a real user, then a second user
  aimed at the first one's ids: zero failures, and no 2xx for the stranger.
* The router's per-client rate limits answer 429 problems with Retry-After.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
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
            if status in ("429", "502", "503", "504"):
                assert "Retry-After" in response.get("headers", {}), (path, method, status)
        statuses = set(op["responses"])
        if method in ("post",) or path == "/record":
            assert {"502", "503", "504"} <= statuses, (path, method)
        # The router answers these on any path (tests/e2e/test_edge_errors.py): a malformed
        # request, a long request line or header, a body past client_max_body_size (64 KiB
        # wherever no upload is taken, bodies nobody asked for included), a body with a 30 s
        # gap (client_body_timeout), and its own failures.
        assert {"400", "408", "413", "414", "431", "500"} <= statuses, (path, method)
        if path == "/healthz" or op["operationId"] in ("createUser", "uploadRecord"):
            assert "429" in statuses, (path, method)  # limit_req: the router's rate limits


@dataclass(frozen=True)
class ContractWorld:
    """What schemathesis's requests point at: real users and their real objects."""

    owner: dict[str, str]  # the identity of the run
    record: str  # read by getRecord/headRecord
    doomed_record: str  # deleted by deleteRecord
    upload: str  # a direct upload whose WAV is in the bucket
    erased: dict[str, str]  # eraseUser's target
    rotated: dict[str, str]  # rotateToken's target (its first rotation ends its old token)


def contract_world(client: Client) -> ContractWorld:
    owner = client.create_user("Schemathesis")
    records = []
    for name in ("kept.wav", "doomed.wav"):
        uploaded = client.upload(owner, wav(seconds=0.5), filename=name)
        assert uploaded.status_code == 201, uploaded.text
        records.append(uploaded.json()["id"])
    bearer = {"Authorization": f"Bearer {owner['token']}"}
    started = client.session.post(
        f"{client.base_url}/records/uploads", json={"user": owner["id"]}, headers=bearer, timeout=30
    )
    assert started.status_code == 201, started.text
    form = started.json()["upload"]
    sent = requests.post(
        form["url"], data=form["fields"],
        files={form["file_field"]: ("direct.wav", wav(seconds=0.5), "audio/wav")}, timeout=60,
    )  # fmt: skip
    assert sent.status_code in (200, 201, 204), sent.text
    return ContractWorld(
        owner=owner,
        record=records[0],
        doomed_record=records[1],
        upload=started.json()["id"],
        erased=client.create_user("Erased by schemathesis"),
        rotated=client.create_user("Rotated by schemathesis"),
    )


def toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# Statuses a schema-valid request may still get, per operation, for rules a schema can't say.
ACCEPTED_REFUSALS = {
    # The bytes must be a decodable WAV (415/422), and a bitrate must exist at the output rate.
    "uploadRecord": ["415", "422"],
    # A bitrate must exist at the output rate (422 naming the field).
    "startDirectUpload": ["422"],
    # The cursor is signed: only a next_cursor the service issued is one (422 invalid-cursor).
    "listRecords": ["422"],
    # A well-formed range that starts past the end of the MP3 is a 416 (RFC 9110).
    "getRecord": ["416"],
    "headRecord": ["416"],
}
POSITIVE_DEFAULT = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]


def schemathesis_config(world: ContractWorld, caller: dict[str, str] | None = None) -> str:
    """A schemathesis.toml: a Bearer token, and each operation pointed at ``world``'s ids.

    Without ``caller``, as the world's owner (eraseUser and rotateToken act on users of their
    own: see ``own_tokens``). With ``caller``, another user aims at the owner's own ids, the
    record that must survive included.
    """
    owner = world.owner["id"]
    doomed, erased, rotated = world.doomed_record, world.erased["id"], world.rotated["id"]
    if caller is not None:
        doomed, erased, rotated = world.record, owner, owner
    operations = [
        (["getRecord", "headRecord"], {"query.id": world.record, "query.user": owner}),
        (["deleteRecord"], {"query.id": doomed, "query.user": owner}),
        (["listRecords", "uploadRecord", "startDirectUpload"], {"query.user": owner}),
        (
            ["completeDirectUpload", "getDirectUploadStatus"],
            {"path.upload_id": world.upload, "query.user": owner},
        ),
        (["eraseUser"], {"path.user_id": erased}),
        (["rotateToken"], {"path.user_id": rotated}),
    ]
    token = (caller or world.owner)["token"]
    lines = [f"[auth.openapi.bearerToken]\nbearer = {toml_string(token)}\n"]
    for ids, parameters in operations:
        fixed = ", ".join(f"{toml_string(k)} = {toml_string(v)}" for k, v in parameters.items())
        lines.append(f"[[operations]]\ninclude-operation-id = {json.dumps(ids)}")
        lines.append(f"parameters = {{ {fixed} }}\n")
    for operation, statuses in ACCEPTED_REFUSALS.items():
        lines.append(f"[[operations]]\ninclude-operation-id = {json.dumps(operation)}")
        expected = json.dumps(POSITIVE_DEFAULT + statuses)
        lines.append(f"checks.positive_data_acceptance.expected-statuses = {expected}\n")
    return "\n".join(lines)


def own_tokens(world: ContractWorld) -> str:
    """eraseUser and rotateToken act on users of their own, with their tokens (hooks)."""
    return json.dumps({
        "eraseUser": world.erased["token"], "rotateToken": world.rotated["token"]
    })  # fmt: skip


def run_schemathesis(
    base_url: str, config: Path, *options: str, env: dict[str, str] | None = None
) -> tuple[str, int]:
    """``st run`` against the document: its output and the number of cases it ran.

    One worker: two made hypothesis's lambda descriptions race (CPython's AST constructor
    is not safe across threads) and end the run with a SystemError.
    """
    report = config.with_suffix(".xml")
    st = Path(sys.executable).parent / "st"
    command = [
        str(st), "--config-file", str(config), "run", str(SPEC_PATH), "--url", base_url,
        "--workers", "1", "--request-timeout", "30", "--seed", "1", "--no-color",
        "--report", "junit", "--report-junit-path", str(report), *options,
    ]  # fmt: skip
    environ = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.support.schemathesis_hooks",
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False, cwd=config.parent,
        env=environ,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    summary = re.search(r"^\s*(\d+) generated, (\d+) passed", output, flags=re.M)
    assert summary, output[-3000:]
    assert summary.group(1) == summary.group(2), output[-3000:]  # passed = generated
    assert "failure" not in output.rsplit("Test cases:", 1)[1], output[-3000:]
    return output, int(summary.group(1))


def download(client: Client, world: ContractWorld) -> bytes:
    answer = client.session.get(
        f"{client.base_url}/record",
        params={"id": world.record, "user": world.owner["id"]},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return answer.content


def owner_data_intact(client: Client, world: ContractWorld, mp3: bytes) -> None:
    """The owner's token, records and upload, as they were before the foreign run."""
    owner = world.owner
    bearer = {"Authorization": f"Bearer {owner['token']}"}
    listed = client.session.get(
        f"{client.base_url}/records", params={"user": owner["id"]}, headers=bearer, timeout=30
    )
    assert listed.status_code == 200, listed.text
    assert world.record in {item["id"] for item in listed.json()["records"]}
    assert download(client, world) == mp3
    status = client.session.get(
        f"{client.base_url}/records/uploads/{world.upload}", params={"user": owner["id"]},
        headers=bearer, timeout=30,
    )  # fmt: skip
    assert status.status_code == 200, status.text


# Operations the second identity is not aimed at, each with its reason.
NOT_FOREIGN = [
    # The download URL (record id with its owner's id) is the credential; no token is asked.
    "getRecord",
    "headRecord",
    # No object of anyone's: a new user, the service's health.
    "createUser",
    "health",
    "healthHead",
]


@pytest.mark.timeout(600)
def test_schemathesis_every_check_as_a_user_and_as_another(client: Client, tmp_path: Path) -> None:
    """Every check and phase of schemathesis, over 1,000 cases, as a real user whose ids are
    fixed per operation; then a second user aimed at the first one's ids gets no 2xx, and
    the first user's data is all there afterwards."""
    world = contract_world(client)
    config = tmp_path / "owner.toml"
    config.write_text(schemathesis_config(world))
    _, cases = run_schemathesis(
        client.base_url, config,
        "--checks", "all", "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", "60", env={"RECORDS_ST_TOKENS": own_tokens(world)},
    )  # fmt: skip
    assert cases >= 1000, cases

    mp3 = download(client, world)
    stranger = client.create_user("Stranger")
    foreign = tmp_path / "stranger.toml"
    foreign.write_text(schemathesis_config(world, caller=stranger))
    excluded = [option for name in NOT_FOREIGN for option in ("--exclude-operation-id", name)]
    _, foreign_cases = run_schemathesis(
        client.base_url, foreign,
        "--checks", "all", "--phases", "examples,coverage,fuzzing", "--max-examples", "25",
        *excluded, env={"RECORDS_ST_FOREIGN": "1"},
    )  # fmt: skip
    assert foreign_cases >= 200, foreign_cases
    owner_data_intact(client, world, mp3)


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
