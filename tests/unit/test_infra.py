"""The deployment definitions, checked offline: cfn-lint on the CloudFormation template, the
Cloud Run services and URL map by structure, the routes of both against the service's paths,
every environment variable against the settings the code reads, and the deploy scripts' steps.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from common.domain import uploads as direct_upload
from common.errors import PROBLEM_CONTENT_TYPE
from common.http.origin import ORIGIN_VERIFY_HEADER
from common.ops import bucket
from common.platform import aws_lambda
from common.platform.runtime import Services, set_services
from common.settings import Settings
from devstack.lambda_events import event, event_fixture
from devstack.native import DEFAULT_RATE_LIMIT_BURST, DEFAULT_RATE_LIMIT_RPS, FUNCTIONS
from devstack.templates import render_template

from tests.support import ROOT, image_botocore_services

AWS_TEMPLATE = ROOT / "infra" / "aws" / "template.yaml"
EDGE_TEMPLATE = ROOT / "infra" / "aws" / "edge.yaml"
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
# The other routes of the API (docs/api.md), each served on the clouds by its function too.
MORE_ROUTES = {
    ("POST", f"/users/{UPLOAD_ID}/token"): "create_user",
    ("DELETE", f"/users/{UPLOAD_ID}"): "create_user",
    ("GET", f"/records/uploads/{UPLOAD_ID}"): "upload_record",
    ("DELETE", "/record"): "upload_record",
    ("GET", "/records"): "get_record",
}
PLATFORM_VARIABLES = {
    "FUNCTION_TARGET", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WORKERS", "THREADS",
    "IDEMPOTENCY_SECRET_ARN", "ORIGIN_VERIFY_SECRET_ARN",  # aws_lambda.export_secrets
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


def load_template(path: Path = AWS_TEMPLATE) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.load(path.read_text(), Loader=_CfnLoader)  # noqa: S506
    return loaded


# --- AWS ----------------------------------------------------------------------------------------


def cfn_lint(path: Path) -> subprocess.CompletedProcess[str]:
    """cfn-lint with the serverless rules (cfn-lint-serverless) appended."""
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "cfn-lint"),
            "--append-rules",
            "cfn_lint_serverless.rules",
            "--format",
            "parseable",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.mark.parametrize("template", [AWS_TEMPLATE, EDGE_TEMPLATE], ids=lambda p: p.name)
def test_cfn_lint_passes(template: Path) -> None:
    result = cfn_lint(template)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cfn_lint_really_checks(tmp_path: Path) -> None:
    """The same run fails a broken copy: the lint above is not vacuous."""
    broken = tmp_path / "template.yaml"
    text = AWS_TEMPLATE.read_text()
    broken.write_text(text.replace("PackageType: Image", "PackageType: Imagee", 1))
    result = cfn_lint(broken)
    assert result.returncode != 0
    assert "Imagee" in result.stdout


def _resources(kind: str, path: Path = AWS_TEMPLATE) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in load_template(path)["Resources"].items() if v["Type"] == kind}


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
        assert env["DATABASE_SECRET_ARN"] == {"Ref": "DatabaseSecretArn"}
    assert sorted(targets) == sorted([*FUNCTIONS, "sweep", "migrate"])
    get_env = functions[targets["get_record"]]["Properties"]["Environment"]["Variables"]
    assert get_env["DOWNLOAD_MODE"] == "redirect"  # Lambda's 6 MB response cap
    upload = functions[targets["upload_record"]]["Properties"]
    assert upload["Timeout"] == 900
    # Request bodies: 6 MB, base64 (4/3) included.
    params = load_template()["Parameters"]
    assert params["MaxUploadBytes"]["MaxValue"] * 4 / 3 < 6_000_000
    assert "DatabaseUrl" not in params and "DatabasePassword" not in params


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

    for (method, path), target in {**ROUTES, **MORE_ROUTES}.items():
        assert route_for(method, path) == functions[target], (method, path)
    permissions = _resources("AWS::Lambda::Permission")
    invoked_by_api = {
        p["Properties"]["FunctionName"]["Ref"]
        for p in permissions.values()
        if p["Properties"]["Principal"] == "apigateway.amazonaws.com"
    }
    assert invoked_by_api == {functions[f] for f in FUNCTIONS}


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
    bucket_resource = _resources("AWS::S3::Bucket")["RecordsBucket"]
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
    "SA_CREATE_USER": "records-create-user@records-prod.iam.gserviceaccount.com",
    "SA_UPLOAD_RECORD": "records-upload-record@records-prod.iam.gserviceaccount.com",
    "SA_GET_RECORD": "records-get-record@records-prod.iam.gserviceaccount.com",
    "MAX_INSTANCES_CREATE_USER": "2",
    "MAX_INSTANCES_UPLOAD_RECORD": "3",
    "MAX_INSTANCES_GET_RECORD": "3",
    "DB_POOL_SIZE_CREATE_USER": "4",
    "DB_POOL_SIZE_UPLOAD_RECORD": "2",
    "DB_POOL_SIZE_GET_RECORD": "4",
    "CLOUD_TASKS_QUEUE": "projects/records-prod/locations/europe-west1/queues/records-jobs",
    "TASKS_TARGET_URL": "https://records-upload-record-1.europe-west1.run.app/_tasks/convert",
    "TASKS_SERVICE_ACCOUNT": "records-tasks@records-prod.iam.gserviceaccount.com",
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
    for secret in ("DATABASE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                   "IDEMPOTENCY_SECRET"):  # fmt: skip
        assert "secretKeyRef" in env[secret], secret
    # Each function has its own account and its own HMAC key (least privilege).
    assert spec["serviceAccountName"] == GCP_VALUES[f"SA_{function.upper()}"]
    svc = function.replace("_", "-")
    assert env["AWS_ACCESS_KEY_ID"]["secretKeyRef"]["name"] == f"records-hmac-{svc}-id"
    assert env["WORKERS"] == "1" and env["DB_POOL_OVERFLOW"] == "0"
    assert annotations["autoscaling.knative.dev/maxScale"] == (
        GCP_VALUES[f"MAX_INSTANCES_{function.upper()}"])  # fmt: skip
    assert env["DB_POOL_SIZE"] == GCP_VALUES[f"DB_POOL_SIZE_{function.upper()}"]
    assert service["metadata"]["namespace"] == GCP_VALUES["PROJECT_ID"]
    assert "PORT" not in env  # Cloud Run sets it
    unknown = set(env) - settings_variables() - PLATFORM_VARIABLES
    assert not unknown, unknown
    if function == "upload_record":
        # Direct uploads past Cloud Run's 32 MiB HTTP/1 request cap; long conversions.
        assert int(env["MAX_UPLOAD_BYTES"]) < 32 * 2**20
        assert spec["timeoutSeconds"] == 3600
        assert env["JOB_QUEUE"] == "cloudtasks"
        for name in ("CLOUD_TASKS_QUEUE", "TASKS_TARGET_URL", "TASKS_SERVICE_ACCOUNT"):
            assert env[name] == GCP_VALUES[name], name
        assert env["TASKS_AUDIENCE"] == GCP_VALUES["TASKS_TARGET_URL"]


def test_url_map_routes_every_path_to_its_service() -> None:
    url_map = rendered("url-map.yaml")
    services = {rendered(f"{f.replace('_', '-')}.yaml")["metadata"]["name"]: f for f in FUNCTIONS}
    prefix = f"projects/{GCP_VALUES['PROJECT_ID']}/global/backendServices/"
    (host_rule,) = url_map["hostRules"]
    (matcher,) = [m for m in url_map["pathMatchers"] if m["name"] == host_rule["pathMatcher"]]

    def matches(rule: dict[str, Any], method: str, path: str) -> bool:
        if "fullPathMatch" in rule and path != rule["fullPathMatch"]:
            return False
        if "prefixMatch" in rule and not path.startswith(rule["prefixMatch"]):
            return False
        for header in rule.get("headerMatches", []):
            assert header["headerName"] == ":method", header
            if method != header["exactMatch"]:
                return False
        return True

    def backend_for(method: str, path: str) -> str:
        # The URL map semantics: route rules in priority order, the first match wins.
        for route in sorted(matcher["routeRules"], key=lambda r: r["priority"]):
            if any(matches(rule, method, path) for rule in route["matchRules"]):
                service: str = route["service"]
                return service
        default: str = matcher["defaultService"]
        return default

    assert "pathRules" not in matcher  # a path matcher has either pathRules or routeRules
    for (method, path), function in {**ROUTES, **MORE_ROUTES}.items():
        backend = backend_for(method, path)
        assert backend.startswith(prefix), backend
        assert services[backend.removeprefix(prefix)] == function, (method, path)
    # The job push endpoint is never routed to the service that runs jobs.
    assert services[backend_for("POST", "/_tasks/convert").removeprefix(prefix)] == "get_record"


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


AWS_ENV = {
    "AWS_REGION": "eu-west-1",
    "DATABASE_HOST": "records.abc123.eu-west-1.rds.amazonaws.com",
    "DATABASE_SECRET_ARN": "arn:aws:secretsmanager:eu-west-1:111122223333:secret:rds-Ab12Cd",
    "DB_MAX_CONNECTIONS": "100",
}
GCP_ENV = {
    "PROJECT_ID": "records-prod",
    "REGION": "europe-west1",
    "CLOUDSQL_INSTANCE": "records-prod:europe-west1:records",
    "DATABASE_URL": "postgresql://records:s3cr3t-password@/records?host=/cloudsql/x",
    "DB_MAX_CONNECTIONS": "50",
    "DOMAIN": "records.acme.test",
}


def refused(script: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / script)],
        env={"PATH": os.environ["PATH"], "HOME": "/tmp", "DRY_RUN": "1", **env},
        capture_output=True, text=True, check=False, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "==> 1/" not in result.stdout  # nothing started: no partial deployment
    return result.stderr


def _steps(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(("==>", "+"))]


def _index(lines: list[str], needle: str) -> int:
    found = [i for i, line in enumerate(lines) if needle in line]
    assert found, needle
    return found[0]


def test_deploy_aws_steps_in_the_safe_order() -> None:
    out = dry_run("deploy_aws.sh", AWS_ENV)
    for function in FUNCTIONS:
        assert f"--build-arg FUNCTION={function}" in out
    assert "--provenance=false" in out  # Lambda refuses OCI index manifests
    lines = _steps(out)
    # The edge stack (the CloudFront web ACL) first, in us-east-1: the service stack's
    # distribution needs its ARN.
    edge = _index(lines, "--template-file infra/aws/edge.yaml")
    assert "aws cloudformation deploy --region us-east-1 --stack-name records-edge" in lines[edge]
    assert "RateLimitPerMinute=6300" in lines[edge]  # 100/s x 60 s + a burst of 300
    assert _index(lines, "describe-stacks --region us-east-1 --stack-name records-edge") > edge
    deploys = [i for i, line in enumerate(lines) if "infra/aws/template.yaml" in line]
    migrate = _index(lines, "aws lambda invoke --function-name records-migrate")
    assert len(deploys) == 2 and edge < deploys[0] < migrate < deploys[1]
    first, second = lines[deploys[0]], lines[deploys[1]]
    for line in (first, second):
        assert "--region eu-west-1" in line
        assert "EdgeWebAclArn=arn:aws:wafv2:us-east-1:123456789012:global/webacl/" in line
        assert "RateLimitRps=100 RateLimitBurst=300" in line
    assert "MigrateImageUri=" in first and "GetRecordImageUri" not in first  # old code serves
    assert "GetRecordImageUri=" in second and "CreateUserImageUri=" in second
    assert max(_index(lines, "docker buildx build"), 0) < deploys[0]
    assert "uv run --frozen alembic" not in out  # no migration from the deploying machine
    assert "connection budget: 37 environments" in out


def test_deploy_aws_refuses_missing_placeholder_and_over_budget() -> None:
    assert "AWS_REGION" in refused("deploy_aws.sh", {})
    placeholder = {**AWS_ENV, "DATABASE_SECRET_ARN": "<secret arn>"}
    assert "DATABASE_SECRET_ARN" in refused("deploy_aws.sh", placeholder)
    with_password = {**AWS_ENV, "DATABASE_HOST": "records:pw@db"}
    assert "credentials" in refused("deploy_aws.sh", with_password)
    assert "connection budget 74 exceeds 40" in refused(
        "deploy_aws.sh", {**AWS_ENV, "DB_MAX_CONNECTIONS": "50"}
    )
    proxy = refused("deploy_aws.sh", {**AWS_ENV, "USE_RDS_PROXY": "true"})
    assert "DATABASE_INSTANCE_ID" in proxy and "SUBNET_IDS" in proxy
    for bad in ("0", "fast"):
        assert "RATE_LIMIT_RPS" in refused("deploy_aws.sh", {**AWS_ENV, "RATE_LIMIT_RPS": bad})


def test_deploy_gcp_steps_in_the_safe_order() -> None:
    out = dry_run("deploy_gcp.sh", GCP_ENV)
    assert "s3cr3t-password" not in out
    lines = _steps(out)
    migrate = _index(lines, "run jobs execute records-migrate")
    assert "--wait" in lines[migrate]
    services = [i for i, line in enumerate(lines) if "run services replace" in line]
    assert len(services) == 3 and migrate < min(services)
    assert _index(lines, "docker buildx build") < migrate
    assert _index(lines, "tasks queues create records-jobs") < min(services)
    assert (
        "--set-env-vars FUNCTION_TARGET=migrate"
        in lines[_index(lines, "jobs deploy records-migrate")]
    )
    sweep = lines[_index(lines, "run jobs deploy records-sweep")]
    assert "FUNCTION_TARGET=sweep" in sweep
    assert "scheduler jobs create http records-sweep" in out
    # HTTPS by default: a managed certificate, port 443, port 80 only redirects.
    assert "ssl-certificates create records-cert --global --domains=records.acme.test" in out
    assert "--target-https-proxy=records-https-proxy --ports=443" in out
    assert "target-http-proxies create records-http-proxy --url-map=records-http-redirect" in out
    # Cloud Armor: the router's defaults per client address, on every backend.
    assert "--rate-limit-threshold-count=1300 --rate-limit-threshold-interval-sec=10" in out
    assert "--enforce-on-key=IP" in out and "--exceed-action=deny-429" in out
    assert (
        out.count("--security-policy=records-armor\n")
        + out.count("--security-policy=records-armor")
        >= 3
    )
    assert "storage hmac create records-get-record@" in out
    assert "--lifecycle-file=infra/gcp/bucket-lifecycle.json" in out
    assert "compute url-maps import records-url-map" in out
    assert "roles/storage.objectAdmin" not in out  # each account gets only what it uses


def test_deploy_gcp_http_only_is_explicit_and_refusals() -> None:
    assert "DOMAIN" in refused("deploy_gcp.sh", {k: v for k, v in GCP_ENV.items() if k != "DOMAIN"})
    http_only = {k: v for k, v in GCP_ENV.items() if k != "DOMAIN"} | {"HTTP_ONLY": "1"}
    out = dry_run("deploy_gcp.sh", http_only)
    assert "ssl-certificates" not in out and "records-http-redirect" not in out
    assert "HTTP_ONLY=1: plain HTTP" in out
    placeholder = {**GCP_ENV, "PROJECT_ID": "my-project"}
    assert "PROJECT_ID" in refused("deploy_gcp.sh", placeholder)
    small = {**GCP_ENV, "DB_MAX_CONNECTIONS": "25"}  # db-f1-micro
    assert "connection budget 28 exceeds 20" in refused("deploy_gcp.sh", small)


def test_gcp_http_redirect_map() -> None:
    redirect = yaml.safe_load((GCP / "http-redirect.yaml").read_text())
    assert redirect["defaultUrlRedirect"]["httpsRedirect"] is True
    assert "defaultService" not in redirect


# --- GCP alerting: the AWS template's alarms as Cloud Monitoring alert policies -----------------

ALERTS = GCP / "alerts"
# The metric types the policies may name, each with the monitored resource that reports it
# (Google Cloud's metrics list, run.googleapis.com and cloudtasks.googleapis.com).
KNOWN_METRICS = {
    "run.googleapis.com/request_count": "cloud_run_revision",
    "run.googleapis.com/request_latencies": "cloud_run_revision",
    "run.googleapis.com/job/completed_execution_count": "cloud_run_job",
    "run.googleapis.com/job/running_executions": "cloud_run_job",
    "cloudtasks.googleapis.com/queue/task_attempt_count": "cloud_tasks_queue",
    "cloudtasks.googleapis.com/queue/depth": "cloud_tasks_queue",
}
# The AlertPolicy and MetricThreshold fields of the Monitoring API v3 (projects.alertPolicies).
POLICY_FIELDS = {"displayName", "documentation", "userLabels", "conditions", "combiner",
                 "enabled", "notificationChannels", "alertStrategy", "severity"}  # fmt: skip
THRESHOLD_FIELDS = {"filter", "aggregations", "denominatorFilter", "denominatorAggregations",
                    "comparison", "thresholdValue", "duration", "trigger",
                    "evaluationMissingData", "forecastOptions"}  # fmt: skip
ALIGNERS = {"ALIGN_DELTA", "ALIGN_RATE", "ALIGN_SUM", "ALIGN_MAX", "ALIGN_MEAN", "ALIGN_COUNT",
            "ALIGN_PERCENTILE_99", "ALIGN_PERCENTILE_95", "ALIGN_PERCENTILE_50"}  # fmt: skip
REDUCERS = {"REDUCE_SUM", "REDUCE_MAX", "REDUCE_MEAN", "REDUCE_COUNT"}
COMPARISON = {"GreaterThanThreshold": "COMPARISON_GT", "LessThanThreshold": "COMPARISON_LT",
              "GreaterThanOrEqualToThreshold": "COMPARISON_GE",
              "LessThanOrEqualToThreshold": "COMPARISON_LE"}  # fmt: skip
# The AWS alarm (infra/aws/template.yaml) each policy file stands for.
AWS_TWINS = {
    "http-5xx-rate.yaml": ["Api5xxRateAlarm"],
    "request-latency.yaml": ["CreateUserDurationAlarm", "UploadRecordDurationAlarm",
                             "GetRecordDurationAlarm"],
    "job-attempts-failed.yaml": ["JobDeadLetterAlarm"],
    "sweep-failed.yaml": ["AsyncFailureAlarm"],
    "sweep-duration.yaml": ["SweepDurationAlarm"],
}  # fmt: skip
_TERM = r'(?:metric|resource)\.(?:type|label\.\w+)\s*!?=\s*"[^"]*"'
_TERMS = re.compile(r'((?:metric|resource)\.(?:type|label\.\w+))\s*(!?=)\s*"([^"]*)"')


def alert_policy(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ALERTS / name).read_text())
    return loaded


def filter_terms(text: str) -> dict[str, tuple[str, str]]:
    """A monitoring filter made of `key = "value"` terms joined by AND, as {key: (op, value)}."""
    assert re.fullmatch(rf"{_TERM}(\s+AND\s+{_TERM})*", text.strip()), text
    terms = {key: (op, value) for key, op, value in _TERMS.findall(text)}
    assert len(terms) == len(_TERMS.findall(text)), f"a key twice in {text}"
    return terms


def _thresholds(name: str) -> list[dict[str, Any]]:
    return [c["conditionThreshold"] for c in alert_policy(name)["conditions"]]


def _seconds(duration: str) -> int:
    assert re.fullmatch(r"\d+s", duration), duration
    return int(duration[:-1])


def test_alert_policies_are_alert_policies_on_known_metrics() -> None:
    files = sorted(p.name for p in ALERTS.glob("*"))
    assert files == sorted(AWS_TWINS)  # each file has its AWS alarm, each alarm its file
    names = [alert_policy(f)["displayName"] for f in files]
    assert len(set(names)) == len(names)  # the deploy script finds a policy by its name
    for name in files:
        policy = alert_policy(name)
        assert set(policy) <= POLICY_FIELDS, name
        assert policy["combiner"] == "OR" and policy["conditions"], name
        assert policy["documentation"]["mimeType"] == "text/markdown"
        assert "notificationChannels" not in policy  # the deploy script adds ALARM_EMAIL's
        lines = (ALERTS / name).read_text().splitlines()
        first = next(line for line in lines if line.startswith("displayName:"))
        assert first.removeprefix("displayName:").strip() == policy["displayName"]  # the sed
        for condition in policy["conditions"]:
            assert set(condition) == {"displayName", "conditionThreshold"}, name
            threshold = condition["conditionThreshold"]
            assert set(threshold) <= THRESHOLD_FIELDS, name
            assert threshold["comparison"] in COMPARISON.values()
            assert isinstance(threshold["thresholdValue"], int | float)
            assert threshold["trigger"] == {"count": 1}
            _seconds(threshold["duration"])
            terms = filter_terms(threshold["filter"])
            metric = terms["metric.type"][1]
            assert KNOWN_METRICS.get(metric) == terms["resource.type"][1], metric
            pairs = [("aggregations", threshold["filter"])]
            if "denominatorFilter" in threshold:
                denominator = filter_terms(threshold["denominatorFilter"])
                # A ratio of the same metric on the same resource, the numerator a subset.
                assert denominator.items() <= terms.items(), name
                assert denominator["metric.type"] == terms["metric.type"]
                pairs.append(("denominatorAggregations", threshold["denominatorFilter"]))
            for key, text in pairs:
                (aggregation,) = threshold[key]
                assert aggregation["perSeriesAligner"] in ALIGNERS
                assert aggregation["crossSeriesReducer"] in REDUCERS
                _seconds(aggregation["alignmentPeriod"])
                for field in aggregation["groupByFields"]:  # labels the filter pins down
                    assert field in filter_terms(text), (name, field)


def test_filter_terms_refuses_what_it_does_not_understand() -> None:
    with pytest.raises(AssertionError):
        filter_terms('metric.type="x" OR resource.type="y"')
    with pytest.raises(AssertionError):
        filter_terms('metric.type=starts_with("run.googleapis.com/")')
    assert filter_terms('metric.label.result!="ok" AND metric.type="m"') == {
        "metric.label.result": ("!=", "ok"), "metric.type": ("=", "m")}  # fmt: skip


def _aws_alarm(name: str) -> dict[str, Any]:
    props: dict[str, Any] = _resources("AWS::CloudWatch::Alarm")[name]["Properties"]
    assert props["EvaluationPeriods"] == 1 and props["TreatMissingData"] == "notBreaching"
    return props


def _same_window(threshold: dict[str, Any], alarm: dict[str, Any]) -> None:
    """One AWS evaluation period of Period seconds is one alignment period, no extra duration."""
    stats = [m["MetricStat"] for m in alarm.get("Metrics", []) if "MetricStat" in m]
    periods = {alarm.get("Period")} | {stat["Period"] for stat in stats}
    periods.discard(None)
    (period,) = periods
    assert threshold["aggregations"][0]["alignmentPeriod"] == f"{period}s"
    assert threshold["duration"] == "0s"
    assert threshold["comparison"] == COMPARISON[alarm["ComparisonOperator"]]


def _by_service(name: str, label: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for threshold in _thresholds(name):
        resource = filter_terms(threshold["filter"])[label]
        assert resource[0] == "=" and resource[1] not in found, (name, resource)
        found[resource[1]] = threshold
    return found


def _gcp_sweep_task_timeout() -> int:
    out = dry_run("deploy_gcp.sh", GCP_ENV)
    sweep = _steps(out)[_index(_steps(out), "run jobs deploy records-sweep")]
    found = re.search(r"--task-timeout (\d+)s", sweep)
    assert found, sweep
    return int(found.group(1))


def test_alert_thresholds_are_the_aws_alarms_on_every_service_queue_and_job() -> None:
    services = {f: rendered(f"{f.replace('_', '-')}.yaml") for f in FUNCTIONS}
    names = {f: s["metadata"]["name"] for f, s in services.items()}
    # 5xx: AWS alarms on a percentage of the API's requests; here each service's ratio.
    alarm = _aws_alarm("Api5xxRateAlarm")
    (expression,) = [m["Expression"] for m in alarm["Metrics"] if "Expression" in m]
    assert expression.startswith("100 * errors / ")
    ratios = _by_service("http-5xx-rate.yaml", "resource.label.service_name")
    assert set(ratios) == set(names.values())
    for threshold in ratios.values():
        _same_window(threshold, alarm)
        assert threshold["thresholdValue"] == alarm["Threshold"] / 100
        assert filter_terms(threshold["filter"])["metric.label.response_code_class"] == (
            "=", "5xx")  # fmt: skip
        assert "metric.label.response_code_class" not in filter_terms(
            threshold["denominatorFilter"])  # fmt: skip
    # Latency: AWS alarms at a fraction of each Lambda's timeout; the same fraction of each
    # Cloud Run service's request timeout, in milliseconds both.
    functions = _resources("AWS::Lambda::Function")
    fractions: dict[str, float] = {}
    for alarm_name in [*AWS_TWINS["request-latency.yaml"], "SweepDurationAlarm"]:
        alarm = _aws_alarm(alarm_name)
        function = functions[alarm["Dimensions"][0]["Value"]["Ref"]]["Properties"]
        target = function["Environment"]["Variables"]["FUNCTION_TARGET"]
        fractions[target] = alarm["Threshold"] / (function["Timeout"] * 1000)
        assert alarm["Statistic"] == "Maximum"
    assert set(fractions) == {*FUNCTIONS, "sweep"}
    latencies = _by_service("request-latency.yaml", "resource.label.service_name")
    assert set(latencies) == set(names.values())
    for function, service in services.items():
        threshold = latencies[names[function]]
        alarm = _aws_alarm(AWS_TWINS["request-latency.yaml"][FUNCTIONS.index(function)])
        _same_window(threshold, alarm)
        timeout = service["spec"]["template"]["spec"]["timeoutSeconds"]
        assert threshold["thresholdValue"] == fractions[function] * timeout * 1000, function
        # AWS's Maximum: the slowest 1 % of a window, the highest of the service's series.
        (aggregation,) = threshold["aggregations"]
        assert aggregation["perSeriesAligner"] == "ALIGN_PERCENTILE_99"
        assert aggregation["crossSeriesReducer"] == "REDUCE_MAX"
    # The sweep: running for the same fraction of the job's task timeout.
    (running,) = _thresholds("sweep-duration.yaml")
    terms = filter_terms(running["filter"])
    assert terms["resource.label.job_name"] == ("=", "records-sweep")
    assert terms["metric.type"] == ("=", "run.googleapis.com/job/running_executions")
    assert running["comparison"] == "COMPARISON_GT" and running["thresholdValue"] == 0
    assert _seconds(running["duration"]) == fractions["sweep"] * _gcp_sweep_task_timeout()
    assert _seconds(running["aggregations"][0]["alignmentPeriod"]) <= 60
    # Dead letters and failed sweeps: any at all in a window, as on AWS.
    (attempts,) = _thresholds("job-attempts-failed.yaml")
    _same_window(attempts, _aws_alarm("JobDeadLetterAlarm"))
    assert attempts["thresholdValue"] == _aws_alarm("JobDeadLetterAlarm")["Threshold"] == 0
    terms = filter_terms(attempts["filter"])
    assert terms["resource.label.queue_id"] == ("=", GCP_VALUES["CLOUD_TASKS_QUEUE"].split("/")[-1])
    assert terms["metric.label.response_code"] == ("!=", "ok")
    (failed,) = _thresholds("sweep-failed.yaml")
    _same_window(failed, _aws_alarm("AsyncFailureAlarm"))
    assert failed["thresholdValue"] == _aws_alarm("AsyncFailureAlarm")["Threshold"] == 0
    terms = filter_terms(failed["filter"])
    assert terms["resource.label.job_name"] == ("=", "records-sweep")
    assert terms["metric.label.result"] == ("=", "failed")


def _policy_lines(out: str, verb: str) -> dict[str, str]:
    lines = [line for line in _steps(out) if f" monitoring policies {verb} " in line]
    found = {}
    for line in lines:
        match = re.search(r"--policy-from-file=infra/gcp/alerts/(\S+)", line)
        assert match, line
        found[match.group(1)] = line
    assert len(found) == len(lines), lines  # each file once
    return found


def test_deploy_gcp_creates_every_alert_policy_with_the_alarm_address() -> None:
    out = dry_run("deploy_gcp.sh", {**GCP_ENV, "ALARM_EMAIL": "oncall@acme.test"})
    lines = _steps(out)
    assert "monitoring.googleapis.com" in lines[_index(lines, "services enable")]
    channel = _index(lines, "monitoring channels create --type=email")
    assert "--channel-labels=email_address=oncall@acme.test" in lines[channel]
    created = _policy_lines(out, "create")
    assert set(created) == set(AWS_TWINS)
    for line in created.values():
        assert line.startswith("+ gcloud --project records-prod --quiet monitoring policies")
        assert line.endswith(
            " --notification-channels=projects/records-prod/notificationChannels/DRY_RUN"
        )
        assert lines.index(line) > max(channel, _index(lines, "run jobs deploy records-sweep"))
    # Without an address the policies still open incidents (in the console), notifying nobody.
    quiet = dry_run("deploy_gcp.sh", GCP_ENV)
    assert "channels create" not in quiet and "notifying nobody (ALARM_EMAIL unset)" in quiet
    assert set(_policy_lines(quiet, "create")) == set(AWS_TWINS)
    assert "--notification-channels" not in quiet
    for bad in ("oncall@example.com", "not-an-address", "a b@acme.test"):
        assert "ALARM_EMAIL" in refused("deploy_gcp.sh", {**GCP_ENV, "ALARM_EMAIL": bad})


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# gcloud for the re-run test: records each call; every resource exists already.
printf '%s\n' "$*" >>"$FAKE_LOG"
case "$*" in
    *"--data-file=-"*) cat >/dev/null ;;
    *"monitoring policies list"*)
        [[ "$FAKE_POLICIES" == 1 ]] && echo "projects/records-prod/alertPolicies/$RANDOM" ;;
    *"monitoring policies describe"*) echo "$FAKE_POLICY_CHANNELS" ;;
    *"monitoring channels list"*) echo "$FAKE_EMAIL_CHANNEL" ;;
    *"monitoring channels create"*) echo "projects/records-prod/notificationChannels/9" ;;
    *"projects describe"*) echo 123456789012 ;;
    *"addresses describe"*) echo 203.0.113.7 ;;
esac
exit 0
"""


