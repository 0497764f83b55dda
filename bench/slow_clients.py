"""Figure 8: trickling clients cannot hold upload_record.

Four times upload_record's concurrency (its THREADS) in clients each send ``POST /records``
and then one byte a second, in two rounds: without credentials, stopping inside a form field;
then with whole fields carrying a wrong token. Meanwhile probes (an authenticated
``GET /records/uploads/<id>``, answered by the same function) run one after another. Every
probe must answer within 1 s at the 99th percentile, and every trickling request must be
answered by its deadline: the first round 408 at BODY_GRACE_SECONDS plus what the bytes it
sent buy at BODY_MIN_BYTES_PER_SECOND, the second 401 at once; each with a second of slack.
"""

from __future__ import annotations

import http.client
import socket
import statistics
import threading
import time
import uuid

from bench.core import Bench, Row, log

TRICKLE_FACTOR = 4
SLACK_SECONDS = 1.0
# A refused request is answered when its fields are in; its trickle goes on this long.
REFUSED_TRICKLE_SECONDS = 10.0
HEAD = (
    b"POST /records HTTP/1.1\r\nHost: bench\r\n"
    b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
)
PARTIAL_FIELD = b'--b\r\nContent-Disposition: form-data; name="user"\r\n\r\n'


def _refused_fields(user_id: str) -> bytes:
    """Whole fields with a token that is not the user's, and the start of the file part."""
    fields = ((b"user", user_id.encode()), (b"token", str(uuid.uuid4()).encode()))
    return b"".join(
        b'--b\r\nContent-Disposition: form-data; name="' + name + b'"\r\n\r\n' + value + b"\r\n"
        for name, value in fields
    ) + (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF')


def _trickle(
    port: int, head: bytes, limit: float, out: list[tuple[float, int]], on_for: float = 0.0
) -> None:
    """One trickling request: (seconds to its answer, status; 0 when there was none). After
    the answer it trickles on until ``on_for`` seconds from its start."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head)
        out.append(_answer(sock, start, limit))
        while time.monotonic() - start < on_for:
            time.sleep(1.0)
            try:
                sock.sendall(b"x")
            except OSError:
                break


def _answer(sock: socket.socket, start: float, limit: float) -> tuple[float, int]:
    """Wait for the status line, sending a byte a second meanwhile."""
    sock.settimeout(1.0)
    data = b""
    while time.monotonic() - start < limit:
        try:
            got = sock.recv(4096)
        except TimeoutError:
            try:
                sock.sendall(b"x")
            except OSError:
                break
            continue
        if not got:
            break
        data += got
        if b"\r\n" in data:
            return time.monotonic() - start, int(data.split(b" ", 2)[1])
    return time.monotonic() - start, 0


def _round(
    bench: Bench, head: bytes, clients: int, deadline: float, probe_seconds: float
) -> tuple[list[float], set[int], list[tuple[float, int]]]:
    # Refused requests (deadline 0) trickle on after their answer while the probes run.
    on_for = probe_seconds + 1.0 if deadline == 0.0 else 0.0
    """Trickle ``clients`` requests while probing: (probe latencies, probe statuses, ends)."""
    port = bench.stack.ports.router
    ends: list[tuple[float, int]] = []
    limit = max(deadline, probe_seconds) + 30
    tricklers = [
        threading.Thread(target=_trickle, args=(port, head, limit, ends, on_for))
        for _ in range(clients)
    ]
    for thread in tricklers:
        thread.start()
    time.sleep(0.5)
    probe_path = f"/records/uploads/{uuid.uuid4()}?user={bench.user.id}"
    headers = {"Authorization": f"Bearer {bench.user.token}"}
    latencies: list[float] = []
    statuses: set[int] = set()
    stop_at = time.monotonic() + probe_seconds
    while time.monotonic() < stop_at:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        start = time.monotonic()
        conn.request("GET", probe_path, headers=headers)
        response = conn.getresponse()
        response.read()
        latencies.append(time.monotonic() - start)
        statuses.add(response.status)
        conn.close()
        time.sleep(0.05)
    for thread in tricklers:
        thread.join()
    return latencies, statuses, ends


def _rows(
    what: str,
    clients: int,
    status: int,
    deadline: float,
    measured: tuple[list[float], set[int], list[tuple[float, int]]],
) -> list[Row]:
    latencies, statuses, ends = measured
    p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) > 1 else latencies[0]
    late = [took for took, got in ends if got != status or took > deadline + SLACK_SECONDS]
    slowest = max(took for took, _ in ends)
    return [
        Row(
            f"8. upload_record p99 while {clients} {what} ({len(latencies)} requests)",
            f"{p99 * 1000:.1f} ms",
            "< 1 s",
            p99 / 1.0,
            p99 < 1.0 and statuses == {404},
        ),
        Row(
            f"8. those answered {status} by their deadline ({deadline:.1f} s + 1 s)",
            f"{clients - len(late)} of {clients} (slowest {slowest:.2f} s)",
            f"{clients} of {clients}",
            (clients - len(late)) / clients,
            not late,
        ),
    ]


def run(bench: Bench) -> list[Row]:
    from common.platform.serve import ServerConfig
    from common.settings import Settings

    env = bench.stack.function_env("upload_record")
    threads = ServerConfig.from_env(env).threads
    settings = Settings.from_env(env)
    clients = TRICKLE_FACTOR * threads
    head = HEAD + PARTIAL_FIELD
    # A trickler sends the header and about a byte a second: what that buys is negligible.
    deadline = settings.body_grace_seconds + (len(head) + 60) / settings.body_min_bytes_per_second
    log(f"8. {clients} trickling clients against upload_record ({threads} threads)")
    slow = _round(bench, head, clients, deadline, max(1.0, deadline - 1.0))
    log(f"8. {clients} refused clients trickling on against upload_record")
    refused = _round(
        bench, HEAD + _refused_fields(str(bench.user.id)), clients, 0.0, REFUSED_TRICKLE_SECONDS
    )
    for name, (_, statuses, ends) in (("trickling", slow), ("refused", refused)):
        bench.details.append(
            f"figure 8, {name}: probes answered {sorted(statuses)}; trickling answers "
            f"{sorted({status for _, status in ends})}, slowest after "
            f"{max(took for took, _ in ends):.2f} s"
        )
    return [
        *_rows("clients trickle a field", clients, 408, deadline, slow),
        *_rows("refused clients trickle on", clients, 401, 0.0, refused),
    ]
