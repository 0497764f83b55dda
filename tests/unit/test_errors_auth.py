"""Unit tests of problem documents, tokens and download names."""

from __future__ import annotations

import uuid

from common.domain.new_records import mp3_filename
from common.domain.records import object_key
from common.domain.tokens import hash_token, new_token, token_matches
from common.errors import (
    ConversionInProgress,
    DependencyUnavailable,
    MethodNotAllowed,
    NotFound,
    RangeNotSatisfiable,
    Unauthorized,
)
from common.http.auth import bearer_token
from common.http.responses import content_disposition, problem_headers


def test_problem_document_has_the_rfc9457_members() -> None:
    problem = NotFound("No record with this id exists for this user.").to_problem("/record")
    assert problem == {
        "type": "urn:record-service:problem:not-found",
        "title": "Not Found",
        "status": 404,
        "detail": "No record with this id exists for this user.",
        "instance": "/record",
    }


def test_outage_carries_retry_after() -> None:
    error = DependencyUnavailable("database", retry_after=7)
    assert error.status == 503
    assert problem_headers(error) == {"Retry-After": "7"}
    assert "database" in error.detail


def test_unauthorized_asks_for_a_bearer_token() -> None:
    assert problem_headers(Unauthorized())["WWW-Authenticate"].startswith("Bearer")
    assert problem_headers(MethodNotAllowed("PUT", ("POST",))) == {"Allow": "POST"}
    assert problem_headers(RangeNotSatisfiable(10)) == {"Content-Range": "bytes */10"}
    in_progress = ConversionInProgress("x", retry_after=3, status_url="/records/uploads/u")
    assert problem_headers(in_progress) == {"Retry-After": "3", "Location": "/records/uploads/u"}


def test_tokens_are_random_uuid4_and_stored_hashed() -> None:
    tokens = {new_token() for _ in range(1000)}
    assert len(tokens) == 1000
    token = tokens.pop()
    assert uuid.UUID(token).version == 4
    stored = hash_token(token)
    assert len(stored) == 32 and token.encode() not in stored
    assert token_matches(token, stored)
    assert token_matches(token.upper(), stored)  # UUIDs compare case-insensitively
    assert not token_matches(new_token(), stored)
    assert not token_matches(token, None)


def test_bearer_header_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer") is None
    assert bearer_token(None) is None


def test_download_names_are_safe() -> None:
    rid = uuid.uuid4()
    assert mp3_filename("take.wav", rid) == "take.mp3"
    assert mp3_filename("C:\\music\\song.final.WAV", rid) == "song.final.mp3"
    assert mp3_filename("../../etc/passwd", rid) == "passwd.mp3"
    assert mp3_filename('a"b\r\n.wav', rid) == "a_b.mp3"
    assert mp3_filename(None, rid) == f"{rid}.mp3"
    assert mp3_filename(" . ", rid) == f"{rid}.mp3"
    assert mp3_filename("Überraschung.wav", rid) == "Überraschung.mp3"


def test_content_disposition_has_ascii_fallback_and_utf8_name() -> None:
    header = content_disposition("Überraschung.mp3")
    assert header == (
        "attachment; filename=\"_berraschung.mp3\"; filename*=UTF-8''%C3%9Cberraschung.mp3"
    )


def test_object_keys_include_the_user() -> None:
    user, record = uuid.uuid4(), uuid.uuid4()
    assert object_key(user, record) == f"users/{user}/records/{record}.mp3"
