"""lifecycle: idempotency keys, the records keyset index, erasure markers

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Expand only: new tables and a new index; nothing the previous release reads changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # GET /records?user=: newest first, keyset on (created_at, id).
    op.create_index(
        "ix_records_user_created_id",
        "records",
        ["user_id", sa.text("created_at DESC"), sa.text("id DESC")],
    )
    op.create_table(
        "idempotency_keys",
        # SHA-256 of (scope, key): neither the raw key nor the caller is stored in the clear.
        sa.Column("key_hash", sa.LargeBinary(32), primary_key=True),
        # The owner, so that erasing a user erases its keys (NULL: an anonymous claim).
        sa.Column(
            "user_id", sa.Uuid(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=True
        ),
        # SHA-256 of the request (fields, path, file bytes); NULL until known (POST /records).
        sa.Column("fingerprint", sa.LargeBinary(32), nullable=True),
        sa.Column("state", sa.String(10), nullable=False),  # running | done
        sa.Column("owner", sa.Uuid(), nullable=False),  # the claim of the running attempt
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("response_status", sa.SmallInteger(), nullable=True),
        # AES-GCM(nonce || ciphertext) of the stored reply, keyed by the raw key + server secret.
        sa.Column("response", sa.LargeBinary(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_idempotency_keys_expires_at", "idempotency_keys", ["expires_at"])
    op.create_index("ix_idempotency_keys_user_id", "idempotency_keys", ["user_id"])
    # A user erased whose objects are not all deleted yet (no FK: the user row is gone).
    op.create_table(
        "erasures",
        sa.Column("user_id", sa.Uuid(), primary_key=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
    )


def downgrade() -> None:
    op.drop_table("erasures")
    op.drop_index("ix_idempotency_keys_user_id", table_name="idempotency_keys")
    op.drop_index("ix_idempotency_keys_expires_at", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_index("ix_records_user_created_id", table_name="records")
