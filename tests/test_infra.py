"""The deployment definitions, checked offline: cfn-lint on the CloudFormation template, the
Cloud Run services and URL map by structure, the routes of both against the service's paths,
every environment variable against the settings the code reads, and the deploy scripts' steps.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from common.domain import uploads as direct_upload
from common.ops import bucket
from conftest import ROOT
from devstack import FUNCTIONS
from render_template import render_template

AWS_TEMPLATE = ROOT / "infra" / "aws" / "template.yaml"
GCP = ROOT / "infra" / "gcp"
UPLOAD_ID = str(uuid.uuid4())
# Every request the service answers, and the function that must answer it.
ROUTES = {
    ("POST", "/users"): "create_user",
    ("POST", "/records"): "upload_record",
    ("POST", "/records/uploads"): "upload_record",
    ("POST", f"/records/uploads/{UPLOAD_ID}/complete"): "upload_record",
    ("GET", "/record"): "get_record",
    ("HEAD", "/record"): "get_record",
}
PLATFORM_VARIABLES = {
    "FUNCTION_TARGET", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WORKERS", "THREADS",
}  # fmt: skip


def settings_variables() -> set[str]:
    """The environment variables common.settings reads (its quoted UPPER_CASE names)."""
    source = (ROOT / "common" / "src" / "common" / "settings.py").read_text()
    return set(re.findall(r'"([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)"', source)) | {"PORT"}


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form tags (!Ref, !GetAtt ...) as {"Ref": ...} maps."""


def _cfn_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        assert isinstance(node, yaml.MappingNode)
        value = loader.construct_mapping(node, deep=True)
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    return {name: value}


_CfnLoader.add_multi_constructor("!", _cfn_tag)


def load_template() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.load(AWS_TEMPLATE.read_text(), Loader=_CfnLoader)  # noqa: S506
    return loaded


# --- AWS ----------------------------------------------------------------------------------------


def cfn_lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "cfn-lint"), "--format", "parseable", str(path)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_cfn_lint_passes() -> None:
    result = cfn_lint(AWS_TEMPLATE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cfn_lint_really_checks(tmp_path: Path) -> None:
    """The same run fails a broken copy: the lint above is not vacuous."""
    broken = tmp_path / "template.yaml"
    text = AWS_TEMPLATE.read_text()
    broken.write_text(text.replace("PackageType: Image", "PackageType: Imagee", 1))
    result = cfn_lint(broken)
    assert result.returncode != 0
    assert "Imagee" in result.stdout


def _resources(kind: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in load_template()["Resources"].items() if v["Type"] == kind}


def test_three_image_functions_one_per_target() -> None:
    functions = _resources("AWS::Lambda::Function")
    targets = {}
    for name, resource in functions.items():
        props = resource["Properties"]
        assert props["PackageType"] == "Image"
        assert "ImageUri" in props["Code"]
        assert "Handler" not in props and "Runtime" not in props  # the image's entry point
        env = props["Environment"]["Variables"]
        targets[env["FUNCTION_TARGET"]] = name
        unknown = set(env) - settings_variables() - PLATFORM_VARIABLES
        assert not unknown, f"{name} sets variables the code never reads: {unknown}"
        assert env["DATABASE_URL"] == {"Ref": "DatabaseUrl"}
    assert sorted(targets) == sorted(FUNCTIONS)
    get_env = functions[targets["get_record"]]["Properties"]["Environment"]["Variables"]
    assert get_env["DOWNLOAD_MODE"] == "redirect"  # Lambda's 6 MB response cap
    upload = functions[targets["upload_record"]]["Properties"]
    assert upload["Timeout"] == 900
    # Request bodies: 6 MB, base64 (4/3) included.
    params = load_template()["Parameters"]
    assert params["MaxUploadBytes"]["MaxValue"] * 4 / 3 < 6_000_000
    assert params["DatabaseUrl"]["NoEcho"] is True


def test_http_api_routes_every_path_to_its_function() -> None:
    functions = {
        props["Properties"]["Environment"]["Variables"]["FUNCTION_TARGET"]: name
        for name, props in _resources("AWS::Lambda::Function").items()
    }
    integrations = {
        name: str(r["Properties"]["IntegrationUri"]["Fn::GetAtt"]).split(".")[0]
        for name, r in _resources("AWS::ApiGatewayV2::Integration").items()
    }
    for r in _resources("AWS::ApiGatewayV2::Integration").values():
        assert r["Properties"]["PayloadFormatVersion"] == "2.0"
    routes: dict[tuple[str, str], str] = {}
    for r in _resources("AWS::ApiGatewayV2::Route").values():
        method, path = r["Properties"]["RouteKey"].split(" ", 1)
        target = r["Properties"]["Target"]["Fn::Sub"]
        integration = re.fullmatch(r"integrations/\$\{(\w+)\}", target)
        assert integration, target
        routes[(method, path)] = integrations[integration.group(1)]

    def route_for(method: str, path: str) -> str | None:
        for (m, pattern), function in routes.items():
            regex = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(pattern))
            if m == method and re.fullmatch(regex, path):
                return function
        return None

    for (method, path), target in ROUTES.items():
        assert route_for(method, path) == functions[target], (method, path)
    permissions = _resources("AWS::Lambda::Permission")
    invoked_by_api = {
        p["Properties"]["FunctionName"]["Ref"]
        for p in permissions.values()
        if p["Properties"]["Principal"] == "apigateway.amazonaws.com"
    }
    assert invoked_by_api == set(functions.values())


