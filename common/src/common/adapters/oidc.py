"""Google-signed OIDC ID tokens, as Cloud Tasks attaches them to the HTTP tasks it pushes.

google-auth checks the signature against the certificates at ``certs_url`` (Google's by
default; the tests serve their own), the expiry and the audience; this module adds the issuer
and the signing service account, which the caller names.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")


class InvalidToken(Exception):
    """The token is not a valid Google ID token for this audience."""


class WrongIdentity(Exception):
    """A valid token, but of another account than the one allowed."""


class CertsUnavailable(Exception):
    """The signing certificates could not be fetched."""


_lock = threading.Lock()
_request: Any = None


def _transport() -> Any:
    global _request
    with _lock:
        if _request is None:
            import urllib3
            from google.auth.transport.urllib3 import Request

            _request = Request(urllib3.PoolManager(timeout=5.0))  # type: ignore[no-untyped-call]
        return _request


def verify_service_account_token(
    token: str, *, audience: str, service_account: str, certs_url: str
) -> Mapping[str, Any]:
    """The claims of ``token`` if Google signed it for ``audience`` as ``service_account``."""
    from google.auth import exceptions
    from google.oauth2 import id_token

    try:
        claims = id_token.verify_token(token, _transport(), audience=audience, certs_url=certs_url)
    except exceptions.TransportError as exc:
        log.error("could not fetch the OIDC certificates: %s", exc)
        raise CertsUnavailable(str(exc)) from exc
    except (ValueError, exceptions.GoogleAuthError) as exc:
        raise InvalidToken(str(exc)) from exc
    if claims.get("iss") not in GOOGLE_ISSUERS:
        raise InvalidToken("the token was not issued by Google")
    if claims.get("email") != service_account or claims.get("email_verified") is not True:
        raise WrongIdentity(str(claims.get("email")))
    return claims
