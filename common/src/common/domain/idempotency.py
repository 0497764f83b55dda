"""Idempotency keys: a repeat with the same key gets the first answer, never a second effect.

:func:`begin` claims a key for this request (a :class:`Claim`, held by a lease that a heartbeat
renews), finds the first request's answer (a :class:`Replay`, kept for :data:`KEY_TTL`), or
refuses: 409 while the first still runs, 422 for the key used with another request.
:meth:`Claim.finish` stores the answer; :meth:`Claim.release` gives the key up, so the next
repeat runs anew. Keys are scoped to their caller, and a stored answer is encrypted under the
raw key, which the database never holds. docs/lifecycle.md, "Idempotency-Key", has the rules,
the scope and the encryption.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NamedTuple, Protocol, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.adapters.db import Connection, Database, is_foreign_key_violation, sql
from common.domain.text import first_control
from common.errors import IdempotencyKeyReused, InvalidField, RequestInProgress, Unauthorized

log = logging.getLogger(__name__)

KEY_MAX_LENGTH = 255
KEY_TTL = timedelta(hours=24)
# The anonymous scope (POST /users) has no caller to tell clients apart: the key is the only
# secret there, so it must be one a stranger cannot guess (a UUID is 36 characters).
ANONYMOUS = "anonymous"
ANONYMOUS_KEY_MIN_LENGTH = 16
_HKDF_INFO = b"record-service idempotent reply v1"
_NONCE_BYTES = 12
# One begin() in this many also deletes a few expired keys (the sweep deletes the rest).
_PURGE_ONE_IN = 50
_PURGE_BATCH = 200


class Owner(NamedTuple):
    owner: uuid.UUID


class StoredKey(NamedTuple):
    state: str
    fingerprint: bytes | None
    response: bytes | None


class PurgedKey(NamedTuple):
    key_hash: bytes


_CLAIM = sql(
    "INSERT INTO idempotency_keys AS k "
    "(key_hash, user_id, fingerprint, state, owner, lease_until, expires_at) "
    "VALUES (:key_hash, :user_id, :fingerprint, 'running', :owner, "
    "now() + make_interval(secs => :lease), now() + make_interval(secs => :ttl)) "
    "ON CONFLICT (key_hash) DO UPDATE SET user_id = EXCLUDED.user_id, "
    "fingerprint = EXCLUDED.fingerprint, state = 'running', owner = EXCLUDED.owner, "
    "lease_until = EXCLUDED.lease_until, response_status = NULL, response = NULL, "
    "created_at = now(), expires_at = EXCLUDED.expires_at "
    # An expired key is free; a running claim whose lease passed is taken over (its process
    # died), unless the request is a different one. A second run of this very claim (its
    # reply was lost) finds its own row and holds it.
    "WHERE (k.state = 'running' AND k.owner = EXCLUDED.owner) OR k.expires_at <= now() "
    "OR (k.state = 'running' AND k.lease_until <= now() "
    "AND (k.fingerprint IS NULL OR EXCLUDED.fingerprint IS NULL "
    "OR k.fingerprint = EXCLUDED.fingerprint)) "
    "RETURNING owner",
    Owner,
    idempotent=True,
)
_SELECT = sql(
    "SELECT state, fingerprint, response FROM idempotency_keys "
    "WHERE key_hash = :key_hash AND expires_at > now()",
    StoredKey,
    idempotent=True,
)
_RENEW = sql(
    "UPDATE idempotency_keys SET lease_until = now() + make_interval(secs => :lease) "
    "WHERE key_hash = :key_hash AND owner = :owner AND state = 'running'",
    idempotent=True,
)
# Only the claim's owner stores its answer (a claim taken over has another owner); a second
# run of the same finish writes the same answer again.
_FINISH = sql(
    "UPDATE idempotency_keys SET state = 'done', fingerprint = COALESCE(:fingerprint, "
    "fingerprint), response_status = :status, response = :response, "
    "user_id = COALESCE(:user_id, user_id), lease_until = now() "
    "WHERE key_hash = :key_hash AND owner = :owner RETURNING owner",
    Owner,
    idempotent=True,
)
# A running claim only: an answer stored (perhaps by a commit whose reply was lost) stays.
_RELEASE = sql(
    "DELETE FROM idempotency_keys WHERE key_hash = :key_hash AND owner = :owner "
    "AND state = 'running'",
    idempotent=True,
)
_PURGE = sql(
    "DELETE FROM idempotency_keys WHERE key_hash IN (SELECT key_hash FROM idempotency_keys "
    "WHERE expires_at <= now() LIMIT :limit) RETURNING key_hash",
    PurgedKey,
)


T_contra = TypeVar("T_contra", contravariant=True)


class AnswerHook(Protocol[T_contra]):
    """Stores a request's answer, made from ``value`` (the effect's result), in ``conn``'s
    transaction, the effect's own: a domain function that takes one commits both together."""

    def __call__(self, conn: Connection, value: T_contra, /) -> None: ...


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose key this is: the caller, and the operation (method + route template)."""

    caller: str
    method: str
    route: str


@dataclass(frozen=True, slots=True)
class StoredReply:
    status: int
    headers: dict[str, str]
    body: bytes


def validate_key(raw: str, *, anonymous: bool = False) -> str:
    """The Idempotency-Key header's value, or InvalidField (422)."""
    key = raw.strip()
    if not key.isascii():
        raise InvalidField(
            "'Idempotency-Key' must be printable ASCII (a header value): use a UUID, for example."
        )
    if not key:  # servers drop a header value that is not ASCII: it arrives empty
        raise InvalidField(
            "'Idempotency-Key' must not be empty, and must be printable ASCII (a header "
            "value): use a UUID, for example."
        )
    if len(key) > KEY_MAX_LENGTH:
        raise InvalidField(f"'Idempotency-Key' must be at most {KEY_MAX_LENGTH} characters.")
    if first_control(key) is not None:
        raise InvalidField("'Idempotency-Key' must not contain control characters.")
    if anonymous and len(key) < ANONYMOUS_KEY_MIN_LENGTH:
        raise InvalidField(
            f"'Idempotency-Key' must be at least {ANONYMOUS_KEY_MIN_LENGTH} characters here "
            "(it is the only secret of the repeat): use a random one, such as a UUID."
        )
    return key


