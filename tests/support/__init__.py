"""What the tests share: the checkout's root, a client of the running service, the stacks'
stand-ins (:mod:`tests.support.stack_clients`), MP3 probes and Lambda events."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]


def image_botocore_services() -> set[str]:
    """The services whose botocore models the Dockerfile keeps (ARG BOTOCORE_SERVICES)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    (listed,) = re.findall(r'^ARG BOTOCORE_SERVICES="([^"]+)"', dockerfile, re.MULTILINE)
    return set(listed.split())


@dataclass
class Client:
    """A user of the running service, speaking HTTP to the router."""

    base_url: str
    session: requests.Session

    def create_user(self, name: str = "Alice") -> dict[str, str]:
        response = self.session.post(f"{self.base_url}/users", json={"name": name}, timeout=10)
        assert response.status_code == 201, response.text
        body: dict[str, str] = response.json()
        return body

    def upload(
        self,
        user: dict[str, str],
        wav: bytes,
        filename: str = "take.wav",
        **kwargs: object,
    ) -> requests.Response:
        return self.session.post(
            f"{self.base_url}/records",
            data={"user": user["id"], "token": user["token"]},
            files={"file": (filename, wav, "audio/wav")},
            timeout=120,
            **kwargs,  # type: ignore[arg-type]
        )
