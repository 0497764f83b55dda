"""Size of each function image and the time from ``docker run`` to its first 200.

``python -m devstack.images [--project record-service] [--runs 3] [--json]``, with the compose
stack up (``make up``): reads each image's size, then times a fresh container of it, started
next to the stack like its compose service, until ``GET /healthz`` first answers 200. It reports
the best of ``--runs`` next to the median, and exits 1 when a target (:data:`MAX_IMAGE_BYTES`,
:data:`MAX_START_SECONDS`) is missed, so it can gate a benchmark. docs/performance.md has how
the container is started and why the best run counts.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass

FUNCTIONS = ("create_user", "upload_record", "get_record")
MAX_IMAGE_BYTES = 250 * 1000 * 1000  # docker reports decimal megabytes
MAX_START_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class ImageReport:
    function: str
    image: str
    size_bytes: int
    start_seconds: list[float]

    @property
    def best_start(self) -> float:
        return min(self.start_seconds)

    @property
    def ok(self) -> bool:
        return self.size_bytes <= MAX_IMAGE_BYTES and self.best_start < MAX_START_SECONDS


def docker(*args: str, check: bool = True, env: Mapping[str, str] | None = None) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, check=False, env=env)
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def service_container(project: str, service: str, env: Mapping[str, str] | None = None) -> str:
    ids = docker(
        "ps", "-q",
        "--filter", f"label=com.docker.compose.project={project}",
        "--filter", f"label=com.docker.compose.service={service}",
        env=env,
    ).split()  # fmt: skip
    if not ids:
        raise RuntimeError(f"no running {service} container in compose project {project!r}")
    return ids[0]


def image_size(image: str, env: Mapping[str, str] | None = None) -> int:
    return int(docker("image", "inspect", "--format", "{{.Size}}", image, env=env))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def time_to_first_200(
    template_container: str, timeout: float = 30.0, env: Mapping[str, str] | None = None
) -> float:
    """Run the template container's image with its network and env; seconds until /healthz 200."""
    info = json.loads(docker("inspect", template_container, env=env))[0]
    image = info["Config"]["Image"]
    variables = [e for e in info["Config"]["Env"] if not e.startswith(("PATH=", "HOSTNAME="))]
    network = next(iter(info["NetworkSettings"]["Networks"]))
    port = free_port()
    argv = ["run", "-d", "--rm", "--network", network, "--read-only", "--tmpfs", "/tmp"]  # noqa: S108 - in the container
    argv += ["-p", f"127.0.0.1:{port}:8080"]
    for item in variables:
        argv += ["-e", item]
    url = f"http://127.0.0.1:{port}/healthz"
    started = time.monotonic()
    container = docker(*argv, image, env=env)
    try:
        while True:
            elapsed = time.monotonic() - started
            if elapsed > timeout:
                raise RuntimeError(f"{image}: no 200 from /healthz within {timeout:g} s")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.02)
    finally:
        docker("rm", "-f", container, check=False, env=env)


def report(project: str, runs: int, env: Mapping[str, str] | None = None) -> list[ImageReport]:
    """Measure every function image; ``env`` is the environment for ``docker`` (DOCKER_HOST ...)."""
    reports = []
    for function in FUNCTIONS:
        template = service_container(project, function, env)
        image = json.loads(docker("inspect", template, env=env))[0]["Config"]["Image"]
        starts = [round(time_to_first_200(template, env=env), 3) for _ in range(runs)]
        reports.append(ImageReport(function, image, image_size(image, env), starts))
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", default="record-service", help="compose project name")
    parser.add_argument("--runs", type=int, default=3, help="containers started per image")
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    args = parser.parse_args(argv)
    reports = report(args.project, max(1, args.runs))
    for r in reports:
        if args.json:
            line = {**asdict(r), "best_start_seconds": r.best_start, "ok": r.ok}
            sys.stdout.write(json.dumps(line) + "\n")
        else:
            sys.stdout.write(
                f"{r.function:14} {r.size_bytes / 1e6:7.1f} MB  first 200 after "
                f"{r.best_start:.2f} s (best of {len(r.start_seconds)}, median "
                f"{statistics.median(r.start_seconds):.2f} s)  {'ok' if r.ok else 'MISSED'}\n"
            )
    if not args.json:
        sys.stdout.write(
            f"targets: <= {MAX_IMAGE_BYTES / 1e6:.0f} MB, first 200 < {MAX_START_SECONDS:g} s\n"
        )
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