def rerun_with_fake_gcloud(tmp_path: Path, env: dict[str, str]) -> list[str]:
    """deploy_gcp.sh for real, against a gcloud (and docker) that only record their calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "docker").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("gcloud", "docker"):
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "gcloud.log"
    log.write_text("")
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "deploy_gcp.sh")],
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path),
             "FAKE_LOG": str(log), "FAKE_POLICIES": "", "FAKE_POLICY_CHANNELS": "",
             "FAKE_EMAIL_CHANNEL": "", **GCP_ENV, **env},
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return log.read_text().splitlines()


def test_deploy_gcp_rerun_replaces_the_alert_policies_it_made(tmp_path: Path) -> None:
    kept = "projects/records-prod/notificationChannels/7"
    calls = rerun_with_fake_gcloud(
        tmp_path,
        {"FAKE_POLICIES": "1", "FAKE_POLICY_CHANNELS": kept, "ALARM_EMAIL": "oncall@acme.test"},
    )
    assert not [c for c in calls if "monitoring policies create" in c]
    updates = [c for c in calls if "monitoring policies update" in c]
    files = {re.search(r"alerts/(\S+)", c).group(1) for c in updates}  # type: ignore[union-attr]
    assert files == set(AWS_TWINS) and len(updates) == len(AWS_TWINS)
    lookups = [c for c in calls if "monitoring policies list" in c]
    for name in AWS_TWINS:
        assert f'--filter=displayName="{alert_policy(name)["displayName"]}"' in " ".join(lookups)
    new = "projects/records-prod/notificationChannels/9"  # ALARM_EMAIL had none: created
    (create,) = [c for c in calls if "monitoring channels create" in c]
    assert "--channel-labels=email_address=oncall@acme.test" in create
    for call in updates:
        assert re.search(r"monitoring policies update projects/records-prod/alertPolicies/\d+ ",
                         call), call  # fmt: skip
        assert call.endswith(f"--set-notification-channels={kept},{new}"), call
    # The address's channel found, and already on the policies: reused, listed once.
    calls = rerun_with_fake_gcloud(
        tmp_path,
        {"FAKE_POLICIES": "1", "FAKE_POLICY_CHANNELS": f"{kept},{new}",
         "FAKE_EMAIL_CHANNEL": new, "ALARM_EMAIL": "oncall@acme.test"},
    )  # fmt: skip
    assert not [c for c in calls if "channels create" in c]
    updates = [c for c in calls if "monitoring policies update" in c]
    assert updates and all(c.endswith(f"--set-notification-channels={kept},{new}") for c in updates)
    # None there yet: created, with no channel when ALARM_EMAIL is unset.
    calls = rerun_with_fake_gcloud(tmp_path, {})
    created = [c for c in calls if "monitoring policies create" in c]
    assert len(created) == len(AWS_TWINS)
    assert not [c for c in calls if "notification-channels" in c or "policies update" in c]


# --- AWS properties --------------------------------------------------------------------------


def _functions_by_target() -> dict[str, dict[str, Any]]:
    return {
        r["Properties"]["Environment"]["Variables"]["FUNCTION_TARGET"]: r["Properties"]
        for r in _resources("AWS::Lambda::Function").values()
    }


def test_no_password_in_any_function_environment_or_parameter() -> None:
    template = load_template()
    for name in template["Parameters"]:
        assert "password" not in name.lower() and "Url" not in name, name
    for target, props in _functions_by_target().items():
        env = props["Environment"]["Variables"]
        assert "DATABASE_SECRET_ARN" in env, target
        url = json.dumps(env["DATABASE_URL"])
        assert "@" not in url and "Password" not in url, target
        assert "KmsKeyArn" in props, target  # the environment is encrypted with our key
    assert "Function URL" not in json.dumps(_resources("AWS::Lambda::Url")) and not _resources(
        "AWS::Lambda::Url"
    )


def test_reserved_concurrency_and_throttling() -> None:
    for target, props in _functions_by_target().items():
        assert "ReservedConcurrentExecutions" in props, target
    (stage,) = _resources("AWS::ApiGatewayV2::Stage").values()
    route = stage["Properties"]["DefaultRouteSettings"]
    assert route["ThrottlingRateLimit"] == {"Ref": "RateLimitRps"}
    assert route["ThrottlingBurstLimit"] == {"Ref": "RateLimitBurst"}
    params = load_template()["Parameters"]
    assert params["RateLimitRps"]["Default"] == 100 and params["RateLimitBurst"]["Default"] == 300
    assert "AccessLogSettings" in stage["Properties"]


def test_job_queue_dlq_and_event_source_mapping() -> None:
    queues = _resources("AWS::SQS::Queue")
    job = queues["JobQueue"]["Properties"]
    assert job["VisibilityTimeout"] >= 6 * 900
    assert job["RedrivePolicy"]["maxReceiveCount"] == 3
    assert job["RedrivePolicy"]["deadLetterTargetArn"] == {"Fn::GetAtt": "JobDeadLetterQueue.Arn"}
    (mapping,) = _resources("AWS::Lambda::EventSourceMapping").values()
    props = mapping["Properties"]
    assert props["BatchSize"] == 1 and props["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert props["FunctionName"] == {"Ref": "UploadRecordFunction"}
    env = _functions_by_target()["upload_record"]["Environment"]["Variables"]
    assert env["JOB_QUEUE"] == "sqs" and env["JOB_QUEUE_URL"] == {"Ref": "JobQueue"}
    assert _functions_by_target()["upload_record"]["Timeout"] == 900


def _statements(role: str) -> list[dict[str, Any]]:
    props = _resources("AWS::IAM::Role")[role]["Properties"]
    return [st for p in props["Policies"] for st in p["PolicyDocument"]["Statement"]]


def _actions(role: str, prefix: str) -> set[str]:
    found: set[str] = set()
    for st in _statements(role):
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        found |= {a for a in actions if a.startswith(prefix)}
    return found


def test_least_privilege_per_function() -> None:
    roles = {t: p["Role"]["Fn::GetAtt"].split(".")[0] for t, p in _functions_by_target().items()}
    assert len(set(roles.values())) == len(roles)  # one role each
    assert _actions(roles["get_record"], "s3:") == {"s3:GetObject"}
    assert _actions(roles["create_user"], "s3:") == {"s3:ListBucket", "s3:DeleteObject"}
    assert _actions(roles["upload_record"], "s3:") == {
        "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
        "s3:ListMultipartUploadParts",
    }  # fmt: skip
    assert "sqs:SendMessage" in _actions(roles["upload_record"], "sqs:")
    for target in ("create_user", "get_record", "sweep", "migrate"):
        assert not _actions(roles[target], "sqs:ReceiveMessage"), target
    assert not _actions(roles["migrate"], "s3:")
    assert "s3:PutObject" not in _actions(roles["sweep"], "s3:")
    for target in FUNCTIONS:
        env = _functions_by_target()[target]["Environment"]["Variables"]
        assert env["IDEMPOTENCY_SECRET_ARN"] == {"Ref": "IdempotencySecret"}, target


def test_sweep_on_a_schedule() -> None:
    (schedule,) = _resources("AWS::Scheduler::Schedule").values()
    target = schedule["Properties"]["Target"]
    assert target["Arn"] == {"Fn::GetAtt": "SweepFunction.Arn"}
    assert _functions_by_target()["sweep"]["Code"]["ImageUri"] == {"Ref": "MigrateImageUri"}
    scheduler = _resources("AWS::IAM::Role")["SchedulerRole"]["Properties"]["Policies"]
    actions = {
        a
        for p in scheduler
        for st in p["PolicyDocument"]["Statement"]
        for a in (st["Action"] if isinstance(st["Action"], list) else [st["Action"]])
    }
    assert actions == {"lambda:InvokeFunction", "sqs:SendMessage", "kms:GenerateDataKey",
                       "kms:Decrypt"}  # fmt: skip


def test_rds_proxy_is_optional() -> None:
    template = load_template()
    assert template["Resources"]["DatabaseProxy"]["Condition"] == "WithProxy"
    assert template["Resources"]["DatabaseProxy"]["Properties"]["RequireTLS"] is True
    assert "UseRdsProxy" in template["Parameters"]


# --- AWS exposure: CloudFront + WAF in front, the HTTP API not reachable around them ----------


def test_waf_rate_rule_per_client_address_with_the_router_defaults() -> None:
    edge = load_template(EDGE_TEMPLATE)
    # A CloudFront web ACL exists only in us-east-1: the stack refuses any other region.
    (rule,) = edge["Rules"].values()
    assert rule["Assertions"][0]["Assert"] == {"Fn::Equals": [{"Ref": "AWS::Region"}, "us-east-1"]}
    (acl,) = _resources("AWS::WAFv2::WebACL", EDGE_TEMPLATE).values()
    props = acl["Properties"]
    assert props["Scope"] == "CLOUDFRONT"
    rules = {r["Name"]: r for r in props["Rules"]}
    rate = rules["per-client-rate-limit"]
    statement = rate["Statement"]["RateBasedStatement"]
    assert statement["AggregateKeyType"] == "IP"  # the viewer's address, as CloudFront sees it
    assert statement["EvaluationWindowSec"] == 60
    assert statement["Limit"] == {"Ref": "RateLimitPerMinute"}
    # nginx's limit_req admits at most rate x T + burst requests in T seconds.
    rps, burst = int(DEFAULT_RATE_LIMIT_RPS), int(DEFAULT_RATE_LIMIT_BURST)
    assert edge["Parameters"]["RateLimitPerMinute"]["Default"] == rps * 60 + burst == 6300
    stage = load_template()["Parameters"]
    assert (stage["RateLimitRps"]["Default"], stage["RateLimitBurst"]["Default"]) == (rps, burst)
    block = rate["Action"]["Block"]["CustomResponse"]
    assert block["ResponseCode"] == 429
    body = json.loads(props["CustomResponseBodies"][block["CustomResponseBodyKey"]]["Content"])
    assert body["status"] == 429 and body["type"] == "urn:record-service:problem:rate-limited"
    assert rate["Priority"] == min(r["Priority"] for r in props["Rules"])  # counts everything
    managed = {
        r["Statement"]["ManagedRuleGroupStatement"]["Name"]
        for r in props["Rules"]
        if "ManagedRuleGroupStatement" in r["Statement"]
    }
    assert "AWSManagedRulesKnownBadInputsRuleSet" in managed  # Log4j lookups (CKV_AWS_192)
    assert "AWSManagedRulesCommonRuleSet" not in managed  # it blocks every body over 8 KB
    (logging_config,) = _resources("AWS::WAFv2::LoggingConfiguration", EDGE_TEMPLATE).values()
    log_props = logging_config["Properties"]
    assert log_props["ResourceArn"] == {"Fn::GetAtt": "WebAcl.Arn"}
    assert {"SingleHeader": {"Name": "authorization"}} in log_props["RedactedFields"]
    (group,) = _resources("AWS::Logs::LogGroup", EDGE_TEMPLATE).values()
    assert group["Properties"]["LogGroupName"]["Fn::Sub"].startswith("aws-waf-logs-")
    outputs = edge["Outputs"]
    assert outputs["WebAclArn"]["Value"] == {"Fn::GetAtt": "WebAcl.Arn"}


def test_cloudfront_with_the_web_acl_in_front_of_the_http_api() -> None:
    template = load_template()
    (distribution,) = _resources("AWS::CloudFront::Distribution").values()
    config = distribution["Properties"]["DistributionConfig"]
    assert config["WebACLId"] == {"Ref": "EdgeWebAclArn"}
    pattern = template["Parameters"]["EdgeWebAclArn"]["AllowedPattern"]
    assert re.fullmatch(pattern, "arn:aws:wafv2:us-east-1:111122223333:global/webacl/a/b")
    assert not re.fullmatch(pattern, "arn:aws:wafv2:eu-west-1:111122223333:regional/webacl/a/b")
    (origin,) = config["Origins"]
    assert origin["DomainName"] == {
        "Fn::Sub": "${HttpApi}.execute-api.${AWS::Region}.${AWS::URLSuffix}"
    }
    assert origin["CustomOriginConfig"]["OriginProtocolPolicy"] == "https-only"
    behavior = config["DefaultCacheBehavior"]
    assert behavior["TargetOriginId"] == origin["Id"] and "CacheBehaviors" not in config
    assert behavior["ViewerProtocolPolicy"] == "https-only"  # a redirect would turn POST to GET
    assert {"POST", "DELETE", "HEAD"} <= set(behavior["AllowedMethods"])
    assert behavior["CachePolicyId"] == "4135ea2d-6df8-44a3-9df3-4b5a84be39ad"  # CachingDisabled
    # AllViewerExceptHostHeader: Authorization and the query string reach the functions.
    assert behavior["OriginRequestPolicyId"] == "b689b0a8-53d0-40ab-baf2-68738e2966ac"
    assert config["Logging"]["Bucket"] == {"Fn::GetAtt": "EdgeLogsBucket.DomainName"}
    # The API's URL is CloudFront's, everywhere the service names itself.
    assert template["Outputs"]["ApiUrl"]["Value"] == {
        "Fn::Sub": "https://${Distribution.DomainName}"
    }
    for target in FUNCTIONS:
        env = _functions_by_target()[target]["Environment"]["Variables"]
        assert env["PUBLIC_BASE_URL"] == {"Fn::Sub": "https://${Distribution.DomainName}"}


def test_origin_secret_header_comes_from_secrets_manager() -> None:
    template = load_template()
    (distribution,) = _resources("AWS::CloudFront::Distribution").values()
    (origin,) = distribution["Properties"]["DistributionConfig"]["Origins"]
    (header,) = origin["OriginCustomHeaders"]
    assert header["HeaderName"].lower() == ORIGIN_VERIFY_HEADER
    # A dynamic reference CloudFormation resolves: no value in the template or a parameter.
    assert header["HeaderValue"] == {
        "Fn::Sub": "{{resolve:secretsmanager:${OriginVerifySecret}:SecretString}}"
    }
    secret = template["Resources"]["OriginVerifySecret"]
    assert secret["Type"] == "AWS::SecretsManager::Secret"
    assert secret["Properties"]["GenerateSecretString"]["PasswordLength"] >= 32
    assert "SecretString" not in secret["Properties"]  # generated, never written down
    roles = {t: p["Role"]["Fn::GetAtt"].split(".")[0] for t, p in _functions_by_target().items()}
    for target in FUNCTIONS:
        env = _functions_by_target()[target]["Environment"]["Variables"]
        assert env["ORIGIN_VERIFY_SECRET_ARN"] == {"Ref": "OriginVerifySecret"}, target
        assert "ORIGIN_VERIFY_SECRET" not in env, target
        readable = [
            st["Resource"]
            for st in _statements(roles[target])
            if st["Action"] == "secretsmanager:GetSecretValue"
        ]
        assert any({"Ref": "OriginVerifySecret"} in r for r in readable), target
    for target in ("sweep", "migrate"):  # no HTTP: no secret
        env = _functions_by_target()[target]["Environment"]["Variables"]
        assert "ORIGIN_VERIFY_SECRET_ARN" not in env, target


ORIGIN_SECRET = "origin-secret-for-tests-0123456789abcdefghijklmnop"


@pytest.fixture
def origin_checked(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """aws_lambda.handler with ORIGIN_VERIFY_SECRET set; the app replaced by a recorder of the
    events it is handed (no servers: the check runs before the app)."""
    seen: list[dict[str, Any]] = []

    def app(ev: dict[str, Any], _context: Any) -> dict[str, Any]:
        seen.append(ev)
        return {"statusCode": 200, "headers": {}, "body": "", "isBase64Encoded": False}

    settings = Settings.from_env({"ORIGIN_VERIFY_SECRET": ORIGIN_SECRET, "FFMPEG_BINARY": "ffmpeg"})
    assert settings.origin_verify_secret == ORIGIN_SECRET
    set_services(Services.from_settings(settings))
    monkeypatch.setattr(aws_lambda, "_handler", app)
    yield seen
    set_services(None)


@pytest.mark.parametrize(
    "fixture",
    ["http_api_get_query.json", "http_api_post_raw_wav.json", "function_url_get_query.json"],
)
def test_functions_refuse_http_events_without_the_origin_header(
    origin_checked: list[dict[str, Any]], fixture: str
) -> None:
    missing = aws_lambda.handler(event(fixture), None)
    wrong = aws_lambda.handler(
        event(fixture, headers={ORIGIN_VERIFY_HEADER: ORIGIN_SECRET[:-1] + "X"}), None
    )
    empty = aws_lambda.handler(event(fixture, headers={ORIGIN_VERIFY_HEADER: ""}), None)
    for refused in (missing, wrong, empty):
        assert refused["statusCode"] == 403
        assert refused["headers"]["Content-Type"] == PROBLEM_CONTENT_TYPE
        problem = json.loads(refused["body"])
        assert problem["type"] == "urn:record-service:problem:origin-not-verified"
        assert problem["status"] == 403 and ORIGIN_SECRET not in refused["body"]
    assert origin_checked == []  # none of them reached the app
    ok = aws_lambda.handler(event(fixture, headers={"X-Origin-Verify": ORIGIN_SECRET}), None)
    assert ok["statusCode"] == 200
    (handed,) = origin_checked
    assert ORIGIN_VERIFY_HEADER not in {name.lower() for name in handed["headers"]}
    assert handed["rawPath"] == event(fixture)["rawPath"]


def test_origin_check_leaves_other_events_alone(origin_checked: list[dict[str, Any]]) -> None:
    assert aws_lambda.is_sqs_event(event_fixture("sqs_job_message.json"))
    assert not aws_lambda.is_http_event(event_fixture("sqs_job_message.json"))
    scheduled: dict[str, Any] = {}  # EventBridge Scheduler's input of the sweep
    assert aws_lambda.handler(scheduled, None)["statusCode"] == 200
    assert origin_checked == [scheduled]


def test_no_origin_secret_no_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off AWS (make dev, compose, Cloud Run) nothing sets the secret and nothing is refused."""
    settings = Settings.from_env({"FFMPEG_BINARY": "ffmpeg"})
    assert settings.origin_verify_secret is None
    set_services(Services.from_settings(settings))
    monkeypatch.setattr(aws_lambda, "_handler", lambda ev, _c: {"statusCode": 204})
    try:
        assert aws_lambda.handler(event("http_api_get_query.json"), None)["statusCode"] == 204
    finally:
        set_services(None)
    with pytest.raises(ValueError, match="ORIGIN_VERIFY_SECRET"):
        Settings.from_env({"ORIGIN_VERIFY_SECRET": "short", "FFMPEG_BINARY": "ffmpeg"})


