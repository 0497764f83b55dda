"""Broken and hostile uploads through the router: a 2xx with a valid MP3 or a 4xx problem.

Never a 5xx, never a hung worker, never an ffmpeg process left behind; and ffmpeg reads no
file and opens no socket whatever the input says.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from common.domain.conversion import ffmpeg_command, parse_mp3_frame_header
from common.domain.encoding import Encoding
from common.domain.wav import SampleFormat, WavHeader
from common.settings import Settings
from devstack.wavgen import EXTENSIBLE, FLOAT, PCM, chunk, fmt_chunk, riff, samples, wav
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devstack import NativeStack
from tests.support import Client
from tests.support.probe import audio_start
from tests.support.stacks import ffmpeg_descendants

TONE = samples(seconds=0.2, channels=1, rate=8000, bits=16)


def mono(*, block_align: int | None = None) -> bytes:
    return fmt_chunk(channels=1, rate=8000, bits=16, block_align=block_align)


def hostile_corpus(marker_file: Path, listener_port: int) -> dict[str, bytes]:
    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:{marker_file}\n".encode()
    net_playlist = f"#EXTM3U\n#EXTINF:1,\nhttp://127.0.0.1:{listener_port}/x.wav\n".encode()
    concat = f"ffconcat version 1.0\nfile '{marker_file}'\n".encode()
    pcm_data = chunk(b"data", TONE)
    pad = bytes(len(playlist) % 2)  # whole 16-bit samples
    return {
        "empty": b"",
        "riff-only": b"RIFF",
        "garbage": os.urandom(4096),
        "truncated-header": wav(seconds=0.1)[:30],
        "no-fmt": riff(pcm_data),
        "data-before-fmt": riff(pcm_data, mono()),
        "short-fmt": riff(chunk(b"fmt ", b"\x01\x00\x01\x00"), pcm_data),
        "fmt-size-past-end": riff(chunk(b"fmt ", mono()[8:], declared=0x7FFFFFF0)),
        "data-size-past-end": riff(mono(), chunk(b"data", TONE, declared=50_000_000)),
        "data-size-unknown": riff(mono(), chunk(b"data", TONE, declared=0xFFFFFFFF)),
        "riff-size-huge": b"RIFF\xff\xff\xff\xff" + riff(mono(), pcm_data)[8:],
        "zero-channels": riff(fmt_chunk(channels=0, rate=8000, bits=16, block_align=2), pcm_data),
        "rate-zero": riff(fmt_chunk(channels=1, rate=0, bits=16), pcm_data),
        "rate-absurd": riff(fmt_chunk(channels=1, rate=2_000_000_000, bits=16), pcm_data),
        "rate-tiny": riff(fmt_chunk(channels=1, rate=1, bits=16), pcm_data),
        "odd-block-align": riff(mono(block_align=3), pcm_data),
        "zero-block-align": riff(mono(block_align=0), pcm_data),
        "bits-12": riff(fmt_chunk(channels=1, rate=8000, bits=12), pcm_data),
        "bits-zero": riff(fmt_chunk(channels=1, rate=8000, bits=0, block_align=2), pcm_data),
        "extensible-unknown-guid": riff(
            struct.pack("<4sI", b"fmt ", 40)
            + struct.pack("<HHIIHH", EXTENSIBLE, 1, 8000, 16000, 2, 16)
            + struct.pack("<HHI", 22, 16, 4)
            + os.urandom(16),
            pcm_data,
        ),
        "extensible-short": riff(
            chunk(b"fmt ", struct.pack("<HHIIHH", EXTENSIBLE, 1, 8000, 16000, 2, 16)), pcm_data
        ),
        "wav-wrapped-mp3": riff(
            chunk(b"fmt ", struct.pack("<HHIIHH", 0x55, 1, 8000, 2000, 1, 0) + bytes(14)),
            chunk(b"data", b"\xff\xfb\x90\x00" + bytes(400)),
        ),
        "wav-wrapped-adpcm": riff(
            chunk(b"fmt ", struct.pack("<HHIIHH", 0x2, 1, 8000, 4096, 256, 4) + bytes(34)),
            chunk(b"data", os.urandom(1024)),
        ),
        "float-16bit": riff(fmt_chunk(tag=FLOAT, channels=1, rate=8000, bits=16), pcm_data),
        "hls-playlist-renamed": playlist,
        "hls-playlist-to-socket": net_playlist,
        "concat-script-renamed": concat,
        "playlist-inside-wav-data": riff(mono(), chunk(b"data", playlist + pad)),
        "mp3-renamed": b"ID3\x03\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x00" + bytes(500),
        "ogg-renamed": b"OggS" + bytes(200),
        "avi-renamed": b"RIFF\x00\x10\x00\x00AVI LIST" + bytes(200),
        "rifx-big-endian": b"RIFX" + riff(mono(), pcm_data)[4:],
        "rf64-without-ds64": b"RF64" + riff(mono(), pcm_data)[4:],
        "huge-list-chunk": riff(mono(), chunk(b"LIST", b"", declared=0x7FFFFFFF)),
        "nonprintable-chunk-id": riff(mono(), chunk(b"\x00\x01\x02\x03", b"xx"), pcm_data),
        "empty-data": riff(mono(), chunk(b"data", b"")),
        "one-sample": riff(mono(), chunk(b"data", b"\x00\x10")),
        "half-sample": riff(mono(), chunk(b"data", b"\x00")),
        "eight-channels-192k-float64": riff(
            fmt_chunk(tag=FLOAT, channels=8, rate=192000, bits=64),
            chunk(b"data", samples(seconds=0.05, channels=8, rate=192000, bits=64, tag=FLOAT)),
        ),
        "many-tiny-chunks": riff(mono(), *[chunk(b"junk", b"x") for _ in range(2000)], pcm_data),
        "valid-with-trailing-garbage": riff(mono(), pcm_data) + os.urandom(3000),
    }


@pytest.fixture(scope="module")
def user(stack: NativeStack) -> dict[str, str]:
    response = requests.post(f"{stack.base_url}/users", json={"name": "Mallory"}, timeout=10)
    assert response.status_code == 201
    body: dict[str, str] = response.json()
    return body


class Listener:
    """A TCP port that records whether anything ever connected to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    lst = Listener()
    yield lst
    lst.close()


