"""uploads: one row per direct upload, which is also the PostgreSQL job queue

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

Expand only: a new table; the previous release never reads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = ("uploading", "queued", "converting", "done", "failed")


def upgrade() -> None:
    op.create_table(
        "uploads",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column(
            "user_id", sa.Uuid(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("object_key", sa.String(300), nullable=False),
        sa.Column("filename", sa.String(255), nullable=True),
        sa.Column(
            "options", postgresql.JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")
        ),
        sa.Column("status", sa.String(16), nullable=False, server_default="uploading"),
        sa.Column("progress", sa.Float(), nullable=False, server_default="0"),
        sa.Column("record_id", sa.Uuid(), nullable=True),
        sa.Column("error", postgresql.JSONB(), nullable=True),
        # Which queue carries the job (postgres | sqs | cloudtasks): the polling worker takes
        # only its own, so a message-driven job is never run twice by two kinds of worker.
        sa.Column("queue", sa.String(16), nullable=True),
        sa.Column("attempts", sa.SmallInteger(), nullable=False, server_default="0"),
        sa.Column("lease_token", sa.Uuid(), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN (" + ", ".join(f"'{s}'" for s in STATUSES) + ")",
            name="ck_uploads_status",
        ),
        sa.CheckConstraint("progress >= 0 AND progress <= 1", name="ck_uploads_progress"),
    )
    op.create_index("ix_uploads_user_id", "uploads", ["user_id"])
    # The polling worker's scan: only jobs waiting or running, oldest first.
    op.create_index(
        "ix_uploads_pending_jobs",
        "uploads",
        ["queue", "queued_at"],
        postgresql_where=sa.text("status IN ('queued', 'converting')"),
    )


def downgrade() -> None:
    op.drop_index("ix_uploads_pending_jobs", table_name="uploads")
    op.drop_index("ix_uploads_user_id", table_name="uploads")
    op.drop_table("uploads")