def test_alarms_5xx_duration_dead_letters() -> None:
    alarms = _resources("AWS::CloudWatch::Alarm")
    metrics = json.dumps(alarms)
    assert '"MetricName": "5xx"' in metrics
    timeouts = {t: p["Timeout"] for t, p in _functions_by_target().items()}
    durations = [a["Properties"] for a in alarms.values()
                 if a["Properties"].get("MetricName") == "Duration"]  # fmt: skip
    assert len(durations) >= 4
    for alarm in durations:
        function = alarm["Dimensions"][0]["Value"]["Ref"]
        target = _resources("AWS::Lambda::Function")[function]["Properties"]
        timeout = timeouts[target["Environment"]["Variables"]["FUNCTION_TARGET"]]
        assert alarm["Threshold"] == 0.8 * timeout * 1000
    dlq = [a for a in alarms.values() if a["Properties"].get("MetricName")
           == "ApproximateNumberOfMessagesVisible"]  # fmt: skip
    queues = {a["Properties"]["Dimensions"][0]["Value"]["Fn::GetAtt"] for a in dlq}
    assert queues == {"JobDeadLetterQueue.QueueName", "AsyncFailureQueue.QueueName"}


def test_every_checkov_skip_says_why() -> None:
    for path in [AWS_TEMPLATE, EDGE_TEMPLATE, *GCP.glob("*.yaml")]:
        for line in path.read_text().splitlines():
            if "checkov:skip=" in line:
                assert re.search(r"checkov:skip=CKV2?_[A-Z0-9_]+: \S.{15,}", line), line


