"""The ID3 reader (mutagen) on tags as other writers make them, and the writer read back."""

from __future__ import annotations

import io

from common.domain.id3 import build_tag, read_tag
from mutagen.id3 import COMM, ID3, TIT2, TPE1, TYER, Encoding


def _v23_tag() -> bytes:
    tag = ID3()
    tag.add(TIT2(encoding=Encoding.UTF16, text="Première"))
    tag.add(TPE1(encoding=Encoding.LATIN1, text=["Ann", "Bo"]))
    tag.add(TYER(encoding=Encoding.LATIN1, text="1999"))
    tag.add(COMM(encoding=Encoding.UTF16, lang="eng", desc="iTunNORM", text="data"))
    tag.add(COMM(encoding=Encoding.UTF16, lang="eng", desc="", text="kept"))
    out = io.BytesIO()
    tag.save(out, v2_version=3)
    return out.getvalue()


def test_a_v23_tag_reads_as_the_five_fields() -> None:
    assert read_tag(_v23_tag() + b"audio after the tag") == {
        "title": "Première",
        "artist": "Ann/Bo",  # v2.3 has one value per frame: mutagen joins them with /
        "date": "1999",
        "comment": "kept",
    }


def test_the_tag_written_reads_back() -> None:
    tags = {"title": "T", "artist": "A", "album": "Al", "date": "2020-05", "comment": "c"}
    assert read_tag(build_tag(tags)) == tags
    assert build_tag({}) == b""


def test_no_tag_or_a_broken_one_reads_as_none() -> None:
    assert read_tag(b"RIFF....") == {}
    assert read_tag(b"ID3\x04\x00\x00\x00\x00\x00\x20" + b"\xff" * 8) == {}
