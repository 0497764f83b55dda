"""Encoding against the real store: a multipart MP3 is ffmpeg's own seekable file, byte for byte."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

from common.domain.conversion import ffmpeg_command
from common.domain.encoding import EncodingOptions
from common.domain.new_records import create_record
from common.domain.records import get_record
from common.domain.users import create_user
from common.domain.wav import parse_header

from devstack import NativeStack, wavgen
from tests.support.audio import assert_matches_source
from tests.support.probe import audio_start
from tests.support.stack_clients import build_services

MIB = 1024 * 1024


def test_a_multipart_mp3_is_ffmpegs_seekable_file_byte_for_byte(
    stack: NativeStack, tmp_path: Path
) -> None:
    """Three real S3 parts (5 MiB, the minimum), part 1 uploaded last, against ffmpeg itself."""
    services = build_services(stack, s3_part_size_bytes=5 * MIB)
    user = create_user(services.db, "Long take")
    seconds = 300.0  # 320 kbit/s: 12 MB of MP3
    options = EncodingOptions.from_fields({"bitrate_kbps": "320", "title": "Long"})
    record = create_record(
        services.db, services.storage, services.settings, user_id=user.id,
        audio=wavgen.silence_wav(seconds), filename="long.wav", options=options,
    )  # fmt: skip
    stored = b"".join(services.storage.open_read(f"users/{user.id}/records/{record.id}.mp3"))
    assert len(stored) == record.size_bytes > 2 * 5 * MIB
    header = parse_header(b"".join(itertools.islice(wavgen.silence_wav(seconds), 2)))
    assert header is not None
    reference = tmp_path / "reference.mp3"
    encoding = options.resolve(header.sample_rate, header.channels, 192)
    command = ffmpeg_command(services.settings.ffmpeg_binary, header, encoding, str(reference))
    with subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
        assert proc.stdin is not None
        for piece in wavgen.silence_wav(seconds):
            proc.stdin.write(piece)
        proc.stdin.close()
    assert proc.returncode == 0
    start = audio_start(stored)
    assert stored[start:] == reference.read_bytes()
    # 300 s of stereo 44.1 kHz silence in, the same out (about 53 MB decoded, in a test only)
    assert_matches_source(stored, b"".join(wavgen.silence_wav(seconds)))
    row = get_record(services.db, record.id)
    assert row is not None
    assert (row.bitrate_kbps, row.vbr_quality, row.tags) == (320, None, {"title": "Long"})
