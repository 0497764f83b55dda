"""Clients that send slowly, for the tests of deadlines and shutdowns (native and compose):
raw sockets, so a test controls every byte and when it goes."""

from __future__ import annotations

import select
import socket
import struct
import time
import uuid
from typing import Any

# How long a trickling client waits for its answer at most.
ANSWER_WITHIN = 45.0


def answer_after(
    port: int, head: bytes, trickle: bool, out: list[tuple[float, int]], on_for: float = 0.0
) -> None:
    """Send ``head``, then a byte a second (or nothing); (seconds to the answer, status).
    After the answer, a byte a second goes on until ``on_for`` seconds from the start."""
    start = time.monotonic()
    status = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head)
        sock.settimeout(1.0)
        while time.monotonic() - start < ANSWER_WITHIN:
            try:
                got = sock.recv(4096)
            except TimeoutError:
                if trickle:
                    sock.sendall(b"x")
                continue
            if got:
                status = int(got.split(b" ", 2)[1])
            break
        out.append((time.monotonic() - start, status))
        while time.monotonic() - start < on_for:
            time.sleep(1.0)
            try:
                sock.sendall(b"x")
            except OSError:
                break


def form_head(fields: bytes, length: int = 10_000_000) -> bytes:
    return (
        b"POST /records HTTP/1.1\r\nHost: t\r\nContent-Length: " + str(length).encode()
        + b"\r\nContent-Type: multipart/form-data; boundary=b\r\n\r\n" + fields
    )  # fmt: skip


def wav_start() -> bytes:
    fmt = struct.pack("<HHIIHH", 1, 2, 44100, 176400, 4, 16)
    return b"RIFF" + struct.pack("<I", 0) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt


def form_fields(user: dict[str, str], token: str) -> bytes:
    form = b"".join(
        b'--b\r\nContent-Disposition: form-data; name="' + name + b'"\r\n\r\n' + value + b"\r\n"
        for name, value in ((b"user", user["id"].encode()), (b"token", token.encode()))
    )
    return form + b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'


def upload_form(user: dict[str, str], audio: bytes) -> tuple[bytes, str]:
    boundary = "upload-" + uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="user"\r\n\r\n{user["id"]}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="token"\r\n\r\n'
        f"{user['token']}\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="t.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    return head + audio + f"\r\n--{boundary}--\r\n".encode(), boundary


def paced_upload(
    port: int, user: dict[str, str], audio: bytes, seconds: float, out: dict[str, Any]
) -> None:
    """POST /records straight to the function, its body spread over ``seconds``."""
    body, boundary = upload_form(user, audio)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(
            (
                "POST /records HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
        )
        step = 32 * 1024
        pause = seconds / max(1, len(body) // step)
        for at in range(0, len(body), step):
            try:
                sock.sendall(body[at : at + step])
            except OSError:
                break  # the server answered and closed
            if select.select([sock], [], [], pause)[0]:
                break  # answered early (a router keeps reading what is left): stop sending
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            pass
    head, _, payload = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    out["status"] = int(lines[0].split()[1]) if data else 0
    out["headers"] = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:])
    }
    out["body"] = payload
    out["at"] = time.monotonic()