def key_hash(scope: Scope, key: str) -> bytes:
    scoped = "\n".join((scope.caller, scope.method.upper(), scope.route, key))
    return hashlib.sha256(scoped.encode("utf-8", "surrogatepass")).digest()


class RequestHasher:
    """The fingerprint of a request: its fields (canonical JSON), then its body's bytes.

    :meth:`wrap` passes body chunks through unchanged while hashing them, so a file is
    fingerprinted as it streams, never held.
    """

    def __init__(self, parts: Mapping[str, Any]) -> None:
        canonical = json.dumps(
            dict(parts), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
        )
        self._hash = hashlib.sha256(canonical.encode("utf-8", "surrogatepass"))
        self._hash.update(b"\n")

    def wrap(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self._hash.update(chunk)
            yield chunk

    def drain(self, chunks: Iterator[bytes]) -> None:
        for chunk in chunks:
            self._hash.update(chunk)

    def digest(self) -> bytes:
        return self._hash.copy().digest()


def _cipher(secret: str, key: str, hashed: bytes) -> AESGCM:
    hkdf = HKDF(algorithm=SHA256(), length=32, salt=hashed, info=_HKDF_INFO)
    return AESGCM(hkdf.derive(secret.encode() + b"\0" + key.encode("utf-8", "surrogatepass")))


def seal(reply: StoredReply, *, secret: str, key: str, hashed: bytes) -> bytes:
    plain = json.dumps(
        {
            "status": reply.status,
            "headers": reply.headers,
            "body": base64.b64encode(reply.body).decode("ascii"),
        }
    ).encode()
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + _cipher(secret, key, hashed).encrypt(nonce, plain, hashed)


def unseal(sealed: bytes, *, secret: str, key: str, hashed: bytes) -> StoredReply:
    nonce, ciphertext = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
    try:
        plain = _cipher(secret, key, hashed).decrypt(nonce, ciphertext, hashed)
    except InvalidTag as exc:  # the server secret changed since it was stored
        raise IdempotencyKeyReused(
            "The answer stored for this Idempotency-Key can no longer be read; use a new key."
        ) from exc
    stored = json.loads(plain)
    return StoredReply(
        status=int(stored["status"]),
        headers={str(k): str(v) for k, v in stored["headers"].items()},
        body=base64.b64decode(stored["body"]),
    )


@dataclass(slots=True)
class Replay:
    """The first request's answer; ``fingerprint`` is that request's (None if never known)."""

    reply: StoredReply
    fingerprint: bytes | None

    def check(self, fingerprint: bytes) -> None:
        """IdempotencyKeyReused unless this request is the one that was answered."""
        if self.fingerprint is not None and self.fingerprint != fingerprint:
            raise _reused()


@dataclass(slots=True)
class Claim:
    """This request holds the key: run it, then :meth:`finish` or :meth:`release`."""

    db: Database
    key: str = field(repr=False)
    key_hash: bytes
    owner: uuid.UUID
    secret: str = field(repr=False)
    lease_seconds: int
    _stop: threading.Event = field(default_factory=threading.Event)
    _heartbeat: threading.Thread | None = None

    def start_heartbeat(self) -> None:
        self._heartbeat = threading.Thread(
            target=self._renew, name="idempotency-lease", daemon=True
        )
        self._heartbeat.start()

    def _renew(self) -> None:
        params = {"key_hash": self.key_hash, "owner": self.owner, "lease": self.lease_seconds}
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                self.db.execute(_RENEW, params)
            except Exception as exc:  # the next renewal tries again; the lease covers a gap
                log.warning("could not renew an idempotency lease: %s", exc)

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None

    def finish_in(
        self,
        conn: Connection,
        reply: StoredReply,
        *,
        fingerprint: bytes | None = None,
        user_id: uuid.UUID | None = None,
    ) -> None:
        """Store the answer in ``conn``'s transaction, the one of the request's effect: the
        effect and its answer commit together, or neither does. A claim taken over meanwhile
        raises RequestInProgress, so the transaction (the effect) rolls back."""
        sealed = seal(reply, secret=self.secret, key=self.key, hashed=self.key_hash)
        rows = conn.execute(
            _FINISH,
            {
                "key_hash": self.key_hash,
                "owner": self.owner,
                "fingerprint": fingerprint,
                "status": reply.status,
                "response": sealed,
                "user_id": user_id,
            },
        )
        if not rows:
            raise RequestInProgress(
                "A request with this Idempotency-Key was taken over by a repeat; repeat it later."
            )

    def stop(self) -> None:
        """The answer was stored with the effect: stop renewing the lease."""
        self._stop_heartbeat()

    def finish(
        self,
        reply: StoredReply,
        *,
        fingerprint: bytes | None = None,
        user_id: uuid.UUID | None = None,
    ) -> None:
        """Store the answer for repeats (``user_id``: the owner, if the request made one)."""
        self._stop_heartbeat()
        sealed = seal(reply, secret=self.secret, key=self.key, hashed=self.key_hash)
        rows = self.db.execute(
            _FINISH,
            {
                "key_hash": self.key_hash,
                "owner": self.owner,
                "fingerprint": fingerprint,
                "status": reply.status,
                "response": sealed,
                "user_id": user_id,
            },
        )
        if not rows:  # our lease ran out and a repeat took the key over: its answer stands
            log.warning("an idempotency claim was taken over before it finished")

    def release(self) -> None:
        """Give the key up: the next repeat runs the request again."""
        self._stop_heartbeat()
        try:
            self.db.execute(_RELEASE, {"key_hash": self.key_hash, "owner": self.owner})
        except Exception as exc:  # the lease expires on its own
            log.warning("could not release an idempotency claim: %s", exc)


def begin(
    db: Database,
    *,
    secret: str,
    scope: Scope,
    key: str,
    fingerprint: bytes | None,
    user_id: uuid.UUID | None,
    lease_seconds: int,
    retry_after: int = 1,
    ttl: timedelta = KEY_TTL,
) -> Claim | Replay:
    """Claim ``key`` in ``scope`` for this request, or find the answer it already got.

    ``fingerprint`` is None when it is known only after the body is read (POST /records):
    the caller then checks a :class:`Replay` itself with :meth:`Replay.check`.
    """
    hashed = key_hash(scope, key)
    if random.randrange(_PURGE_ONE_IN) == 0:  # noqa: S311 - not a secret, a sampling rate
        _purge_some(db)
    for _ in range(3):
        owner = uuid.uuid4()
        try:
            claimed = db.execute(
                _CLAIM,
                {
                    "key_hash": hashed,
                    "user_id": user_id,
                    "fingerprint": fingerprint,
                    "owner": owner,
                    "lease": lease_seconds,
                    "ttl": ttl.total_seconds(),
                },
            )
        except Exception as exc:
            if is_foreign_key_violation(exc):  # no such user (unknown, or erased meanwhile)
                raise Unauthorized("The user id and access token do not match.") from exc
            raise
        if claimed and claimed[0].owner == owner:
            claim = Claim(db, key, hashed, owner, secret, lease_seconds)
            claim.start_heartbeat()
            return claim
        rows = db.execute(_SELECT, {"key_hash": hashed})
        if not rows:  # released or expired in between: claim again
            continue
        row = rows[0]
        state, stored_fp, sealed = row.state, row.fingerprint, row.response
        stored_fp = bytes(stored_fp) if stored_fp is not None else None
        if fingerprint is not None and stored_fp is not None and stored_fp != fingerprint:
            raise _reused()
        if state == "done":
            assert sealed is not None  # _FINISH sets the state and the answer together
            reply = unseal(bytes(sealed), secret=secret, key=key, hashed=hashed)
            return Replay(reply, stored_fp)
        break  # running, and still renewed (or just taken over by another repeat)
    raise RequestInProgress(
        "A request with this Idempotency-Key is still running; repeat it later.",
        retry_after=retry_after,
    )


def _reused() -> IdempotencyKeyReused:
    return IdempotencyKeyReused(
        "This Idempotency-Key was used for a different request; use a new key."
    )


def _purge_some(db: Database) -> None:
    try:
        db.execute(_PURGE, {"limit": _PURGE_BATCH})
    except Exception as exc:  # cleanup is best effort; the sweep catches up
        log.warning("could not purge expired idempotency keys: %s", exc)


def purge_expired(db: Database) -> int:
    """Delete every expired key (the sweep); the number deleted."""
    total = 0
    while rows := db.execute(_PURGE, {"limit": 1000}):
        total += len(rows)
    return total