def _cloudformation_rule(rule: Any) -> dict[str, Any]:
    """One rule of common.ops.bucket.LIFECYCLE_RULES as CloudFormation spells it."""
    out: dict[str, Any] = {"Id": rule["ID"], "Status": rule["Status"]}
    out["Prefix"] = rule["Filter"]["Prefix"]
    if "AbortIncompleteMultipartUpload" in rule:
        out["AbortIncompleteMultipartUpload"] = rule["AbortIncompleteMultipartUpload"]
    if "Expiration" in rule:
        out["ExpirationInDays"] = rule["Expiration"]["Days"]
    return out


def _gcs_rule(rule: Any) -> dict[str, Any]:
    """The same rule as a Cloud Storage lifecycle rule (gcloud's JSON)."""
    if "AbortIncompleteMultipartUpload" in rule:
        action = "AbortIncompleteMultipartUpload"
        age = rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"]
    else:
        action, age = "Delete", rule["Expiration"]["Days"]
    condition: dict[str, Any] = {"age": age}
    if rule["Filter"]["Prefix"]:
        condition["matchesPrefix"] = [rule["Filter"]["Prefix"]]
    return {"action": {"type": action}, "condition": condition}


def _unordered(rules: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in rules)


def test_bucket_lifecycle_is_the_one_in_common() -> None:
    (bucket_resource,) = _resources("AWS::S3::Bucket").values()
    rules = bucket_resource["Properties"]["LifecycleConfiguration"]["Rules"]
    assert _unordered(rules) == _unordered(
        [_cloudformation_rule(r) for r in bucket.LIFECYCLE_RULES]
    )
    expire = [r for r in rules if r.get("Prefix") == direct_upload.PENDING_PREFIX]
    assert expire and expire[0]["ExpirationInDays"] == bucket.EXPIRE_PENDING_UPLOADS_AFTER_DAYS
    cors = bucket_resource["Properties"]["CorsConfiguration"]["CorsRules"][0]
    assert "POST" in cors["AllowedMethods"]  # browsers post direct uploads to the bucket


# --- GCP ----------------------------------------------------------------------------------------

GCP_VALUES = {
    "PROJECT_ID": "records-prod",
    "CLOUDSQL_INSTANCE": "records-prod:europe-west1:records",
    "SERVICE_ACCOUNT": "records-runtime@records-prod.iam.gserviceaccount.com",
    "BUCKET": "records-prod-records",
    "DOWNLOAD_MODE": "redirect",
    "MAX_UPLOAD_BYTES": "31457280",
    "MAX_DIRECT_UPLOAD_BYTES": "4294967296",
    "PUBLIC_BASE_URL": "",
    "IMAGE_CREATE_USER": "europe-west1-docker.pkg.dev/records-prod/records/create-user:1",
    "IMAGE_UPLOAD_RECORD": "europe-west1-docker.pkg.dev/records-prod/records/upload-record:1",
    "IMAGE_GET_RECORD": "europe-west1-docker.pkg.dev/records-prod/records/get-record:1",
}


def rendered(name: str) -> dict[str, Any]:
    text = render_template((GCP / name).read_text(), GCP_VALUES)
    assert "${" not in text, f"{name} has a placeholder the deploy script does not fill"
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


def _is_str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


