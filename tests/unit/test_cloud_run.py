"""Cloud Run: JSON logs with Cloud Logging's trace fields, Postgres over a unix socket (as the
Cloud SQL connector mounts it), and the container entry point serving on $PORT quickly.
"""

from __future__ import annotations

import io
import json
import logging

import pytest
from common.adapters.db import connect_params
from common.http import Request, Response
from common.http.responses import function_handler
from common.platform.logs import JsonFormatter, trace_fields
from common.settings import Settings, SettingsError, normalise_database_url
from werkzeug.test import EnvironBuilder

TRACE_ID = "105445aa7843bc8bf206b12000100000"
PROJECT = "records-prod"


def test_trace_fields_from_cloud_trace_context() -> None:
    assert trace_fields(PROJECT, f"{TRACE_ID}/1;o=1") == {
        "logging.googleapis.com/trace": f"projects/{PROJECT}/traces/{TRACE_ID}",
        "logging.googleapis.com/spanId": "0000000000000001",
        "logging.googleapis.com/trace_sampled": True,
    }
    assert trace_fields(PROJECT, f"{TRACE_ID}/2706026819174973556;o=0") == {
        "logging.googleapis.com/trace": f"projects/{PROJECT}/traces/{TRACE_ID}",
        "logging.googleapis.com/spanId": "258dbd0e0d9ac074",
        "logging.googleapis.com/trace_sampled": False,
    }
    assert trace_fields(PROJECT, TRACE_ID) == {
        "logging.googleapis.com/trace": f"projects/{PROJECT}/traces/{TRACE_ID}"
    }


def test_trace_fields_from_traceparent_and_garbage() -> None:
    parent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    assert trace_fields(PROJECT, None, parent) == {
        "logging.googleapis.com/trace": f"projects/{PROJECT}/traces/{TRACE_ID}",
        "logging.googleapis.com/spanId": "00f067aa0ba902b7",
        "logging.googleapis.com/trace_sampled": True,
    }
    assert trace_fields(None, f"{TRACE_ID}/1;o=1") == {}  # no project: no trace field
    for bad in ("", "nothex/1", TRACE_ID + "0/1", f"{TRACE_ID}/x", '"}{"severity":"X'):
        assert trace_fields(PROJECT, bad) == {}


def _log_line(formatter: JsonFormatter, message: str) -> dict[str, object]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("test.cloud_run")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(message, extra={"status": 503})
    finally:
        logger.removeHandler(handler)
    line: dict[str, object] = json.loads(stream.getvalue())
    return line


def test_request_log_lines_carry_the_trace() -> None:
    """A line logged while function_handler runs a handler carries that request's trace."""
    headers = {"X-Cloud-Trace-Context": f"{TRACE_ID}/17;o=1"}
    lines: dict[str, dict[str, object]] = {}

    @function_handler
    def handler(request: Request) -> Response:
        lines["traced"] = _log_line(JsonFormatter(PROJECT), "object store unavailable")
        lines["untraced"] = _log_line(JsonFormatter(None), "x")
        return Response(status=204)

    handler(Request(EnvironBuilder(path="/records", headers=list(headers.items())).get_environ()))
    line, untraced = lines["traced"], lines["untraced"]
    assert line["severity"] == "WARNING"
    assert line["message"] == "object store unavailable"
    assert line["status"] == 503
    assert line["logging.googleapis.com/trace"] == f"projects/{PROJECT}/traces/{TRACE_ID}"
    assert line["logging.googleapis.com/spanId"] == "0000000000000011"
    assert "logging.googleapis.com/trace" not in untraced
    # Outside a request (startup, background threads) there is simply no trace.
    assert "logging.googleapis.com/trace" not in _log_line(JsonFormatter(PROJECT), "boot")


def test_google_cloud_project_setting() -> None:
    assert Settings.from_env({"GOOGLE_CLOUD_PROJECT": PROJECT}).google_cloud_project == PROJECT
    assert Settings.from_env({}).google_cloud_project is None


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql://records:pw@/records?unix_sock=/cloudsql/p:europe-west1:db/.s.PGSQL.5432",
            "/cloudsql/p:europe-west1:db/.s.PGSQL.5432",
        ),
        (  # libpq's spelling, as Cloud Run's docs give it: a directory in ?host=
            "postgres://records:pw@/records?host=/cloudsql/p:europe-west1:db",
            "/cloudsql/p:europe-west1:db/.s.PGSQL.5432",
        ),
        ("postgresql://records:pw@:6543/records?host=/var/run/pg/", "/var/run/pg/.s.PGSQL.6543"),
    ],
)
def test_cloud_sql_socket_urls_reach_pg8000_as_unix_sock(url: str, expected: str) -> None:
    normalised = Settings.from_env({"DATABASE_URL": url}).database_url
    assert normalised.startswith("postgresql+pg8000://")
    kwargs = connect_params(normalised, tls="off", timeout=5.0)  # what the pool connects with
    assert kwargs["unix_sock"] == expected
    assert kwargs["user"] == "records"
    assert kwargs["password"] == "pw"
    assert kwargs["database"] == "records"
    assert "host" not in kwargs


def test_tcp_urls_are_left_alone_and_ambiguity_refused() -> None:
    url = "postgresql+pg8000://u:p@10.0.0.5:5432/records?ssl_context=true"
    assert normalise_database_url(url) == url
    with pytest.raises(SettingsError):
        normalise_database_url("postgresql://u:p@/db?host=/a&unix_sock=/a/.s.PGSQL.5432")