# --- migrations: expand only -------------------------------------------------------------------

DESTRUCTIVE = re.compile(
    r"\bop\.(drop_table|drop_column|drop_constraint|rename_table|drop_index)\b"
    r"|alter_column\([^)]*new_column_name"
    r"|\b(DROP\s+(TABLE|COLUMN)|RENAME\s+(TO|COLUMN))\b",
    re.IGNORECASE,
)


def _upgrade_source(text: str) -> str:
    start = text.index("def upgrade(")
    end = text.find("\ndef downgrade(", start)
    return text[start : end if end != -1 else None]


def test_every_migration_upgrade_is_additive() -> None:
    """Expand, then contract: an upgrade never drops or renames (the previous release still
    runs against the new schema while the rollout is under way; docs/deploy-aws.md)."""
    versions = sorted((ROOT / "migrations" / "versions").glob("*.py"))
    assert versions
    for version in versions:
        upgrade = _upgrade_source(version.read_text())
        assert not DESTRUCTIVE.search(upgrade), f"{version.name}: {DESTRUCTIVE.search(upgrade)}"


def test_the_additive_check_catches_a_drop() -> None:
    sample = "def upgrade() -> None:\n    op.drop_column('records', 'etag')\n\ndef downgrade():\n"
    assert DESTRUCTIVE.search(_upgrade_source(sample))
    rename = "def upgrade() -> None:\n    op.execute('ALTER TABLE records RENAME COLUMN a TO b')\n"
    assert DESTRUCTIVE.search(_upgrade_source(rename))


