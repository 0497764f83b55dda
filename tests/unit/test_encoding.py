"""Per-upload encoding options and tags: validation, the one bitrate table, ID3 in and out."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml
from common.domain import conversion, encoding
from common.domain.encoding import (
    TAG_MAX_CHARS,
    EncodingOptions,
    InvalidOption,
    bitrates_for,
    clean_file_tag,
)
from common.domain.id3 import build_tag, read_tag
from common.domain.new_records import mp3_filename
from common.domain.wav import file_tags, parse_header, trailing_metadata
from common.settings import MP3_BITRATES_MPEG1, MP3_BITRATES_MPEG2

from devstack import wavgen
from tests.support.probe import read_id3

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"bitrate_kbps": "191"}, "bitrate_kbps"),
        ({"bitrate_kbps": "abc"}, "bitrate_kbps"),
        ({"bitrate_kbps": True}, "bitrate_kbps"),
        ({"bitrate_kbps": "128", "vbr_quality": "2"}, "vbr_quality"),
        ({"vbr_quality": "10"}, "vbr_quality"),
        ({"vbr_quality": -1}, "vbr_quality"),
        ({"channels": "3"}, "channels"),
        ({"channels": "0"}, "channels"),
        ({"sample_rate": "44000"}, "sample_rate"),
        ({"sample_rate": "96000"}, "sample_rate"),
        ({"sample_rate": "22050", "bitrate_kbps": "192"}, "bitrate_kbps"),  # MPEG-2: 160 max
        ({"sample_rate": "8000", "bitrate_kbps": "80"}, "bitrate_kbps"),  # MPEG-2.5: 64 max
        ({"sample_rate": "44100", "bitrate_kbps": "8"}, "bitrate_kbps"),  # MPEG-1: 32 min
        ({"title": "two\nlines"}, "title"),
        ({"artist": "nul\x00byte"}, "artist"),
        ({"comment": "bell\x07"}, "comment"),
        ({"album": "c1 control \x85"}, "album"),
        ({"title": "lone surrogate \ud800"}, "title"),
        ({"title": "x" * 251}, "title"),
        ({"comment": "x" * 1001}, "comment"),
        ({"date": "last tuesday"}, "date"),
        ({"date": 2024}, "date"),
        ({"date": "2024-13-45"}, "date"),
        ({"date": "2023-02-29"}, "date"),
        ({"date": "2024-05-31T24:00"}, "date"),
    ],
)
def test_invalid_values_are_refused_naming_the_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidOption) as info:
        EncodingOptions.from_fields(fields)
    assert info.value.status == 422
    assert info.value.field == field
    assert f"'{field}'" in info.value.detail
    assert info.value.to_problem()["field"] == field


def test_valid_values_from_a_form_or_json() -> None:
    form = EncodingOptions.from_fields(
        {"user": "u", "token": "t", "bitrate_kbps": "160", "channels": "1",
         "sample_rate": "22050", "title": "T", "date": "2024-05", "artist": ""}
    )  # fmt: skip
    assert (form.bitrate_kbps, form.channels, form.sample_rate) == (160, 1, 22050)
    assert form.tags == {"title": "T", "date": "2024-05"}  # empty = not given
    json_body = EncodingOptions.from_fields({"vbr_quality": 0, "channels": 2})
    assert (json_body.vbr_quality, json_body.channels) == (0, 2)
    assert EncodingOptions.from_fields({}) == EncodingOptions()
    limit = EncodingOptions.from_fields({k: "1999" if k == "date" else "é" * n
                                         for k, n in TAG_MAX_CHARS.items()})  # fmt: skip
    assert len(limit.tags["comment"]) == 1000


def test_json_round_trip_and_a_tampered_row_is_checked_again() -> None:
    options = EncodingOptions.from_fields(
        {"vbr_quality": "3", "title": "Song", "sample_rate": 48000}
    )
    assert EncodingOptions.from_json(options.to_json()) == options
    assert EncodingOptions.from_json(None) == EncodingOptions()
    with pytest.raises(InvalidOption):
        EncodingOptions.from_json({"bitrate_kbps": 999})


def test_resolve_against_the_source() -> None:
    default = EncodingOptions()
    assert default.resolve(44100, 6, 192) == encoding.Encoding(44100, 2, 192, None)
    # The deployment default where the output rate cannot carry it: the version's maximum,
    # as LAME itself would choose (and as the service did before options).
    assert default.resolve(8000, 1, 192) == encoding.Encoding(8000, 1, 64, None)
    assert default.resolve(22050, 1, 192).bitrate_kbps == 160
    assert default.resolve(96000, 2, 192).sample_rate == 48000
    with pytest.raises(InvalidOption) as info:
        EncodingOptions(bitrate_kbps=320).resolve(16000, 1, 192)
    assert info.value.field == "bitrate_kbps"
    vbr = EncodingOptions(vbr_quality=5, channels=1).resolve(44100, 2, 192)
    assert vbr == encoding.Encoding(44100, 1, None, 5)


def test_one_bitrate_table() -> None:
    """The bitrates exist once (settings); everything else derives from or is checked against it."""
    assert bitrates_for(48000) is MP3_BITRATES_MPEG1
    assert bitrates_for(24000) is MP3_BITRATES_MPEG2
    assert bitrates_for(11025) == MP3_BITRATES_MPEG2[:8]
    for module in (conversion, encoding):
        source = Path(module.__file__ or "").read_text()
        assert "224, 256, 320" not in source and "144, 160" not in source

    class CfnLoader(yaml.SafeLoader):
        pass

    CfnLoader.add_multi_constructor("!", lambda loader, suffix, node: None)
    template = yaml.load((ROOT / "infra/aws/template.yaml").read_text(), Loader=CfnLoader)  # noqa: S506
    allowed = template["Parameters"]["Mp3BitrateKbps"]["AllowedValues"]
    assert tuple(allowed) == MP3_BITRATES_MPEG1
    assert (
        ", ".join(map(str, MP3_BITRATES_MPEG1[:-1])) in (ROOT / "docs/configuration.md").read_text()
    )


def test_our_tag_is_exactly_five_utf8_frames() -> None:
    tags = {"title": "Tïtle", "artist": "A", "album": "B", "date": "2020", "comment": "ç"}
    tag = build_tag(tags)
    found = read_id3(tag)
    assert found.version == (2, 4, 0)
    assert sorted(found.frames) == ["COMM::XXX", "TALB", "TDRC", "TIT2", "TPE1"]
    assert set(found.encodings) == {3}  # UTF-8
    assert read_tag(tag) == tags
    assert build_tag({}) == b""


@pytest.mark.parametrize("version", [3, 4])
def test_reading_id3_chunks_written_by_mutagen(version: int) -> None:
    tag = wavgen.id3_chunk(title="UTF-16 ẞtitle", version=version, more=True)[8:]
    assert read_tag(tag) == {
        "title": "UTF-16 ẞtitle",
        "artist": "Latin-1 ärtist",
        "comment": "the comment",  # not the iTunNORM one, which has a description
        "date": "2019-07-01" if version == 4 else "2019",
    }


def test_broken_id3_is_ignored_not_fatal() -> None:
    assert read_tag(b"") == {}
    assert read_tag(b"ID3\x04\x00\x00\x00\x00\x7f\x7fTIT2\x00\x00\x00") == {}
    assert read_tag(b"ID3\x09" + bytes(20)) == {}
    good = build_tag({"title": "kept"})
    assert read_tag(good[:-2]) == {}  # truncated frame: dropped
    assert read_tag(good + b"junk") == {"title": "kept"}


def test_wav_info_chunks_before_and_after_the_data() -> None:
    head = wavgen.info_chunk({b"INAM": "Head", b"ICRD": "2001-02-03 10:00", b"IGNR": "Rock"})
    tail = wavgen.info_chunk({b"IART": "Tail\x01artist", b"INAM": "ignored: head wins"})
    data = wavgen.wav(seconds=0.01, extra_chunks=(head,), trailing_chunks=(tail,))
    header = parse_header(data)
    assert header is not None
    end = header.data_offset + (header.data_size or 0)
    found = file_tags(header.metadata + trailing_metadata(data[end:]))
    assert found == {"title": "Head", "artist": "Tailartist", "date": "2001-02-03"}


def test_file_tags_are_cleaned_not_refused() -> None:
    assert clean_file_tag("title", "  two\nlines\x00 ") == "two lines"
    assert clean_file_tag("date", "2020-01-02T03:04:05") == "2020-01-02T03:04:05"
    assert clean_file_tag("date", "1999 (remaster)") == "1999"
    assert clean_file_tag("date", "sometime") is None
    assert clean_file_tag("comment", "x" * 5000) == "x" * 1000
    cp1252 = wavgen.chunk(b"LIST", b"INFO" + wavgen.chunk(b"INAM", "Café".encode("cp1252") + b"\0"))
    assert file_tags([(b"LIST", cp1252[8:])]) == {"title": "Café"}


def test_the_title_names_the_download() -> None:
    rid = uuid.uuid4()
    assert mp3_filename("take.wav", rid, "Op. 2 / No. 1") == "Op. 2 _ No. 1.mp3"
    assert mp3_filename("take.wav", rid, "../../etc") == "_.._etc.mp3"
    assert mp3_filename("take.wav", rid, None) == "take.mp3"
    assert mp3_filename(None, rid, "x" * 250) == "x" * 250 + ".mp3"


def test_a_date_from_the_file_keeps_its_longest_real_prefix() -> None:
    assert clean_file_tag("date", "2024-02-29") == "2024-02-29"
    assert clean_file_tag("date", "2024-05-99") == "2024-05"
    assert clean_file_tag("date", "2024-13-45") == "2024"
    assert clean_file_tag("date", "0000-00-00") is None
