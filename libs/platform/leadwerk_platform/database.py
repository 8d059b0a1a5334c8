"""The Postgres pool every service with a schema opens, and its readiness check."""

from __future__ import annotations

from typing import Any

import asyncpg

from leadwerk_platform.settings import PlatformSettings


async def create_pool(settings: PlatformSettings, schema: str, max_size: int) -> Any:
    """An asyncpg pool whose connections see ``schema`` first (the service's own tables)."""
    if settings.database_url is None:
        raise RuntimeError("DATABASE_URL is required")
    return await asyncpg.create_pool(settings.database_url.get_secret_value(), min_size=1,
                                     max_size=max_size, server_settings={"search_path": schema})


async def reachable(pool: Any) -> bool:
    """Readiness: a connection from the pool answers."""
    if pool is None:
        return False
    async with pool.acquire() as connection:
        return bool(await connection.fetchval("SELECT 1"))