def test_each_platforms_job_deadline_ends_before_its_limits() -> None:
    """JOB_TIMEOUT_SECONDS fits inside the Lambda timeout and SQS visibility timeout (AWS) and
    inside the Cloud Tasks dispatch deadline (GCP): a job past it fails once, cleanly."""
    from common.adapters.queue import TASK_DISPATCH_DEADLINE_SECONDS

    function = _resources("AWS::Lambda::Function")["UploadRecordFunction"]["Properties"]
    aws_job = float(function["Environment"]["Variables"]["JOB_TIMEOUT_SECONDS"])
    queue = _resources("AWS::SQS::Queue")["JobQueue"]["Properties"]
    assert aws_job < function["Timeout"] <= queue["VisibilityTimeout"]
    service = rendered("upload-record.yaml")
    (container,) = service["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert float(env["JOB_TIMEOUT_SECONDS"]) < TASK_DISPATCH_DEADLINE_SECONDS


def test_the_image_keeps_botocore_models_of_every_service_called() -> None:
    """The Dockerfile keeps botocore's models only for BOTOCORE_SERVICES: every service the code
    makes a client for, and every one botocore's credential providers may, must be in it."""
    import botocore

    kept = image_botocore_services()
    client_of = re.compile(r"""create_client\(\s*(?:#.*\s*)?["']([a-z0-9-]+)["']""")
    called = {
        name
        for path in (ROOT / "common" / "src").rglob("*.py")
        for name in client_of.findall(path.read_text())
    }
    assert {"s3", "sqs", "secretsmanager"} <= called  # the scan finds the adapters' clients
    # botocore's own: assume-role, SSO, `aws login` (credentials.py) and SSO tokens (tokens.py).
    nested = re.compile(
        r"""(?:_client_creator\(\s*|create_nested_client\(\s*[\w.]+,\s*)['"]([a-z0-9-]+)['"]"""
    )
    package = Path(botocore.__file__).parent
    providers = {
        name
        for module in ("credentials.py", "tokens.py")
        for name in nested.findall((package / module).read_text())
    }
    assert "sts" in providers
    assert called | providers <= kept, sorted((called | providers) - kept)
    assert kept <= {path.name for path in (package / "data").iterdir()}, "a name botocore lacks"
