"""Scoring models in Postgres: every version kept, the newest one in force per workspace."""

from __future__ import annotations

from typing import Any

import orjson

from leadwerk_scoring.domain.model import ScoringModel

Connection = Any


class ModelStore:
    """Reads the model in force (cached, re-checked by version) and stores new versions."""

    def __init__(self, default: ScoringModel) -> None:
        self._default = default
        self._cache: dict[str, ScoringModel] = {}

    async def current(self, connection: Connection, workspace: str) -> ScoringModel:
        version = await connection.fetchval(
            "SELECT max(version) FROM scoring_models WHERE workspace = $1", workspace)
        if version is None:
            await connection.execute(
                "INSERT INTO scoring_models (workspace, version, document, actor) "
                "VALUES ($1, 1, $2, 'default') ON CONFLICT DO NOTHING", workspace,
                self._default.model_copy(update={"version": 1}).model_dump_json(by_alias=True,
                                                                                exclude_none=True))
            version = 1
        cached = self._cache.get(workspace)
        if cached is not None and cached.version == version:
            return cached
        document = await connection.fetchval(
            "SELECT document FROM scoring_models WHERE workspace = $1 AND version = $2",
            workspace, version)
        model = ScoringModel.model_validate(orjson.loads(document)).model_copy(
            update={"version": version})
        self._cache[workspace] = model
        return model

    async def replace(self, connection: Connection, workspace: str, model: ScoringModel,
                      actor: str) -> ScoringModel:
        """Store ``model`` as the next version (serialised per workspace)."""
        await self.current(connection, workspace)
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                                     f"scoring-model:{workspace}")
            version = 1 + await connection.fetchval(
                "SELECT coalesce(max(version), 0) FROM scoring_models WHERE workspace = $1",
                workspace)
            stored = model.model_copy(update={"version": version})
            await connection.execute(
                "INSERT INTO scoring_models (workspace, version, document, actor) "
                "VALUES ($1, $2, $3, $4)", workspace, version,
                stored.model_dump_json(by_alias=True, exclude_none=True), actor)
        return stored

    async def versions(self, connection: Connection, workspace: str) -> list[dict[str, Any]]:
        rows = await connection.fetch(
            "SELECT version, actor, created_at FROM scoring_models WHERE workspace = $1 "
            "ORDER BY version DESC", workspace)
        return [dict(r) for r in rows]
