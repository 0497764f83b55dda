"""The benchmark's one HTTP client: http.client to the router, and curl to send WAV files."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class User:
    id: str
    token: str


def file_chunks(path: Path, chunk: int = 1024 * 1024) -> Iterator[bytes]:
    with path.open("rb") as f:
        while data := f.read(chunk):
            yield data


def multipart_frame(user: User, filename: str = "bench.wav") -> tuple[bytes, bytes, str]:
    """(what goes before the WAV, what goes after it, Content-Type) of a POST /records form."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="user"\r\n\r\n{user.id}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="token"\r\n\r\n{user.token}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{filename}"\r\nContent-Type: audio/wav\r\n\r\n'
    ).encode()
    return head, f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Client:
    """Requests to ``host:port`` over one kept-alive connection: one client per thread."""

    def __init__(self, host: str, port: int, timeout: float = 900.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._conn: http.client.HTTPConnection | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | Iterator[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """(status, body) of one request; the connection is reopened after an error."""
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            self._conn.request(method, path, body=body, headers=headers or {})
            response = self._conn.getresponse()
            return response.status, response.read()
        except BaseException:
            self.close()
            raise

    def create_user(self, name: str = "bench") -> User:
        status, raw = self.request("POST", "/users", json.dumps({"name": name}).encode(),
                                   JSON_HEADERS)  # fmt: skip
        body = json.loads(raw)
        if status != 201:
            raise RuntimeError(f"POST /users answered {status}: {body}")
        return User(body["id"], body["token"])

    def upload(
        self, user: User, chunks: Iterator[bytes], wav_size: int
    ) -> tuple[float, dict[str, Any]]:
        """POST /records as multipart/form-data streamed from ``chunks``; (seconds, body)."""
        head, tail, content_type = multipart_frame(user)

        def body() -> Iterator[bytes]:
            yield head
            yield from chunks
            yield tail

        headers = {
            "Content-Type": content_type,
            "Content-Length": str(len(head) + wav_size + len(tail)),
        }
        with Client(self.host, self.port, self.timeout) as own:  # uploads may run in threads
            start = time.perf_counter()
            status, raw = own.request("POST", "/records", body(), headers)
            elapsed = time.perf_counter() - start
        if status != 201:
            raise RuntimeError(f"POST /records answered {status}: {raw[:500]!r}")
        result: dict[str, Any] = json.loads(raw)
        return elapsed, result

    def upload_file(self, user: User, wav: Path) -> float:
        """POST ``wav`` with curl, as the README does; seconds from connect to the 201.

        A separate, light sender: it neither takes the bench process's GIL from the latency
        probes (figure 5) nor much of the CPU the service is measured on.
        """
        curl = shutil.which("curl")
        if curl is None:  # without curl, the in-process client sends the same request
            elapsed, _ = self.upload(user, file_chunks(wav), wav.stat().st_size)
            return elapsed
        done = subprocess.run(
            [
                curl, "--silent", "--show-error", "--output", "/dev/null",
                "--write-out", "%{http_code} %{time_total}",
                "-F", f"user={user.id}", "-F", f"token={user.token}",
                "-F", f"file=@{wav};type=audio/wav", f"http://{self.host}:{self.port}/records",
            ],
            capture_output=True, text=True, timeout=900, check=True,
        )  # fmt: skip
        status, seconds = done.stdout.split()
        if status != "201":
            raise RuntimeError(f"POST /records answered {status}")
        return float(seconds)
