"""Slow clients cannot hold a function, and each is cut off by its deadline, in any phase.

A stack of its own with BODY_GRACE_SECONDS=3. Four times the function's threads in clients
trickle a form field, unauthenticated (one byte a second), or send whole fields with a wrong
token and then trickle the file; meanwhile requests to the same function (uploads too) keep
answering. An authenticated client that stalls in the WAV header or in the audio gets a 408
at its deadline too, though no further byte arrives, and one that bursts then trickles gets it
at BODY_DEADLINE_SECONDS. With DOWNLOAD_MODE=stream, slow readers leave get_record free.
"""

from __future__ import annotations

import http.client
import socket
import statistics
import struct
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import requests

from devstack import ScratchStack, wavgen
from tests.support.slow_clients import answer_after, form_fields, form_head, wav_start
from tests.support.stacks import running_stack

GRACE = 3.0
BODY_DEADLINE = 20.0
THREADS = 8  # running_stack's
SLACK = 2.5  # a loaded 2-core machine


@pytest.fixture(scope="module")
def slow_stack() -> Iterator[ScratchStack]:
    env = {"BODY_GRACE_SECONDS": str(GRACE), "BODY_DEADLINE_SECONDS": str(BODY_DEADLINE)}
    with running_stack("records-slow-", env) as native:
        yield native


def _user(stack: ScratchStack) -> dict[str, str]:
    response = requests.post(f"{stack.base_url}/users", json={"name": "Slow"}, timeout=10)
    assert response.status_code == 201
    body: dict[str, str] = response.json()
    return body


def test_trickling_clients_leave_the_function_free_and_end_by_their_deadline(
    slow_stack: ScratchStack,
) -> None:
    user = _user(slow_stack)
    port = slow_stack.ports.router
    head = form_head(b'--b\r\nContent-Disposition: form-data; name="user"\r\n\r\n')
    ends: list[tuple[float, int]] = []
    clients = [
        threading.Thread(target=answer_after, args=(port, head, True, ends))
        for _ in range(4 * THREADS)
    ]
    for thread in clients:
        thread.start()
    time.sleep(0.5)
    latencies: list[float] = []
    while len(latencies) < 20:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        start = time.monotonic()
        conn.request(
            "GET",
            f"/records/uploads/{uuid.uuid4()}?user={user['id']}",
            headers={"Authorization": f"Bearer {user['token']}"},
        )
        assert conn.getresponse().status == 404
        latencies.append(time.monotonic() - start)
        conn.close()
        time.sleep(0.1)
    for thread in clients:
        thread.join()
    assert statistics.quantiles(latencies, n=100)[98] < 1.0, latencies
    assert {status for _, status in ends} == {408}
    assert max(took for took, _ in ends) < GRACE + SLACK, sorted(ends)
    assert min(took for took, _ in ends) >= GRACE - 0.1


@pytest.mark.parametrize("phase", ["WAV header", "audio"])
def test_an_authenticated_upload_that_stalls_gets_408_at_its_deadline(
    slow_stack: ScratchStack, phase: str
) -> None:
    user = _user(slow_stack)
    fields = form_fields(user, user["token"])
    wav = wav_start()
    if phase == "audio":
        wav += b"data" + struct.pack("<I", 0) + bytes(200_000)
    body_so_far = len(fields) + len(wav)
    ends: list[tuple[float, int]] = []
    answer_after(slow_stack.ports.router, form_head(fields + wav), False, ends)
    [(took, status)] = ends
    assert status == 408
    # The deadline: the grace, plus what the bytes sent buy at the minimum rate (16 KiB/s).
    assert took < GRACE + body_so_far / (16 * 1024) + SLACK
    assert took >= GRACE - 0.1


@pytest.mark.parametrize("via", ["router", "upload_record"])
def test_refused_clients_that_trickle_on_hold_no_thread(slow_stack: ScratchStack, via: str) -> None:
    """A wrong token with its fields complete is answered 401 at once; what it trickles after
    the answer (for 12 s) is drained without a thread, so uploads and the other routes keep
    answering meanwhile. Through the router, which ends the upstream request once answered,
    and straight to the function, as a platform without such a router sends it."""
    user = _user(slow_stack)
    port = getattr(slow_stack.ports, via)
    head = form_head(form_fields(user, str(uuid.uuid4())) + wav_start())
    ends: list[tuple[float, int]] = []
    clients = [
        threading.Thread(target=answer_after, args=(port, head, True, ends, 12.0))
        for _ in range(4 * THREADS)
    ]
    for thread in clients:
        thread.start()
    time.sleep(1.0)
    wav = wavgen.wav(seconds=0.5)
    latencies: list[float] = []
    statuses: list[int] = []
    stop_at = time.monotonic() + 10.0  # the refused bodies trickle on all along
    while time.monotonic() < stop_at:
        start = time.monotonic()
        if len(latencies) % 2:
            response = requests.get(
                f"{slow_stack.base_url}/records/uploads/{uuid.uuid4()}",
                params={"user": user["id"]},
                headers={"Authorization": f"Bearer {user['token']}"},
                timeout=30,
            )
        else:
            response = requests.post(
                f"{slow_stack.base_url}/records",
                params={"user": user["id"]},
                headers={"Authorization": f"Bearer {user['token']}", "Content-Type": "audio/wav"},
                data=wav,
                timeout=30,
            )
        latencies.append(time.monotonic() - start)
        statuses.append(response.status_code)
        time.sleep(0.1)
    for thread in clients:
        thread.join()
    assert set(statuses) == {201, 404}, statuses
    assert statistics.quantiles(latencies, n=100)[98] < 1.0, latencies
    assert {status for _, status in ends} == {401}, sorted(ends)
    assert max(took for took, _ in ends) < SLACK, sorted(ends)


