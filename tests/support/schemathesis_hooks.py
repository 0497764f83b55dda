"""Schemathesis hooks for the contract test (loaded through SCHEMATHESIS_HOOKS).

* Raw ``audio/wav`` bodies (POST /records) are bytes, sent as they are.
* RECORDS_ST_TOKENS (JSON, operationId -> token): the Bearer token of the operations that act
  on a user of their own (erasing or rotating the run's user would end its credentials).
* A body's token is left out beside a Bearer header, which is the one read.
* A valid Idempotency-Key becomes a fresh one of the same length: schemathesis draws the same
  short keys for different requests, which the server rightly answers 422 (key reused).
* RECORDS_ST_FOREIGN=1: the run's token belongs to another user than the ids it is aimed at,
  so any 2xx is another user's data or effect (the check ``foreign_identity_gets_nothing``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import string
import threading
from typing import Any

import schemathesis
from schemathesis import Case, HookContext
from schemathesis.checks import CheckContext
from schemathesis.core.transport import Response

schemathesis.serializer.alias("audio/wav", "application/octet-stream")

_TOKENS: dict[str, str] = json.loads(os.environ.get("RECORDS_ST_TOKENS") or "{}")
# What the server accepts (common.domain.idempotency.validate_key, the document's pattern).
_VALID_KEY = re.compile(r"[!-+\--~]([ -+\--~]*[!-+\--~])? *")
_ALPHABET = string.ascii_letters + string.digits
_used: set[tuple[str, str]] = set()
_lock = threading.Lock()


def _fresh_key(operation: str, length: int) -> str:
    """An unused key of ``length`` characters, or a little longer once short ones run out."""
    with _lock:
        for attempt in range(100_000):
            size = min(255, length + attempt // 20)
            key = "".join(secrets.choice(_ALPHABET) for _ in range(size))
            if (operation, key) not in _used:
                _used.add((operation, key))
                return key
    raise RuntimeError("no unused Idempotency-Key left")


@schemathesis.hook
def before_call(context: HookContext, case: Case[Any], kwargs: dict[str, Any]) -> None:
    headers = case.headers
    if headers is None:
        return
    operation = case.operation.definition.raw.get("operationId", "")
    token = _TOKENS.get(operation)
    if token and str(headers.get("Authorization", "")).startswith("Bearer "):
        headers["Authorization"] = f"Bearer {token}"
    # With a Bearer header the body's token is not read (the document says so): drawing one
    # there would only test that it is ignored.
    if "Authorization" in headers and isinstance(case.body, dict):
        case.body.pop("token", None)
    key = headers.get("Idempotency-Key")
    if isinstance(key, str) and len(key) <= 255 and _VALID_KEY.fullmatch(key):
        headers["Idempotency-Key"] = _fresh_key(operation, len(key.rstrip()))


@schemathesis.check
def foreign_identity_gets_nothing(ctx: CheckContext, response: Response, case: Case[Any]) -> None:
    if os.environ.get("RECORDS_ST_FOREIGN") == "1" and 200 <= response.status_code < 300:
        raise AssertionError(
            f"{case.method} {case.path} answered {response.status_code} to another user's token"
        )
