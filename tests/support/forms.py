"""Request bodies built the way the tests' HTTP client builds them."""

from __future__ import annotations

import requests


def multipart(fields: dict[str, str], file: tuple[str, bytes, str]) -> tuple[str, bytes]:
    """(content type, body) of a multipart/form-data request as requests builds it."""
    prepared = requests.Request(
        "POST", "http://example.invalid/", data=fields, files={"file": file}
    ).prepare()
    assert isinstance(prepared.body, bytes)
    return prepared.headers["Content-Type"], prepared.body
