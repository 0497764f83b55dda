"""Idempotency-Key on every POST: replays, mismatches, in-flight repeats, leases, scopes, and
what a database dump shows (common.domain.idempotency, common.http.idempotency).

"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from common.adapters.db import sql
from common.domain import idempotency
from common.domain.idempotency import Claim, Replay, Scope, StoredReply
from common.errors import IdempotencyKeyReused, RequestInProgress
from common.ops.sweep import sweep
from common.platform.runtime import Services

SECRET = "s" * 40
_ALL_ROWS = sql(
    "SELECT key_hash, user_id, fingerprint, state, response FROM idempotency_keys "
    "WHERE user_id = :user OR user_id IS NULL"
)


def _begin(services: Services, scope: Scope, key: str, fp: bytes | None, **kw: Any) -> Any:
    return idempotency.begin(
        services.db, secret=SECRET, scope=scope, key=key, fingerprint=fp, user_id=None,
        lease_seconds=kw.pop("lease", 60), **kw,
    )  # fmt: skip


def test_claim_replay_mismatch_and_conflict(services: Services) -> None:
    scope = Scope("anonymous", "POST", f"/test/{uuid.uuid4()}")
    claim = _begin(services, scope, "key-1", b"a" * 32)
    assert isinstance(claim, Claim)
    with pytest.raises(RequestInProgress) as running:
        _begin(services, scope, "key-1", b"a" * 32, retry_after=7)
    assert running.value.retry_after == 7
    with pytest.raises(IdempotencyKeyReused):
        _begin(services, scope, "key-1", b"b" * 32)
    claim.finish(StoredReply(201, {"Location": "/here"}, b"{}"))
    replay = _begin(services, scope, "key-1", b"a" * 32)
    assert isinstance(replay, Replay)
    assert replay.reply == StoredReply(201, {"Location": "/here"}, b"{}")
    with pytest.raises(IdempotencyKeyReused):
        _begin(services, scope, "key-1", b"b" * 32)


def test_a_dead_claims_lease_expires_and_a_retry_takes_over(services: Services) -> None:
    scope = Scope("anonymous", "POST", f"/test/{uuid.uuid4()}")
    dead = _begin(services, scope, "key", None, lease=5)
    assert isinstance(dead, Claim)
    dead._stop_heartbeat()  # the process 'died': nobody renews the lease
    with pytest.raises(RequestInProgress):
        _begin(services, scope, "key", None)
    time.sleep(5.5)
    taker = _begin(services, scope, "key", None)
    assert isinstance(taker, Claim)
    dead.finish(StoredReply(201, {}, b"late"))  # the zombie's answer does not count
    taker.finish(StoredReply(201, {}, b"taker"))
    replay = _begin(services, scope, "key", None)
    assert isinstance(replay, Replay) and replay.reply.body == b"taker"


def test_a_live_claim_is_renewed_past_its_lease(services: Services) -> None:
    scope = Scope("anonymous", "POST", f"/test/{uuid.uuid4()}")
    claim = _begin(services, scope, "key", None, lease=5)
    time.sleep(7)  # longer than the lease: the heartbeat renewed it
    with pytest.raises(RequestInProgress):
        _begin(services, scope, "key", None)
    claim.release()
    assert isinstance(_begin(services, scope, "key", None), Claim)


def test_expired_keys_are_purged_and_free_again(services: Services) -> None:
    scope = Scope("anonymous", "POST", f"/test/{uuid.uuid4()}")
    claim = _begin(services, scope, "old", b"a" * 32)
    claim.finish(StoredReply(200, {}, b"first"))
    hashed = idempotency.key_hash(scope, "old")
    services.db.execute(
        sql("UPDATE idempotency_keys SET expires_at = now() - interval '1 second' "
            "WHERE key_hash = :k"), {"k": hashed},
    )  # fmt: skip
    assert isinstance(_begin(services, scope, "old", b"b" * 32), Claim)  # a new request now
    other = Scope("anonymous", "POST", f"/test/{uuid.uuid4()}")
    _begin(services, other, "old", None).finish(StoredReply(200, {}, b""))
    services.db.execute(
        sql("UPDATE idempotency_keys SET expires_at = now() - interval '1 second' "
            "WHERE key_hash = :k"), {"k": idempotency.key_hash(other, "old")},
    )  # fmt: skip
    assert sweep(services, 3600).idempotency_keys_purged >= 1
    rows = services.db.execute(
        sql("SELECT 1 FROM idempotency_keys WHERE key_hash = :k"),
        {"k": idempotency.key_hash(other, "old")},
    )
    assert rows == []
