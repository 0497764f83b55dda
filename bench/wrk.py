"""wrk, the load generator of figure 4: a Lua script that reports one JSON line, and its runner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.core import Plan, log
from devstack import StackError

WRK_SCRIPT = """
local max_responses = tonumber(os.getenv("BENCH_MAX_RESPONSES") or "0")
local count = 0
local method = os.getenv("BENCH_METHOD") or "GET"
wrk.method = method
if method == "POST" then
  wrk.body = os.getenv("BENCH_BODY")
  wrk.headers["Content-Type"] = "application/json"
end
function response(status, headers, body)
  count = count + 1
  if max_responses > 0 and count >= max_responses then wrk.thread:stop() end
end
function done(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "status_errors": %d, "socket_errors": %d,'
    .. ' "p50_us": %d, "p99_us": %d, "max_us": %d}\\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def ensure_wrk() -> str:
    """wrk from Debian's packages: installed here as root, else explained."""
    found = shutil.which("wrk")
    if found:
        return found
    command = ["apt-get", "install", "-y", "--no-install-recommends", "wrk"]
    if os.geteuid() == 0 and Path("/etc/debian_version").exists():
        log("installing wrk with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        found = shutil.which("wrk")
        if found:
            return found
    raise StackError(f"wrk is missing; install it with: sudo {' '.join(command)}")


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    errors: int


def run_wrk(
    wrk: str, script: Path, url: str, plan: Plan, seconds: float, env: dict[str, str]
) -> WrkResult:
    """One wrk run of ``seconds`` against ``url`` with the plan's connections."""
    assert url.startswith("http://127.0.0.1:")  # load goes to this machine only
    threads = 1
    command = [
        wrk, f"-t{threads}", f"-c{plan.connections}", f"-d{seconds:g}s", "--timeout", "5s",
        "-s", str(script), url,
    ]  # fmt: skip
    run_env = {
        **os.environ,
        **env,
        "BENCH_MAX_RESPONSES": str(max(1, plan.wrk_max_requests // threads)),
    }
    done = subprocess.run(
        command, capture_output=True, text=True, env=run_env, timeout=seconds + 60, check=True
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{done.stdout}\n{done.stderr}")
    data = json.loads(line[len("WRKJSON ") :])
    return WrkResult(
        rps=data["requests"] / (data["duration_us"] / 1e6),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        requests=data["requests"],
        errors=data["status_errors"] + data["socket_errors"],
    )
