"""Figure 9: cold starts under AWS's Lambda Runtime Interface Emulator, and the init's imports.

A compose project of its own (docker-compose.yml's PostgreSQL and SeaweedFS, the function
images under the emulator of devstack's lambda-emulator.yaml with the template's memory):
each function's container is restarted ``rounds`` times and its first invocation timed (the
emulator's init included), then the second and the best warm one. The import tree of each
init (``python -X importtime``) goes to the bench output. Needs a Docker engine; the
docker-sandbox one is started as the compose tier starts it.
"""

from __future__ import annotations

import base64
import json
import os
import statistics
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devstack.lambda_events import event

from bench import ROOT
from bench.core import Bench, Row, log
from devstack import free_port, wavgen
from devstack import lambda_emulator as rie

SANDBOX = Path(os.environ.get("DOCKER_SANDBOX_TOOLS", "/work/shared/tools/docker-sandbox"))
TARGETS_MS = {"create_user": 400, "upload_record": 600, "get_record": 400}
WARM_TARGET_MS = 10
FUNCTIONS = ("create_user", "upload_record", "get_record")


def _docker_env() -> tuple[dict[str, str], str]:
    """The environment for ``docker`` (starting the sandbox engine if there is one), or why not."""
    env = dict(os.environ)
    if (SANDBOX / "engine-up").exists():
        up = subprocess.run([SANDBOX / "engine-up"], capture_output=True, text=True, check=False)
        exports = [line for line in up.stdout.splitlines() if line.startswith("export ")]
        if up.returncode or not exports:
            return env, "the docker-sandbox engine did not start"
        for item in exports[-1].removeprefix("export ").split():
            key, _, value = item.partition("=")
            env[key] = value
        images = subprocess.run([SANDBOX / "build-base-images"], capture_output=True, env=env)
        if images.returncode:
            return env, "build-base-images failed"
        for line in (SANDBOX / "stand-ins.env").read_text().splitlines():
            if line.startswith("export "):
                key, _, value = line.removeprefix("export ").strip().partition("=")
                env[key] = value
        env.setdefault("SQS_IMAGE", "local/s3:moto")
    info = subprocess.run(["docker", "info"], capture_output=True, env=env, check=False)
    return env, "" if info.returncode == 0 else "no Docker engine reachable"


def measure_cold_starts(bench: Bench) -> None:
    env, reason = ({}, "not measured in a smoke run") if bench.plan.smoke else _docker_env()
    if reason:
        bench.rows.append(Row("9. cold start under the Lambda emulator", f"not measured: "
                              f"{reason}", "≤ 400 / 600 ms", None, None))  # fmt: skip
        return
    ports = {f: free_port() for f in FUNCTIONS}
    env.update(
        COMPOSE_PROJECT_NAME=f"rs-bench-{uuid.uuid4().hex[:8]}",
        COMPOSE_FILE=f"docker-compose.yml:{rie.OVERRIDE.relative_to(ROOT)}",
        COMPOSE_PROFILES="lambda", LAMBDA_RIE=str(rie.rie_binary()),
        PORT=str(free_port()), POSTGRES_PORT=str(free_port()), STORAGE_PORT=str(free_port()),
        SQS_PORT=str(free_port()), LAMBDA_SWEEP_PORT=str(free_port()),
        **{f"LAMBDA_{f.upper()}_PORT": str(p) for f, p in ports.items()},
        **rie.compose_variables(rie.template_limits(ROOT / "infra" / "aws" / "template.yaml")),
    )  # fmt: skip

    def compose(*args: str) -> str:
        argv = ["docker", "compose", *args]
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=1800, check=False)  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"docker compose {' '.join(args)}: {done.stderr[-400:]}")
        return done.stdout + done.stderr

    log("9. cold starts under the Lambda emulator (a compose project of their own)")
    try:
        compose("build", *FUNCTIONS)
        compose("up", "-d", "--wait", "postgres", "storage", "sqs")
        compose("up", "-d", *(f"lambda_{f}" for f in FUNCTIONS))
        for function in FUNCTIONS:
            tree = rie.import_tree(f"record-service/{function}:local", function, env)
            bench.details.append(import_details(function, tree))
            log(bench.details[-1])
        _measure(bench, compose, ports)
    finally:
        compose("down", "-v", "--timeout", "5")


def import_details(function: str, tree: rie.ImportTree) -> str:
    top = ", ".join(f"{name} {ms:.0f}" for name, ms in tree.by_package[:8])
    return f"{function} init imports {tree.total_ms:.0f} ms (self time per package, ms): {top}"


def _measure(bench: Bench, compose: Callable[..., str], ports: dict[str, int]) -> None:
    user: dict[str, Any] = {}
    record: dict[str, Any] = {}

    def new_user() -> dict[str, Any]:
        return event("http_api_post_json_base64.json", body='{"name": "bench"}')

    def upload() -> dict[str, Any]:
        return event("http_api_post_raw_wav.json", query={"user": user["id"]},
                     headers={"authorization": f"Bearer {user['token']}"},
                     body=wavgen.wav(seconds=1.0))  # fmt: skip

    def download() -> dict[str, Any]:
        return event("http_api_get_query.json", query={"id": record["id"], "user": user["id"]})

    events = {"create_user": new_user, "upload_record": upload, "get_record": download}
    results: dict[str, list[rie.ColdStart]] = {f: [] for f in FUNCTIONS}
    for function in FUNCTIONS:
        service = f"lambda_{function}"

        def restart(service: str = service) -> None:
            compose("restart", "-t", "2", service)

        def logs(service: str = service) -> str:
            return compose("logs", "--since", "30s", service)

        for _ in range(max(1, bench.plan.rounds)):
            results[function].append(
                rie.cold_start(restart, logs, ports[function], function, events[function])
            )
        if function == "create_user":
            user.update(_body(rie.invoke(ports[function], new_user()).result))
        if function == "upload_record":
            record.update(_body(rie.invoke(ports[function], upload()).result))
    for function, runs in results.items():
        first = statistics.median(r.first_seconds for r in runs) * 1000
        second = statistics.median(r.second_seconds for r in runs) * 1000
        warm = min(r.warm_seconds for r in runs) * 1000
        init = [r.init_ms for r in runs if r.init_ms is not None]
        target = TARGETS_MS[function]
        note = f"second invoke {second:.1f} ms"
        note += f"; init {statistics.median(init):.0f} ms" if init else ""
        bench.rows.append(Row(
            f"9. {function} first invoke, init included (median of {len(runs)})",
            f"{first:.0f} ms", f"≤ {target} ms", first / target, first <= target, note,
        ))  # fmt: skip
        if function == "create_user":  # what the deferred imports must not slow down
            bench.rows.append(Row(
                "9. create_user second invoke (median)", f"{second:.1f} ms",
                f"≤ {WARM_TARGET_MS} ms", second / WARM_TARGET_MS, second <= WARM_TARGET_MS,
            ))  # fmt: skip
            bench.rows.append(Row(
                "9. create_user warm invoke (best)", f"{warm:.1f} ms",
                f"≤ {WARM_TARGET_MS} ms", warm / WARM_TARGET_MS, warm <= WARM_TARGET_MS,
            ))  # fmt: skip


def _body(result: dict[str, Any]) -> dict[str, Any]:
    raw = result["body"]
    data: dict[str, Any] = json.loads(base64.b64decode(raw) if result["isBase64Encoded"] else raw)
    return data
