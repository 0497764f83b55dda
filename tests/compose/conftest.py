"""The compose tier: the real images and docker-compose.yml on a real Docker engine.

Selected only by ``-m compose`` (``make test-compose``); any other run deselects these tests,
so ``make test`` stays fast. The engine comes from ../shared/tools/docker-sandbox when it is
there (engine-up, build-base-images, stand-ins.env: the four image variables then name local
stand-ins, because no registry is reachable), else from whatever ``docker`` already talks to.
Where no engine can be had the tests are skipped with the reason; under CI (``CI`` set) that
is a failure instead, so CI never passes without running them.

Settings (environment): DOCKER_SANDBOX_TOOLS (the sandbox scripts' folder),
COMPOSE_TEST_KEEP=1 (leave the stack up after a failure, for debugging).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pg8000.native
import pytest
import requests

from devstack import wavgen

ROOT = Path(__file__).resolve().parents[2]
# The workplace's sandbox scripts sit in ../shared next to the checkout; a clone made elsewhere
# (CI may clone into a temporary directory) finds them at the workplace's fixed path.
_SANDBOX_CANDIDATES = (
    ROOT.parent / "shared" / "tools" / "docker-sandbox",
    Path("/work/shared/tools/docker-sandbox"),
)
SANDBOX = Path(
    os.environ.get("DOCKER_SANDBOX_TOOLS")
    or next((p for p in _SANDBOX_CANDIDATES if (p / "engine-up").exists()), _SANDBOX_CANDIDATES[0])
)
# Variables docker-compose.yml reads that a developer's shell might carry: the tests pin them.
STACK_VARIABLES = (
    "DOWNLOAD_MODE", "PUBLIC_BASE_URL", "S3_PUBLIC_ENDPOINT_URL", "S3_BUCKET", "S3_REGION",
    "MAX_UPLOAD_BYTES", "MP3_BITRATE_KBPS", "PRESIGN_EXPIRES_SECONDS", "LOG_LEVEL", "WORKERS",
    "THREADS", "RATE_LIMIT_RPS", "RATE_LIMIT_BURST", "BIND_ADDRESS", "COMPOSE_FILE",
    "COMPOSE_PROFILES",
)  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "compose" in (config.option.markexpr or ""):
        return
    kept = [item for item in items if item.get_closest_marker("compose") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept


_unavailable: list[str] = []  # the first reason, so later tests do not start the engine again


def unavailable(reason: str) -> None:
    if not _unavailable:
        _unavailable.append(reason)
    if os.environ.get("CI"):
        pytest.fail(f"compose tests must run in CI, but: {reason}", pytrace=False)
    # Justified skip: no Docker engine on a developer's machine; reported with its reason.
    pytest.skip(reason)


def _run(
    argv: Sequence[str | Path], env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv],
        env=env,
        cwd=ROOT,  # docker-compose.yml and .env are found here, as for a user
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@pytest.fixture(scope="session")
def docker_env() -> dict[str, str]:
    """The environment for ``docker``: a running engine, Compose v2, the image variables."""
    if _unavailable:
        unavailable(_unavailable[0])
    env = {k: v for k, v in os.environ.items() if k not in STACK_VARIABLES}
    if (SANDBOX / "engine-up").exists():
        if os.geteuid() != 0:
            unavailable(f"{SANDBOX}/engine-up must run as root")
        up = _run([SANDBOX / "engine-up"], env, timeout=600)
        exports = [line for line in up.stdout.splitlines() if line.startswith("export ")]
        if up.returncode != 0 or not exports:
            unavailable(f"engine-up failed (exit {up.returncode}):\n{_tail(up.stderr)}")
        for item in exports[-1].removeprefix("export ").split():
            key, _, value = item.partition("=")
            env[key] = value
        images = _run([SANDBOX / "build-base-images"], env, timeout=1800)
        if images.returncode != 0:
            unavailable(f"build-base-images failed:\n{_tail(images.stdout + images.stderr)}")
        for line in (SANDBOX / "stand-ins.env").read_text().splitlines():
            if line.startswith("export "):
                key, _, value = line.removeprefix("export ").strip().partition("=")
                env[key] = value
    elif shutil.which("docker") is None:
        unavailable(f"no docker CLI and no docker-sandbox at {SANDBOX}")
    info = _run(["docker", "info", "--format", "{{.ServerVersion}}"], env, timeout=60)
    if info.returncode != 0:
        unavailable(f"no Docker engine answers: {_tail(info.stderr, 5)}")
    version = _run(["docker", "compose", "version", "--short"], env, timeout=60)
    if version.returncode != 0:
        unavailable(f"Docker Compose v2 is missing: {_tail(version.stderr, 5)}")
    return env


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Compose:
    """One compose project of docker-compose.yml, on free host ports."""

    env: dict[str, str] = field(repr=False)
    project: str
    port: int
    postgres_port: int
    storage_port: int
    created: list[dict[str, str]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(
        self,
        *args: str,
        timeout: float = 900,
        check: bool = True,
        extra_env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        env = {**self.env, **(extra_env or {})}
        result = _run(["docker", "compose", *args], env, timeout=timeout)
        if check and result.returncode != 0:
            logs = _run(["docker", "compose", "logs", "--tail", "40"], env, timeout=120)
            pytest.fail(
                f"docker compose {' '.join(args)} failed (exit {result.returncode}):\n"
                f"{_tail(result.stderr, 40)}\n--- logs ---\n{_tail(logs.stdout, 120)}",
                pytrace=False,
            )
        return result

    def make(self, target: str, timeout: float = 900) -> None:
        """A Makefile target (make up / make down), with this project's environment."""
        result = _run(["make", "--no-print-directory", target], self.env, timeout=timeout)
        if result.returncode != 0:
            logs = _run(["docker", "compose", "logs", "--tail", "40"], self.env, timeout=120)
            pytest.fail(
                f"make {target} failed (exit {result.returncode}):\n{_tail(result.stderr, 40)}\n"
                f"--- logs ---\n{_tail(logs.stdout, 120)}",
                pytrace=False,
            )

    def docker(self, *args: str, timeout: float = 120) -> str:
        result = _run(["docker", *args], self.env, timeout=timeout)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def container_ids(self, service: str) -> list[str]:
        return self.run("ps", "-q", service).stdout.split()

    def logs_of(self, container: str) -> str:
        result = _run(["docker", "logs", container], self.env, timeout=120)
        return result.stdout + result.stderr

    def resources(self) -> dict[str, list[str]]:
        """Containers, volumes and networks that still carry this project's label."""
        label = f"label=com.docker.compose.project={self.project}"
        return {
            "containers": self.docker("ps", "-aq", "--filter", label).split(),
            "volumes": self.docker("volume", "ls", "-q", "--filter", label).split(),
            "networks": self.docker("network", "ls", "-q", "--filter", label).split(),
        }

    def wait_healthy(self, timeout: float = 120) -> None:
        """Until the router's /healthz (every function, Postgres and the bucket) answers 200."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                response = requests.get(f"{self.base_url}/healthz", timeout=5)
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text[:200]}"
            time.sleep(0.5)
        pytest.fail(f"the stack did not become healthy within {timeout:g} s: {last}")

    def service_env(self, service: str) -> dict[str, str]:
        config = json.loads(self.run("config", "--format", "json").stdout)
        environment: dict[str, str] = config["services"][service]["environment"]
        return environment


@pytest.fixture(scope="module")
def compose(docker_env: dict[str, str]) -> Iterator[Compose]:
    stack = Compose(
        env=dict(docker_env),
        project=f"rs-test-{uuid.uuid4().hex[:8]}",
        port=free_port(),
        postgres_port=free_port(),
        storage_port=free_port(),
    )
    stack.env.update(
        COMPOSE_PROJECT_NAME=stack.project,
        PORT=str(stack.port),
        POSTGRES_PORT=str(stack.postgres_port),
        STORAGE_PORT=str(stack.storage_port),
    )
    try:
        yield stack
    finally:
        if not (os.environ.get("COMPOSE_TEST_KEEP") and stack.resources()["containers"]):
            stack.run("down", "-v", "--remove-orphans", "--timeout", "20", check=False)


# --- helpers the compose tests share ---------------------------------------------------------


def create_user(base_url: str, name: str) -> dict[str, str]:
    response = requests.post(f"{base_url}/users", json={"name": name}, timeout=30)
    assert response.status_code == 201, response.text
    user: dict[str, str] = response.json()
    return user


def download(url: str) -> bytes:
    response = requests.get(url, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "audio/mpeg"
    return response.content


def job_row(compose: Compose, upload_id: str) -> tuple[str, float, int]:
    settings = dict(
        line.split("=", 1)
        for line in (ROOT / ".env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    connection = pg8000.native.Connection(
        settings["POSTGRES_USER"], password=settings["POSTGRES_PASSWORD"],
        database=settings["POSTGRES_DB"], host="127.0.0.1", port=compose.postgres_port,
        timeout=10,
    )  # fmt: skip
    try:
        ((status, progress, attempts),) = connection.run(
            "SELECT status, progress, attempts FROM uploads WHERE id = CAST(:id AS uuid)",
            id=upload_id,
        )
    finally:
        connection.close()
    return str(status), float(progress), int(attempts)


@dataclass(frozen=True)
class DirectJob:
    """A direct upload whose conversion job a worker is running."""

    user: dict[str, str]
    auth: dict[str, str]
    upload_id: str
    complete_url: str

    def complete(self) -> requests.Response:
        return requests.post(
            self.complete_url, headers=self.auth, params={"user": self.user["id"]}, timeout=60
        )


def converting_direct_upload(compose: Compose, name: str) -> DirectJob:
    """A new user's direct upload of 4 min of CD audio (42 MB), sent to the bucket, completed
    (202), and its job converting, a tenth of the way in."""
    user = create_user(compose.base_url, name)
    auth = {"Authorization": f"Bearer {user['token']}"}
    upload = requests.post(
        f"{compose.base_url}/records/uploads", json={"user": user["id"]}, headers=auth, timeout=30
    ).json()
    post = upload["upload"]
    wav = b"".join(wavgen.silence_wav(240.0))  # long enough to stop or kill mid-way
    sent = requests.post(
        post["url"], data=post["fields"], files={"file": ("long.wav", wav)}, timeout=300
    )
    assert sent.status_code in (200, 201, 204), sent.text
    job = DirectJob(user, auth, upload["id"], upload["complete_url"])
    accepted = job.complete()
    assert accepted.status_code == 202, accepted.text
    deadline = time.monotonic() + 120
    while (row := job_row(compose, job.upload_id))[0] != "converting" or row[1] < 0.1:
        assert row[0] in ("queued", "converting") and time.monotonic() < deadline, row
        time.sleep(0.05)
    return job


def completed(job: DirectJob, timeout: float = 300) -> requests.Response:
    """Complete ``job`` again until it is no longer running (each 409 says when to retry)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = job.complete()
        if answer.status_code != 409 or time.monotonic() > deadline:
            return answer
        assert answer.headers["Retry-After"]
        time.sleep(1)
