"""Access tokens: random UUIDv4s, stored as SHA-256 hashes, compared in constant time.

A token carries 122 random bits, so a fast hash is enough: there is nothing to brute-force
that a slow KDF would protect.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid

# Compared against when the user does not exist, so both failures cost the same.
_DUMMY_HASH = hashlib.sha256(b"no such user").digest()


def new_token() -> str:
    return str(uuid.uuid4())


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.strip().lower().encode("utf-8", "surrogatepass")).digest()


def token_matches(token: str, stored_hash: bytes | None) -> bool:
    return hmac.compare_digest(hash_token(token), stored_hash or _DUMMY_HASH) and (
        stored_hash is not None
    )
