"""Alembic environment: the URL from DATABASE_URL, the target schema from common.adapters.models.

With DATABASE_SECRET_ARN (AWS) the login comes from that secret, as in the functions.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

import pg8000.dbapi
from alembic import context
from common.adapters.db import connect_params, login
from common.adapters.models import Base
from common.adapters.secrets import SecretCredentials
from common.settings import DEFAULT_DATABASE_URL, normalise_database_url
from sqlalchemy import create_engine, pool

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name)

target_metadata = Base.metadata


def _url() -> str:
    return normalise_database_url(os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL))


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    tls = os.environ.get("DB_TLS", "off").strip().lower() or "off"
    params = connect_params(_url(), tls=tls, timeout=None)
    secret_arn = os.environ.get("DATABASE_SECRET_ARN", "").strip()
    credentials = SecretCredentials(secret_arn) if secret_arn else None
    engine = create_engine(
        _url(),
        poolclass=pool.NullPool,
        creator=lambda: login(pg8000.dbapi.connect, params, credentials),
    )
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