@pytest.fixture
def marker_file(tmp_path: Path) -> Path:
    """A readable local WAV whose content must never come back in anyone's MP3."""
    path = tmp_path / "secret.wav"
    path.write_bytes(wav(seconds=3.0, channels=1, rate=8000))
    path.chmod(0o644)
    tmp_path.chmod(0o755)
    return path


def check_answer(response: requests.Response, case: str) -> None:
    assert response.status_code < 500, (case, response.status_code, response.text)
    if response.status_code == 201:
        record = response.json()
        assert record["size_bytes"] > 0
        download = requests.get(record["url"], timeout=30)
        assert download.status_code == 200, case
        start = audio_start(download.content)
        assert parse_mp3_frame_header(download.content[start : start + 4]) is not None, case
        assert len(download.content) == record["size_bytes"]
    else:
        assert 400 <= response.status_code < 500, case
        assert response.headers["Content-Type"] == "application/problem+json", case
        problem = response.json()
        assert problem["status"] == response.status_code
        assert problem["title"] and problem["detail"]


def test_hostile_corpus_never_5xx_and_leaves_no_ffmpeg(
    stack: NativeStack, user: dict[str, str], marker_file: Path, listener: Listener
) -> None:
    corpus = hostile_corpus(marker_file, listener.port)
    with requests.Session() as session:
        for case, body in corpus.items():
            response = session.post(
                f"{stack.base_url}/records",
                data={"user": user["id"], "token": user["token"]},
                files={"file": (f"{case}.wav", body, "audio/wav")},
                timeout=60,
            )
            check_answer(response, case)
            if case.startswith(("hls", "concat", "mp3", "ogg", "avi", "wav-wrapped")):
                assert response.status_code in (415, 422), (case, response.text)
            if case == "playlist-inside-wav-data":
                # Taken as 16-bit PCM samples (noise), never as a playlist: its own duration.
                assert response.status_code == 201
                assert response.json()["duration_seconds"] < 0.1
            # The same bytes as a raw audio/wav body.
            raw = session.post(
                f"{stack.base_url}/records",
                params={"user": user["id"]},
                data=body,
                headers={
                    "Authorization": f"Bearer {user['token']}",
                    "Content-Type": "audio/wav",
                },
                timeout=60,
            )
            check_answer(raw, case)
    assert listener.connections == 0
    assert ffmpeg_descendants(stack) == []
    assert requests.get(f"{stack.base_url}/healthz", timeout=10).status_code == 200


def valid_header() -> bytes:
    return riff(mono(), chunk(b"data", TONE))[:44]


@st.composite
def mutated_wavs(draw: st.DrawFn) -> bytes:
    header = bytearray(valid_header())
    fields = {  # offset: struct format of the canonical 44-byte header
        4: "<I",
        16: "<I",
        20: "<H",
        22: "<H",
        24: "<I",
        28: "<I",
        32: "<H",
        34: "<H",
        40: "<I",
    }
    for offset, fmt in draw(st.lists(st.sampled_from(sorted(fields.items())), max_size=4)):
        width = struct.calcsize(fmt)
        value = draw(
            st.one_of(
                st.sampled_from([0, 1, 2, 3, 8, 16, 24, 32, 64, 0xFFFE, 8000, 44100, 192000]),
                st.integers(0, 2 ** (8 * width) - 1),
            )
        )
        struct.pack_into(fmt, header, offset, value % (2 ** (8 * width)))
    for _ in range(draw(st.integers(0, 3))):
        position = draw(st.integers(0, len(header) - 1))
        header[position] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(TONE)))
    return bytes(header) + TONE[:cut] + draw(st.binary(max_size=64))


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=mutated_wavs())
def test_mutated_headers_never_5xx(stack: NativeStack, user: dict[str, str], body: bytes) -> None:
    response = requests.post(
        f"{stack.base_url}/records",
        params={"user": user["id"]},
        data=body,
        headers={"Authorization": f"Bearer {user['token']}", "Content-Type": "audio/wav"},
        timeout=60,
    )
    check_answer(response, body[:44].hex())