def test_a_body_that_bursts_then_trickles_ends_at_the_absolute_deadline(
    slow_stack: ScratchStack,
) -> None:
    """Half a megabyte at once buys 30 s at the minimum rate; the body's deadline comes first."""
    user = _user(slow_stack)
    wav = wav_start() + b"data" + struct.pack("<I", 0) + bytes(512 * 1024)
    ends: list[tuple[float, int]] = []
    answer_after(
        slow_stack.ports.router, form_head(form_fields(user, user["token"]) + wav), True, ends
    )
    [(took, status)] = ends
    assert status == 408
    assert BODY_DEADLINE - 0.1 <= took < BODY_DEADLINE + SLACK


STALL_DROP_SECONDS = 30.0  # the bridge's SEND_STALL_SECONDS, and the router's send_timeout
READERS = 6


def _slow_reader(port: int, path: str, token: str, reads: int, out: list[tuple[int, str]]) -> None:
    """Take 32 KiB every 2 s ``reads`` times, then nothing: (bytes taken, how it ended)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # before connect
        sock.connect(("127.0.0.1", port))
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        sock.settimeout(10.0)
        taken = 0
        for _ in range(reads):
            want = 32 * 1024
            while want:
                got = sock.recv(want)
                if not got:
                    out.append((taken, "closed while read"))
                    return
                taken += len(got)
                want -= len(got)
            time.sleep(2.0)
        time.sleep(STALL_DROP_SECONDS + 10.0)  # stalled: the server must give up on it
        sock.settimeout(5.0)
        try:
            while got := sock.recv(1024 * 1024):
                taken += len(got)
        except ConnectionResetError:
            out.append((taken, "reset"))
            return
        except TimeoutError:
            out.append((taken, "still open"))
            return
        out.append((taken, "closed"))


def test_slow_readers_leave_a_streaming_get_record_free(slow_stack: ScratchStack) -> None:
    """DOWNLOAD_MODE=stream, get_record with 2 threads: six readers taking 32 KiB every 2 s of
    a 14 MB MP3 hold none of them; others' downloads keep a p99 under 1 s; each slow reader
    that then stops reading is dropped once it has taken nothing for 30 s."""
    user = _user(slow_stack)
    auth = {"Authorization": f"Bearer {user['token']}"}

    def upload(wav: bytes, **options: str) -> dict[str, str]:
        response = requests.post(
            f"{slow_stack.base_url}/records",
            params={"user": user["id"], **options},
            headers={**auth, "Content-Type": "audio/wav"},
            data=wav,
            timeout=120,
        )
        assert response.status_code == 201, response.text
        record: dict[str, str] = response.json()
        return record

    # 360 s of mono 32 kHz at 320 kbit/s: 14.4 MB of MP3.
    silence = bytes(360 * 32000 * 2)
    big_wav = wavgen.riff(wavgen.fmt_chunk(channels=1, rate=32000), wavgen.chunk(b"data", silence))
    big = upload(big_wav, bitrate_kbps="320")
    assert 14_000_000 < int(big["size_bytes"]) < 15_000_000
    small = upload(wavgen.wav(seconds=0.5))
    slow_stack.restart_function("get_record", {"DOWNLOAD_MODE": "stream", "THREADS": "2"})
    try:
        ends: list[tuple[int, str]] = []
        readers = [
            threading.Thread(
                target=_slow_reader,
                args=(
                    slow_stack.ports.router,
                    f"/record?id={big['id']}&user={user['id']}",
                    user["token"],
                    6,
                    ends,
                ),
            )
            for _ in range(READERS)
        ]
        for thread in readers:
            thread.start()
        time.sleep(1.0)
        latencies: list[float] = []
        stop_at = time.monotonic() + 10.0
        while time.monotonic() < stop_at:
            start = time.monotonic()
            response = requests.get(
                f"{slow_stack.base_url}/record",
                params={"id": small["id"], "user": user["id"]},
                headers=auth,
                timeout=30,
            )
            latencies.append(time.monotonic() - start)
            assert response.status_code == 200
            assert len(response.content) == int(small["size_bytes"])
            time.sleep(0.1)
        for thread in readers:
            thread.join()
    finally:
        slow_stack.restart_function("get_record")
    assert statistics.quantiles(latencies, n=100)[98] < 1.0, latencies
    assert len(ends) == READERS
    for taken, how in ends:
        assert how in ("closed", "reset"), ends
        assert 6 * 32 * 1024 <= taken < int(big["size_bytes"]), ends
