"""records: the effective VBR quality and the ID3 tags written

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Expand only: two nullable columns. Rows written before keep NULL (CBR, no tags), and the
previous release, which does not know the columns, keeps inserting rows without them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("records", sa.Column("vbr_quality", sa.SmallInteger(), nullable=True))
    op.add_column("records", sa.Column("tags", postgresql.JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("records", "tags")
    op.drop_column("records", "vbr_quality")
