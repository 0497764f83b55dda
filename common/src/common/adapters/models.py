"""The database schema as typed SQLAlchemy 2.0 models. Alembic migrations create it."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    LargeBinary,
    SmallInteger,
    String,
    Uuid,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAME_MAX_LENGTH = 100
FILENAME_MAX_LENGTH = 255


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX_LENGTH))
    # SHA-256 of the access token: the token itself is shown once and never stored.
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Record(Base):
    __tablename__ = "records"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    object_key: Mapped[str] = mapped_column(String(300), unique=True)
    filename: Mapped[str] = mapped_column(String(FILENAME_MAX_LENGTH))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    etag: Mapped[str] = mapped_column(String(100))
    duration_seconds: Mapped[float] = mapped_column(Float)
    bitrate_kbps: Mapped[int] = mapped_column(SmallInteger)
    sample_rate: Mapped[int] = mapped_column(BigInteger)
    channels: Mapped[int] = mapped_column(SmallInteger)
    # LAME -V quality of a VBR record (bitrate_kbps is then its average); NULL for CBR.
    vbr_quality: Mapped[int | None] = mapped_column(SmallInteger, nullable=True)
    # The ID3v2.4 tags written into the MP3 (title, artist, album, date, comment); NULL: none.
    tags: Mapped[dict[str, str] | None] = mapped_column(JSONB, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