@pytest.mark.parametrize("function", FUNCTIONS)
def test_cloud_run_service_structure(function: str) -> None:
    """The Knative Service subset Cloud Run accepts, field by field."""
    service = rendered(f"{function.replace('_', '-')}.yaml")
    assert service["apiVersion"] == "serving.knative.dev/v1"
    assert service["kind"] == "Service"
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,47}[a-z0-9])?", service["metadata"]["name"])
    assert _is_str_map(service["metadata"].get("annotations", {}))
    template = service["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert _is_str_map(annotations)  # Knative annotations must be strings
    assert annotations["run.googleapis.com/cloudsql-instances"] == GCP_VALUES["CLOUDSQL_INSTANCE"]
    assert annotations["run.googleapis.com/startup-cpu-boost"] == "true"
    spec = template["spec"]
    assert set(spec) <= {"containers", "containerConcurrency", "timeoutSeconds",
                         "serviceAccountName", "volumes"}  # fmt: skip
    assert isinstance(spec["containerConcurrency"], int) and spec["containerConcurrency"] >= 1
    assert isinstance(spec["timeoutSeconds"], int) and 1 <= spec["timeoutSeconds"] <= 3600
    (container,) = spec["containers"]
    assert container["image"] == GCP_VALUES[f"IMAGE_{function.upper()}"]
    assert container["ports"] == [{"name": "http1", "containerPort": 8080}]
    assert "command" not in container and "args" not in container  # the image's entry point
    env: dict[str, Any] = {}
    for item in container["env"]:
        assert set(item) in ({"name", "value"}, {"name", "valueFrom"}), item
        if "value" in item:
            assert isinstance(item["value"], str), item  # quoted: Knative wants strings
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert set(ref) == {"name", "key"}
        env[item["name"]] = item.get("value", item.get("valueFrom"))
    assert env["FUNCTION_TARGET"] == function
    assert int(env["THREADS"]) == spec["containerConcurrency"]  # no queueing in the container
    assert env["GOOGLE_CLOUD_PROJECT"] == GCP_VALUES["PROJECT_ID"]
    assert env["S3_ENDPOINT_URL"] == "https://storage.googleapis.com"
    for secret in ("DATABASE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[secret], secret
    assert "PORT" not in env  # Cloud Run sets it
    unknown = set(env) - settings_variables() - PLATFORM_VARIABLES
    assert not unknown, unknown
    if function == "upload_record":
        # Direct uploads past Cloud Run's 32 MiB HTTP/1 request cap; long conversions.
        assert int(env["MAX_UPLOAD_BYTES"]) < 32 * 2**20
        assert spec["timeoutSeconds"] >= 900


def test_url_map_routes_every_path_to_its_service() -> None:
    url_map = rendered("url-map.yaml")
    services = {rendered(f"{f.replace('_', '-')}.yaml")["metadata"]["name"]: f for f in FUNCTIONS}
    prefix = f"projects/{GCP_VALUES['PROJECT_ID']}/global/backendServices/"
    (host_rule,) = url_map["hostRules"]
    (matcher,) = [m for m in url_map["pathMatchers"] if m["name"] == host_rule["pathMatcher"]]

    def backend_for(path: str) -> str:
        # The URL map semantics: exact paths, or a prefix ending in /*; the longest wins.
        best, best_len = matcher["defaultService"], -1
        for rule in matcher["pathRules"]:
            for pattern in rule["paths"]:
                assert pattern.startswith("/") and "*" not in pattern[:-1], pattern
                hit = fnmatch.fnmatchcase(path, pattern) if pattern.endswith("/*") else (
                    path == pattern)  # fmt: skip
                if hit and len(pattern) > best_len:
                    best, best_len = rule["service"], len(pattern)
        service: str = best
        return service

    for (_method, path), function in ROUTES.items():
        backend = backend_for(path)
        assert backend.startswith(prefix), backend
        assert services[backend.removeprefix(prefix)] == function, path


def test_gcs_lifecycle_and_cors() -> None:
    lifecycle = json.loads((GCP / "bucket-lifecycle.json").read_text())["rule"]
    assert _unordered(lifecycle) == _unordered([_gcs_rule(r) for r in bucket.LIFECYCLE_RULES])
    cors = json.loads((GCP / "bucket-cors.json").read_text())
    assert "POST" in cors[0]["method"]


# --- the deploy scripts -------------------------------------------------------------------------


def dry_run(script: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / script)],
        env={
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/tmp"),
            "DRY_RUN": "1",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_deploy_aws_steps() -> None:
    secret = "s3cr3t-password"
    out = dry_run(
        "deploy_aws.sh",
        {"AWS_REGION": "eu-west-1", "DATABASE_URL": f"postgresql://u:{secret}@db:5432/records"},
    )
    for function in FUNCTIONS:
        assert f"--build-arg FUNCTION={function}" in out
    assert "--provenance=false" in out  # Lambda refuses OCI index manifests
    assert "aws cloudformation deploy --template-file infra/aws/template.yaml" in out
    assert "alembic upgrade head" in out
    assert secret not in out
    missing = subprocess.run(["bash", str(ROOT / "scripts" / "deploy_aws.sh")],
                             env={"PATH": os.environ["PATH"]}, capture_output=True, text=True,
                             check=False, timeout=30)  # fmt: skip
    assert missing.returncode != 0 and "AWS_REGION" in missing.stderr


def test_deploy_gcp_steps() -> None:
    secret = "s3cr3t-password"
    out = dry_run(
        "deploy_gcp.sh",
        {
            "PROJECT_ID": "records-prod",
            "REGION": "europe-west1",
            "CLOUDSQL_INSTANCE": "records-prod:europe-west1:records",
            "DATABASE_URL": f"postgresql://records:{secret}@/records?host=/cloudsql/x",
        },
    )
    for function in FUNCTIONS:
        assert "run services replace" in out and f"--build-arg FUNCTION={function}" in out
    assert "storage hmac create" in out
    assert "--lifecycle-file=infra/gcp/bucket-lifecycle.json" in out
    assert "compute url-maps import records-url-map" in out
    assert "alembic,-c,/app/alembic.ini,upgrade,head" in out
    assert secret not in out
