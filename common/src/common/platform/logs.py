"""Structured logging: one JSON object per line on stderr, fields Cloud Logging understands.

``severity`` and ``message`` are Cloud Logging's own keys. When ``GOOGLE_CLOUD_PROJECT`` is
set, a line logged while a request is handled also carries the request's trace (from Cloud
Run's ``X-Cloud-Trace-Context`` header, or W3C ``traceparent``) as
``logging.googleapis.com/trace`` (+ ``spanId``, ``trace_sampled``), so the console groups a
request's lines under it. On Lambda the same lines land in CloudWatch Logs as JSON.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from datetime import UTC, datetime
from typing import Any

from common.http.context import REQUEST_HEADERS

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_SEVERITY = {"WARNING": "WARNING", "CRITICAL": "CRITICAL", "ERROR": "ERROR", "DEBUG": "DEBUG"}
CLOUD_TRACE_HEADER = "X-Cloud-Trace-Context"
TRACE_KEY = "logging.googleapis.com/trace"
SPAN_KEY = "logging.googleapis.com/spanId"
SAMPLED_KEY = "logging.googleapis.com/trace_sampled"
# X-Cloud-Trace-Context: TRACE_ID/SPAN_ID;o=OPTIONS (span id in decimal)
_CLOUD_TRACE = re.compile(r"^([0-9a-fA-F]{32})(?:/(\d{1,20}))?(?:;o=([01]))?$")
# traceparent: VERSION-TRACE_ID-PARENT_ID-FLAGS (hex)
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def trace_fields(
    project: str | None, cloud_trace: str | None, traceparent: str | None = None
) -> dict[str, Any]:
    """Cloud Logging's trace fields for a request's trace headers; {} without a project."""
    if not project:
        return {}
    match = _CLOUD_TRACE.match((cloud_trace or "").strip())
    if match:
        trace_id, span, sampled = match.groups()
        fields: dict[str, Any] = {TRACE_KEY: f"projects/{project}/traces/{trace_id.lower()}"}
        if span is not None and 0 < int(span) < 2**64:
            fields[SPAN_KEY] = f"{int(span):016x}"
        if sampled is not None:
            fields[SAMPLED_KEY] = sampled == "1"
        return fields
    match = _TRACEPARENT.match((traceparent or "").strip())
    if match:
        trace_id, span, flags = match.groups()
        return {
            TRACE_KEY: f"projects/{project}/traces/{trace_id}",
            SPAN_KEY: span,
            SAMPLED_KEY: bool(int(flags, 16) & 1),
        }
    return {}


class JsonFormatter(logging.Formatter):
    def __init__(self, project: str | None = None) -> None:
        super().__init__()
        self.project = project

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "severity": _SEVERITY.get(record.levelname, "INFO"),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool) else str(value)
        headers = REQUEST_HEADERS.get() if self.project else None
        if headers is not None:
            entry.update(
                trace_fields(
                    self.project, headers.get(CLOUD_TRACE_HEADER), headers.get("traceparent")
                )
            )
        if record.exc_info:
            entry["stack_trace"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


_configured = False


def configure_logging(level: str = "INFO", *, project: str | None = None) -> None:
    """Route every logger of the process to one JSON handler (idempotent).

    ``project`` (GOOGLE_CLOUD_PROJECT) turns on the trace fields of request log lines.
    """
    global _configured
    if _configured:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(project))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel("WARNING")
    _configured = True
