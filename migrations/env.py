"""Alembic environment: the database and login of the functions' settings (DATABASE_URL, DB_TLS,
DATABASE_SECRET_ARN), no target metadata."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from common.adapters.db import migration_connector
from common.settings import DatabaseLogin
from sqlalchemy import create_engine, pool

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name)

# The migrations and the service's SQL are the schema (docs/development.md, "Schema"): there is
# no model to compare against, so autogenerate is off.
target_metadata = None


LOGIN = DatabaseLogin.from_env()


def run_migrations_offline() -> None:
    context.configure(url=LOGIN.url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(LOGIN.url, poolclass=pool.NullPool, creator=migration_connector(LOGIN))
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
