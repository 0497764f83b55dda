"""The ``Idempotency-Key`` header around a handler's one call (:mod:`common.domain.idempotency`).

Handlers wrap the call that has an effect: ``idempotent(request, services, ..., run=...)``.
Without the header ``run`` simply runs; with it, a repeat gets the stored answer (with
``Idempotent-Replayed: true``) and ``run`` does not run again. An effect that is a database
write passes ``run_with`` instead: its :class:`Recorder` stores the answer in the effect's own
transaction, so a reply lost at COMMIT is replayed, never run twice. Which answers are stored
and which give the key up: docs/lifecycle.md, "Idempotency-Key".
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from typing import Any, Generic, TypeVar

from werkzeug.wrappers import Request, Response

from common.adapters.db import Connection, Database
from common.domain.idempotency import (
    ANONYMOUS,
    KEY_TTL,
    AnswerHook,
    Claim,
    Replay,
    RequestHasher,
    Scope,
    StoredReply,
    begin,
    validate_key,
)
from common.errors import BadRequest, IdempotencyKeyRequired, ServiceError
from common.http.responses import problem_response
from common.settings import Settings

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
STORED_HEADERS = ("Content-Type", "Location", "Cache-Control")
STORED_REFUSALS = frozenset({404, 410, 413, 415, 422})
# Fields that never change what a request does: the credential (a rotated token must not
# make a repeat look like another request).
_NOT_FINGERPRINTED = frozenset({"token"})
T = TypeVar("T")


def stored(status: int) -> bool:
    return 200 <= status < 400 or status in STORED_REFUSALS


def request_parts(request: Request, fields: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a request for its fingerprint: path, query and fields, not the token."""
    return {
        "path": request.path,
        "query": sorted((k, v) for k, v in request.args.items(multi=True) if k != "token"),
        "fields": {k: v for k, v in fields.items() if k not in _NOT_FINGERPRINTED},
    }


def _key(request: Request, *, anonymous: bool, required: bool = False) -> str | None:
    values = request.headers.getlist(HEADER)
    if not values:
        if required:
            raise IdempotencyKeyRequired(
                f"This request needs an '{HEADER}' header (at least 16 random characters, "
                "such as a UUID): its answer is shown once, and a repeat with the key returns it."
            )
        return None
    if len(values) > 1 or "," in values[0]:  # two headers (or a list): which one is meant?
        raise BadRequest(f"Send one '{HEADER}' header with one key.")
    return validate_key(values[0], anonymous=anonymous)


class Recorder:
    """Stores a response as the request's answer inside the transaction of its effect."""

    def __init__(self, claim: Claim | None, fingerprint: Callable[[], bytes] | None = None) -> None:
        self.claim = claim
        self.stored = False
        self._fingerprint = fingerprint  # known once the body is read (POST /records)

    def within(
        self, response: Response, *, user_id: uuid.UUID | None = None
    ) -> Callable[[Connection], None] | None:
        """A callback for the effect's transaction; None without a key (nothing to store)."""
        if not stored(response.status_code):
            return None
        hook: AnswerHook[None] | None = self.storing(lambda _: response, user_id=user_id)
        return None if hook is None else lambda conn: hook(conn, None)

    def storing(
        self, answer: Callable[[T], Response], *, user_id: uuid.UUID | None = None
    ) -> AnswerHook[T] | None:
        """A hook for a domain function that makes the response's content (a record, an
        upload) inside its transaction: ``answer(value)`` is stored there; None without a key."""
        return None if self.claim is None else _Storing(self, self.claim, answer, user_id)


class _Storing(Generic[T]):
    def __init__(
        self,
        recorder: Recorder,
        claim: Claim,
        answer: Callable[[T], Response],
        user_id: uuid.UUID | None,
    ) -> None:
        self.recorder, self.claim, self.answer, self.user_id = recorder, claim, answer, user_id

    def __call__(self, conn: Connection, value: T, /) -> None:
        response = self.answer(value)
        if not stored(response.status_code):
            return
        given = self.recorder._fingerprint
        fingerprint = given() if given is not None else None
        self.claim.finish_in(conn, _reply(response), fingerprint=fingerprint, user_id=self.user_id)
        self.recorder.stored = True


def _begin(
    request: Request,
    db: Database,
    settings: Settings,
    *,
    key: str,
    caller: uuid.UUID | None,
    route: str,
    fingerprint: bytes | None,
    guard: Callable[[], object] | None,
    ttl: timedelta = KEY_TTL,
) -> Claim | Replay:
    scope = Scope(str(caller) if caller else ANONYMOUS, request.method, route)
    try:
        return begin(
            db,
            secret=settings.idempotency_secret,
            scope=scope,
            key=key,
            fingerprint=fingerprint,
            user_id=caller,
            lease_seconds=settings.idempotency_lease_seconds,
            retry_after=settings.retry_after_seconds,
            ttl=ttl,
        )
    except ServiceError:
        if guard is not None:
            guard()  # a stranger learns nothing of a key: it gets the 401 first
        raise


