"""An upload refused before its body is read reaches the client with the function's status.

The function answers 401, 415 or 422 after the fields or the WAV header, with megabytes of
the body still on the way; the router streams the body (``proxy_request_buffering off``).
Each refusal must reach the client as that status every time: never a 502 (the router
failing to write the rest of the body) and never a ``Retry-After`` for a request that
cannot succeed.
"""

from __future__ import annotations

import struct

import pytest
import requests

from devstack import ScratchStack
from tests.support import Client

pytestmark = pytest.mark.e2e

BODY_BYTES = 21_000_000
TRIES = 20


def _wav(tag: int, channels: int, rate: int, bits: int, data_bytes: int) -> bytes:
    align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits)
    return (
        b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + data_bytes) + b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"data" + struct.pack("<I", data_bytes) + bytes(data_bytes)
    )  # fmt: skip


PCM = _wav(1, 2, 44100, 16, BODY_BYTES)
ALAW = _wav(6, 1, 8000, 8, BODY_BYTES)
NO_CHANNELS = _wav(1, 0, 44100, 16, BODY_BYTES)


def _statuses(base_url: str, fields: dict[str, str], wav: bytes) -> list[tuple[int, str | None]]:
    seen = []
    with requests.Session() as session:
        for _ in range(TRIES):
            response = session.post(
                f"{base_url}/records",
                data=fields,
                files={"file": ("take.wav", wav, "audio/wav")},
                timeout=60,
            )
            seen.append((response.status_code, response.headers.get("Retry-After")))
            assert response.headers["Content-Type"] == "application/problem+json"
    return seen


@pytest.mark.parametrize(
    ("case", "status"),
    [("wrong token", 401), ("A-law audio", 415), ("invalid option", 422), ("no channels", 422)],
)
def test_an_early_refusal_of_a_large_body_reaches_the_client(
    stack: ScratchStack, client: Client, case: str, status: int
) -> None:
    base_url = stack.base_url
    user = client.create_user()
    fields = {"user": user["id"], "token": user["token"]}
    wav = PCM
    if case == "wrong token":
        fields["token"] = "00000000-0000-4000-8000-000000000000"
    elif case == "A-law audio":
        wav = ALAW
    elif case == "invalid option":
        fields["vbr_quality"] = "12"
    else:
        wav = NO_CHANNELS
    assert _statuses(base_url, fields, wav) == [(status, None)] * TRIES
