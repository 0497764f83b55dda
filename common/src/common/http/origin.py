"""Requests must come through the deployment's edge: the origin-verify header.

On AWS the HTTP API's own ``execute-api`` URL stays reachable from the internet (an HTTP API
cannot be made private, and AWS WAF cannot be attached to it). CloudFront, which carries the
WAF web ACL with the per-client rate limit, adds ``X-Origin-Verify: <secret>`` to every request
it forwards (the value is generated in Secrets Manager by the stack); a viewer's own header of
that name is overwritten by CloudFront. The functions get the secret at start
(``ORIGIN_VERIFY_SECRET``, read from ``ORIGIN_VERIFY_SECRET_ARN``) and refuse any HTTP event
without it, so going around CloudFront (and its rate limit) reaches no handler.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

ORIGIN_VERIFY_HEADER = "x-origin-verify"


def origin_header(headers: Mapping[str, str]) -> str | None:
    """The origin-verify header's value (header names in any case), if there is one."""
    for name, value in headers.items():
        if name.lower() == ORIGIN_VERIFY_HEADER:
            return value
    return None


def origin_verified(headers: Mapping[str, str], secret: str | None) -> bool:
    """True when no secret is configured, or the header carries exactly the secret.

    The comparison takes the same time wherever the values differ (``hmac.compare_digest``).
    """
    if secret is None:
        return True
    given = origin_header(headers)
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), secret.encode("utf-8"))
