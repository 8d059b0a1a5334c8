"""Database migrations through Alembic, one schema (and version table) per service.

A service keeps its migrations in ``<package>/migrations/`` (``env.py`` + ``versions/``); its
``env.py`` is just ``from leadwerk_platform.migrations import run_env; run_env()``. Revisions
are plain SQL via ``op.execute``: services use asyncpg directly, not the SQLAlchemy ORM.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from alembic import command, context, op
from alembic.config import Config
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import async_engine_from_config


def sqlalchemy_url(database_url: str) -> str:
    """``postgresql://…`` (asyncpg style) → ``postgresql+asyncpg://…`` for SQLAlchemy."""
    for prefix in ("postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+asyncpg://" + database_url.removeprefix(prefix)
    return database_url


def alembic_config(database_url: str, schema: str, script_location: Path) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(database_url).replace("%", "%%"))
    config.attributes["schema"] = schema
    return config


def upgrade(database_url: str, schema: str, script_location: Path,
            revision: str = "head") -> None:
    """Bring ``schema`` to ``revision`` (blocking; run it outside the event loop)."""
    command.upgrade(alembic_config(database_url, schema, script_location), revision)


def execute_script(sql: str) -> None:
    """Run a migration's SQL, statement by statement (asyncpg runs one statement per call).
    Statements end with ``;`` at the end of a line."""
    for statement in sql.split(";\n"):
        if statement.strip():
            op.execute(statement)


def run_env() -> None:
    """The body of every service's ``migrations/env.py``."""
    config = context.config
    schema: str = config.attributes["schema"]
    if context.is_offline_mode():
        context.configure(url=config.get_main_option("sqlalchemy.url"),
                          version_table_schema=schema, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    asyncio.run(_run_online(config.get_section(config.config_ini_section, {}), schema))


async def _run_online(section: dict[str, Any], schema: str) -> None:
    engine = async_engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(_migrate, schema)
        await connection.commit()
    await engine.dispose()


def _migrate(connection: Connection, schema: str) -> None:
    connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    connection.execute(text(f'SET search_path TO "{schema}", public'))
    context.configure(connection=connection, version_table_schema=schema,
                      include_schemas=True)
    with context.begin_transaction():
        context.run_migrations()
