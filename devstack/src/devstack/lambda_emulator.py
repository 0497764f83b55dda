"""The function images under AWS's Lambda Runtime Interface Emulator (compose tier and bench).

:func:`rie_binary` takes the ``aws-lambda-rie`` binary out of the pinned aws-sam-cli wheel;
``lambda-emulator.yaml`` (next to this module) runs each image's own entry point under it with
the limits infra/aws/template.yaml gives the function (:func:`template_limits`). :func:`invoke`,
:func:`cold_start` and :func:`import_tree` drive and time the functions under it, and
``python -m devstack.lambda_emulator rie`` prints the binary's path. docs/deploy-aws.md, "The
images under the Lambda emulator", has the detail.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SAM_CLI_VERSION = "1.170.0"
SAM_CLI_WHEEL = f"aws_sam_cli-{SAM_CLI_VERSION}-py3-none-any.whl"
SAM_CLI_WHEEL_SHA256 = "24ebaf5ecba38dc1758089968cb89ab61e124b84e92a344fc7a2771a47f4d0bf"
RIE_MEMBER = "samcli/local/rapid/aws-lambda-rie-x86_64"
INVOKE_PATH = "/2015-03-31/functions/function/invocations"
OVERRIDE = Path(__file__).resolve().parent / "lambda-emulator.yaml"  # a compose override file
# The template's functions, by the name of their compose service (lambda_<name>).
TEMPLATE_FUNCTIONS = {
    "create_user": "CreateUserFunction",
    "upload_record": "UploadRecordFunction",
    "get_record": "GetRecordFunction",
    "sweep": "SweepFunction",
}
LAMBDA_DEFAULT_TMP_MB = 512  # Lambda's /tmp without EphemeralStorage


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "record-service" / f"aws-sam-cli-{SAM_CLI_VERSION}"


def _pip() -> list[str]:
    """A pip to download with: this interpreter's, else uv's, else the system's."""
    probe = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True)
    if probe.returncode == 0:
        return [sys.executable, "-m", "pip"]
    if shutil.which("uv"):
        return ["uv", "tool", "run", "--from", "pip", "pip"]
    return ["python3", "-m", "pip"]


def rie_binary(cache: Path | None = None) -> Path:
    """The emulator binary, taken from the pinned aws-sam-cli wheel (downloaded once)."""
    folder = cache or cache_dir()
    binary = folder / "aws-lambda-rie"
    if binary.exists():
        return binary
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        subprocess.run(
            [*_pip(), "download", "--no-deps", "--only-binary=:all:", "--dest", scratch,
             f"aws-sam-cli=={SAM_CLI_VERSION}"],
            check=True, capture_output=True, timeout=600,
        )  # fmt: skip
        wheel = Path(scratch) / SAM_CLI_WHEEL
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != SAM_CLI_WHEEL_SHA256:
            raise RuntimeError(f"{SAM_CLI_WHEEL}: sha256 {digest}, expected {SAM_CLI_WHEEL_SHA256}")
        partial = Path(scratch) / "aws-lambda-rie"
        with zipfile.ZipFile(wheel) as archive:
            partial.write_bytes(archive.read(RIE_MEMBER))
        partial.chmod(0o755)
        partial.replace(binary)
    return binary


@dataclass(frozen=True, slots=True)
class Limits:
    memory_mb: int
    tmp_mb: int
    timeout_seconds: int


def _tagless_yaml(text: str) -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def tagged(loader: yaml.SafeLoader, _suffix: str, node: yaml.Node) -> Any:
        tag = node.tag.lstrip("!")
        if isinstance(node, yaml.ScalarNode):
            return {tag: loader.construct_scalar(node)}
        if isinstance(node, yaml.SequenceNode):
            return {tag: loader.construct_sequence(node)}
        return {tag: loader.construct_mapping(node)}  # type: ignore[arg-type]

    Loader.add_multi_constructor("!", tagged)
    return yaml.load(text, Loader=Loader)  # noqa: S506 - SafeLoader with the CloudFormation tags


def template_limits(template: Path) -> dict[str, Limits]:
    """MemorySize, EphemeralStorage and Timeout of each function in the AWS template."""
    doc = _tagless_yaml(template.read_text())
    parameters = doc.get("Parameters", {})

    def value(raw: Any) -> int:
        if isinstance(raw, dict) and "Ref" in raw:
            return int(parameters[raw["Ref"]]["Default"])
        return int(raw)

    limits = {}
    for name, logical_id in TEMPLATE_FUNCTIONS.items():
        props = doc["Resources"][logical_id]["Properties"]
        tmp = props.get("EphemeralStorage", {}).get("Size", LAMBDA_DEFAULT_TMP_MB)
        limits[name] = Limits(value(props["MemorySize"]), value(tmp), value(props["Timeout"]))
    return limits


def compose_variables(limits: Mapping[str, Limits]) -> dict[str, str]:
    """The override's variables for the template's limits (CREATE_USER_MEMORY_MB, ...)."""
    variables = {}
    for name, limit in limits.items():
        prefix = name.upper()
        variables[f"{prefix}_MEMORY_MB"] = str(limit.memory_mb)
        variables[f"{prefix}_TMP_MB"] = str(limit.tmp_mb)
        variables[f"{prefix}_TIMEOUT"] = str(limit.timeout_seconds)
    return variables


