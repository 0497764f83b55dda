"""Figure 8: trickling clients cannot hold upload_record.

Four times upload_record's concurrency (its THREADS) in clients each send ``POST /records``
with a form-field header, then one byte a second, without credentials. Meanwhile probes
(an authenticated ``GET /records/uploads/<id>``, answered by the same function) run one after
another. Every probe must answer within 1 s at the 99th percentile, and every trickling
request must be answered (408) by its deadline: BODY_GRACE_SECONDS plus what the bytes it
sent buy at BODY_MIN_BYTES_PER_SECOND, with a second of slack.
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
HEAD = (
    b"POST /records HTTP/1.1\r\nHost: bench\r\n"
    b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
    b'--b\r\nContent-Disposition: form-data; name="user"\r\n\r\n'
)


def _trickle(port: int, limit: float, out: list[tuple[float, int]]) -> None:
    """One trickling request: (seconds to its answer, status; 0 when there was none)."""
    start = time.monotonic()
    status = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(HEAD)
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
                status = int(data.split(b" ", 2)[1])
                break
    out.append((time.monotonic() - start, status))


def run(bench: Bench) -> list[Row]:
    from common.platform.serve import ServerConfig
    from common.settings import Settings

    env = bench.stack.function_env("upload_record")
    threads = ServerConfig.from_env(env).threads
    settings = Settings.from_env(env)
    clients = TRICKLE_FACTOR * threads
    # A trickler sends the header and about a byte a second: what that buys is negligible.
    deadline = settings.body_grace_seconds + (len(HEAD) + 60) / settings.body_min_bytes_per_second
    log(f"8. {clients} trickling clients against upload_record ({threads} threads)")
    port = bench.stack.ports.router
    ends: list[tuple[float, int]] = []
    tricklers = [
        threading.Thread(target=_trickle, args=(port, deadline + 30, ends)) for _ in range(clients)
    ]
    for thread in tricklers:
        thread.start()
    time.sleep(0.5)
    probe_path = f"/records/uploads/{uuid.uuid4()}?user={bench.user.id}"
    headers = {"Authorization": f"Bearer {bench.user.token}"}
    latencies: list[float] = []
    statuses: set[int] = set()
    stop_at = time.monotonic() + max(1.0, deadline - 1.0)
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
    p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) > 1 else latencies[0]
    late = [took for took, status in ends if status != 408 or took > deadline + SLACK_SECONDS]
    slowest = max(took for took, _ in ends)
    bench.details.append(
        f"figure 8: probes answered {sorted(statuses)}; trickling answers "
        f"{sorted({status for _, status in ends})}, slowest after {slowest:.2f} s "
        f"(deadline {deadline:.2f} s)"
    )
    return [
        Row(
            f"8. upload_record p99 while {clients} clients trickle ({len(latencies)} requests)",
            f"{p99 * 1000:.1f} ms",
            "< 1 s",
            p99 / 1.0,
            p99 < 1.0 and statuses == {404},
        ),
        Row(
            f"8. trickling requests answered 408 by their deadline ({deadline:.1f} s + 1 s)",
            f"{clients - len(late)} of {clients} (slowest {slowest:.2f} s)",
            f"{clients} of {clients}",
            (clients - len(late)) / clients,
            not late,
        ),
    ]