def idempotent(
    request: Request,
    db: Database,
    settings: Settings,
    *,
    caller: uuid.UUID | None,
    route: str,
    fields: Mapping[str, Any],
    run: Callable[[], Response] | None = None,
    run_with: Callable[[Recorder], Response] | None = None,
    guard: Callable[[], object] | None = None,
    owner_of: Callable[[Response], uuid.UUID | None] | None = None,
    required: bool = False,
    anonymous: bool | None = None,
    ttl: timedelta = KEY_TTL,
) -> Response:
    """``run()``, unless this is a repeat of an answered request (then its stored answer).

    ``caller`` is the authenticated user (None: the anonymous scope, where the key itself
    is the secret). ``guard`` authenticates a caller whose scope is not yet proven (the
    rotation): it runs before anything but an exact replay is answered. ``owner_of`` names
    the user a response created, so erasing that user erases the stored answer too.
    ``anonymous`` (default: no ``caller``) asks for a key a stranger cannot guess (16+
    characters); ``ttl`` is how long the answer is replayed.
    """
    key = _key(request, anonymous=caller is None if anonymous is None else anonymous,
               required=required)  # fmt: skip

    def call(recorder: Recorder) -> Response:
        if run_with is not None:
            return run_with(recorder)
        assert run is not None, "idempotent() needs run or run_with"
        return run()

    if key is None:
        return call(Recorder(None))
    fingerprint = RequestHasher(request_parts(request, fields)).digest()
    outcome = _begin(
        request, db, settings, key=key, caller=caller, route=route,
        fingerprint=fingerprint, guard=guard, ttl=ttl,
    )  # fmt: skip
    if isinstance(outcome, Replay):
        return replay_response(outcome.reply)
    recorder = Recorder(outcome)
    try:
        if guard is not None:
            guard()
        response = call(recorder)
        if recorder.stored:
            outcome.stop()
            return response
    except ServiceError as exc:
        _settle(outcome, problem_response(exc, request.path), fingerprint=None)
        raise
    except BaseException:
        outcome.release()
        raise
    _settle(outcome, response, fingerprint=None, user_id=owner_of(response) if owner_of else None)
    return response


def idempotent_upload(
    request: Request,
    db: Database,
    settings: Settings,
    *,
    caller: uuid.UUID,
    route: str,
    fields: Mapping[str, Any],
    audio: Iterator[bytes],
    run: Callable[[Iterator[bytes], Recorder], Response],
) -> Response:
    """As :func:`idempotent`, for a request whose body is part of its fingerprint.

    The body is hashed as it streams into ``run``, which gets a :class:`Recorder` to store
    its answer with its effect (the body read to its end by then). A repeat of an answered
    request is not run at all: its body streams through the hasher only, then the stored
    answer is replayed (the same bytes) or refused with 422 (other bytes).
    """
    key = _key(request, anonymous=False)
    if key is None:
        return run(audio, Recorder(None))
    hasher = RequestHasher(request_parts(request, fields))
    outcome = _begin(
        request, db, settings, key=key, caller=caller, route=route, fingerprint=None, guard=None
    )
    if isinstance(outcome, Replay):
        hasher.drain(audio)
        outcome.check(hasher.digest())
        return replay_response(outcome.reply)
    hashed = hasher.wrap(audio)
    recorder = Recorder(outcome, fingerprint=hasher.digest)
    try:
        try:
            response = run(hashed, recorder)
        finally:
            hasher.drain(hashed)  # what the conversion left unread is still the request
        if recorder.stored:
            outcome.stop()
            return response
    except ServiceError as exc:
        _settle(outcome, problem_response(exc, request.path), fingerprint=hasher.digest())
        raise
    except BaseException:
        outcome.release()
        raise
    _settle(outcome, response, fingerprint=hasher.digest())
    return response


def _settle(
    claim: Claim,
    response: Response,
    *,
    fingerprint: bytes | None,
    user_id: uuid.UUID | None = None,
) -> None:
    if not stored(response.status_code) or response.is_streamed:
        claim.release()
        return
    claim.finish(_reply(response), fingerprint=fingerprint, user_id=user_id)


def _reply(response: Response) -> StoredReply:
    headers = {h: response.headers[h] for h in STORED_HEADERS if h in response.headers}
    return StoredReply(response.status_code, headers, response.get_data())


def replay_response(reply: StoredReply) -> Response:
    headers = {**reply.headers, REPLAYED_HEADER: "true"}
    return Response(reply.body, status=reply.status, headers=headers)