def test_no_ffmpeg_left_after_fuzzing(stack: NativeStack) -> None:
    assert ffmpeg_descendants(stack) == []


# --- the sandbox of ffmpeg itself, as a second line behind the WAV gate -------------------

HEADER = WavHeader(SampleFormat.PCM, 1, 8000, 16, 2, 44, None)


def run_ffmpeg(command: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(command, input=stdin, capture_output=True, timeout=60, check=False)


def service_command(output: Path) -> list[str]:
    encoding = Encoding(sample_rate=8000, channels=1, bitrate_kbps=64, vbr_quality=None)
    command = ffmpeg_command(Settings.from_env({}).ffmpeg_binary, HEADER, encoding, str(output))
    assert command[command.index("-protocol_whitelist") + 1] == "pipe"
    assert command[command.index("-f") + 1] == "wav"
    return command


def written(output: Path) -> int:
    return output.stat().st_size if output.exists() else 0


@pytest.mark.parametrize("scheme", ["path", "file", "http", "tcp"])
def test_ffmpeg_as_the_service_runs_it_opens_no_file_and_no_socket(
    scheme: str, marker_file: Path, listener: Listener, tmp_path: Path
) -> None:
    """Point the service's own ffmpeg command at a file or a socket instead of its pipe."""
    url = {
        "path": str(marker_file),
        "file": f"file:{marker_file}",
        "http": f"http://127.0.0.1:{listener.port}/a.wav",
        "tcp": f"tcp://127.0.0.1:{listener.port}",
    }[scheme]
    output = tmp_path / "out.mp3"
    command = service_command(output)
    command[command.index("pipe:0")] = url
    result = run_ffmpeg(command)
    assert result.returncode != 0
    assert written(output) == 0, "ffmpeg read the local file"
    assert listener.connections == 0, "ffmpeg opened a socket"
    # The control: the same command with the whitelist widened does read the file.
    if scheme in ("path", "file"):
        widened = list(command)
        widened[widened.index("-protocol_whitelist") + 1] = "pipe,file"
        run_ffmpeg(widened)
        assert written(output) > 10_000


@pytest.mark.parametrize("scheme", ["http", "tcp", "pipe"])
def test_ffmpeg_output_is_only_a_file(scheme: str, listener: Listener, tmp_path: Path) -> None:
    """The output whitelist is 'file': an output URL of another protocol is refused."""
    url = {
        "http": f"http://127.0.0.1:{listener.port}/out.mp3",
        "tcp": f"tcp://127.0.0.1:{listener.port}",
        "pipe": "pipe:1",
    }[scheme]
    command = service_command(tmp_path / "out.mp3")
    command[-1] = url
    result = run_ffmpeg(command, riff(mono(), chunk(b"data", TONE)))
    assert result.returncode != 0
    assert result.stdout == b""
    assert listener.connections == 0


def test_ffmpeg_playlist_demuxer_cannot_reach_files_or_sockets(
    marker_file: Path, listener: Listener, tmp_path: Path
) -> None:
    """Even with the WAV demuxer swapped for concat (unsafe names allowed), nothing leaks."""
    output = tmp_path / "out.mp3"
    command = service_command(output)
    command[command.index("-f") + 1] = "concat"
    command[command.index("-i") : command.index("-i")] = ["-safe", "0"]
    script = (
        f"ffconcat version 1.0\nfile 'file:{marker_file}'\n"
        f"file 'http://127.0.0.1:{listener.port}/a.wav'\n"
    ).encode()
    result = run_ffmpeg(command, script)
    assert listener.connections == 0
    assert written(output) < 1000, result.stderr[-500:]
    widened = list(command)
    widened[widened.index("-protocol_whitelist") + 1] = "pipe,file"
    run_ffmpeg(widened, script)
    assert written(output) > 10_000  # the control: it would leak


def test_the_wav_gate_refuses_playlists_before_ffmpeg(client: Client, marker_file: Path) -> None:
    user = client.create_user("Eve")
    playlist = f"#EXTM3U\n#EXTINF:3,\n{marker_file}\n".encode()
    response = client.upload(user, playlist, filename="list.m3u8")
    assert response.status_code == 415
    assert response.json()["type"].endswith("not-a-wav")


def test_supported_formats_still_convert(client: Client) -> None:
    """The gate is not simply closed: every accepted variant converts."""
    user = client.create_user("Bob")
    for kwargs in (
        {"bits": 8, "channels": 1},
        {"bits": 24, "channels": 2},
        {"bits": 32, "tag": FLOAT, "channels": 1},
        {"bits": 16, "channels": 2, "extensible": True, "tag": PCM},
    ):
        response = client.upload(user, wav(seconds=0.2, rate=22050, **kwargs))  # type: ignore[arg-type]
        check_answer(response, str(kwargs))
        assert response.status_code == 201, (kwargs, response.text)
