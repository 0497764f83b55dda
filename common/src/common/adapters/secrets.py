"""Database credentials from AWS Secrets Manager, read at start and again after a rotation.

``DATABASE_SECRET_ARN`` names a secret whose string is JSON in the shape RDS and Secrets
Manager's rotation functions use: ``username`` and ``password``, and optionally ``host``,
``port`` and ``dbname`` (an RDS-managed master secret has only the first two; the rest then
comes from ``DATABASE_URL``, which holds no password). :mod:`common.adapters.db` asks for the
current credentials for every new connection (:func:`common.adapters.db.login`) and calls
:meth:`SecretCredentials.refresh` once when the server answers an authentication failure, so
a rotated secret is picked up without a redeploy.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str
    host: str | None = None
    port: int | None = None
    database: str | None = None

    @classmethod
    def from_secret_string(cls, raw: str) -> Credentials:
        try:
            data: Any = json.loads(raw)
        except ValueError as exc:
            raise ValueError("the database secret is not JSON") from exc
        if not isinstance(data, dict) or not data.get("username") or not data.get("password"):
            raise ValueError("the database secret needs 'username' and 'password'")
        port = data.get("port")
        return cls(
            username=str(data["username"]),
            password=str(data["password"]),
            host=str(data["host"]) if data.get("host") else None,
            port=int(port) if port else None,
            database=str(data["dbname"]) if data.get("dbname") else None,
        )

    def connect_params(self) -> dict[str, Any]:
        """The pg8000 ``connect()`` keyword arguments these credentials set."""
        params: dict[str, Any] = {"user": self.username, "password": self.password}
        if self.host:
            params["host"] = self.host
        if self.port:
            params["port"] = self.port
        if self.database:
            params["database"] = self.database
        return params


def region_of(arn: str) -> str:
    """The region in a Secrets Manager ARN (arn:PARTITION:secretsmanager:REGION:ACCOUNT:...)."""
    parts = arn.split(":")
    if len(parts) < 7 or parts[2] != "secretsmanager" or not parts[3]:
        raise ValueError(f"not a Secrets Manager secret ARN: {arn!r}")
    return parts[3]


class SecretCredentials:
    """The current credentials of one secret; read at once, re-read on :meth:`refresh`."""

    def __init__(self, arn: str, fetch: Callable[[str], str] | None = None) -> None:
        self.arn = arn
        self._fetch = fetch or _secrets_manager_fetch(region_of(arn))
        self._lock = threading.Lock()
        self._credentials = Credentials.from_secret_string(self._fetch(arn))
        self.reads = 1

    def current(self) -> Credentials:
        with self._lock:
            return self._credentials

    def refresh(self, stale: Credentials) -> Credentials:
        """Re-read the secret after ``stale`` was refused.

        Threads refused at the same moment share one read: whoever comes second finds the
        credentials already replaced and takes them.
        """
        with self._lock:
            if self._credentials != stale:
                return self._credentials
            self._credentials = Credentials.from_secret_string(self._fetch(self.arn))
            self.reads += 1
            return self._credentials


def _secrets_manager_fetch(region: str) -> Callable[[str], str]:
    import botocore.session

    # Untyped: the service's stubs are not installed for one call.
    client: Any = botocore.session.get_session().create_client("secretsmanager", region_name=region)

    def fetch(arn: str) -> str:
        value: str = client.get_secret_value(SecretId=arn)["SecretString"]
        return value

    return fetch


def read_secret_string(arn: str) -> str:
    """One secret's string (for secrets that are not rotated while a process runs)."""
    return _secrets_manager_fetch(region_of(arn))(arn)