@dataclass(frozen=True, slots=True)
class Invocation:
    result: Any  # the function's JSON answer (a proxy response, batchItemFailures, ...)
    seconds: float  # wall time of the POST, as the caller saw it

    @property
    def function_error(self) -> str | None:
        """The emulator's errorType when the function raised (Lambda's FunctionError)."""
        if isinstance(self.result, dict) and "errorType" in self.result:
            return str(self.result["errorType"])
        return None


def invoke(port: int, event: Mapping[str, Any], timeout: float = 60.0) -> Invocation:
    """One synchronous invocation, as Lambda's Invoke API makes it."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{INVOKE_PATH}", data=json.dumps(event).encode(), method="POST"
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http://127.0.0.1
        body = response.read()
    elapsed = time.perf_counter() - started
    return Invocation(json.loads(body) if body else None, elapsed)


def wait_listening(port: int, timeout: float = 60.0) -> None:
    """Until the emulator answers HTTP on ``port`` (a GET, which starts no init)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered: the emulator is up
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no emulator on 127.0.0.1:{port} after {timeout:g} s") from None
            time.sleep(0.05)


@dataclass(frozen=True, slots=True)
class ColdStart:
    function: str
    first_seconds: float  # the first invocation of a new environment: init included
    second_seconds: float
    warm_seconds: float  # the best of the invocations after the second
    init_ms: float | None  # the emulator's INIT REPORT, when it logged one


_INIT_REPORT = re.compile(r"INIT REPORT\(durationMs: ([0-9.]+)\)")


def cold_start(
    restart: Callable[[], None],
    logs: Callable[[], str],
    port: int,
    function: str,
    event: Callable[[], Mapping[str, Any]],
    warm_runs: int = 5,
) -> ColdStart:
    """Restart the function's container, then time its first, second and later invocations.

    ``event`` makes a fresh event per invocation (a new user each time, say); an answer that is
    not a 2xx or 3xx proxy response is an error, so a fast failure never passes for a fast start.
    """
    restart()
    wait_listening(port)
    timings = []
    for _ in range(2 + warm_runs):
        invocation = invoke(port, event())
        result = invocation.result
        status = result.get("statusCode") if isinstance(result, dict) else None
        if not isinstance(status, int) or not 200 <= status < 400:
            raise RuntimeError(f"{function}: the invocation answered {invocation.result!r:.300}")
        timings.append(invocation.seconds)
    found = _INIT_REPORT.findall(logs())
    return ColdStart(
        function, timings[0], timings[1], min(timings[2:]), float(found[-1]) if found else None
    )


@dataclass(frozen=True, slots=True)
class ImportTree:
    total_ms: float
    by_package: list[tuple[str, float]]  # self time summed per top-level package, largest first
    slowest: list[tuple[str, float]]  # modules with the largest cumulative time


def parse_importtime(stderr: str, top: int = 12) -> ImportTree:
    """``-X importtime`` output: the total, and where it went."""
    per_package: dict[str, int] = {}
    cumulative: list[tuple[str, int]] = []
    total = 0
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cum_us, name = line.removeprefix("import time:").split("|", 2)
        module = name.strip()
        package = module.split(".")[0]
        per_package[package] = per_package.get(package, 0) + int(self_us)
        cumulative.append((module, int(cum_us)))
        total += int(self_us)
    by_package = sorted(per_package.items(), key=lambda item: -item[1])[:top]
    slowest = sorted(cumulative, key=lambda item: -item[1])[:top]
    return ImportTree(
        total / 1000,
        [(name, us / 1000) for name, us in by_package],
        [(name, us / 1000) for name, us in slowest],
    )


# What a function's init imports: the runtime client, then the handler module, which (with
# AWS_LAMBDA_RUNTIME_API set) builds the function's app as it does on Lambda.
INIT_IMPORTS = "import awslambdaric.bootstrap, common.platform.aws_lambda"


def import_tree_argv(image: str, target: str) -> list[str]:
    """``docker run`` argv: -X importtime of the init's imports in ``image`` (no network)."""
    return [
        "docker", "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--network", "none",  # noqa: S108 - in the container
        "-e", f"FUNCTION_TARGET={target}", "-e", "AWS_LAMBDA_RUNTIME_API=127.0.0.1:9",
        "--entrypoint", "python", image, "-X", "importtime", "-c", INIT_IMPORTS,
    ]  # fmt: skip


def import_tree(image: str, target: str, env: Mapping[str, str] | None = None) -> ImportTree:
    done = subprocess.run(
        import_tree_argv(image, target), capture_output=True, text=True, env=env, timeout=120
    )
    if done.returncode != 0:
        raise RuntimeError(f"importing the init of {target} failed: {done.stderr[-500:]}")
    return parse_importtime(done.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["rie"]:
        sys.stderr.write("usage: python -m devstack.lambda_emulator rie\n")
        return 2
    sys.stdout.write(f"{rie_binary()}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
