"""Template versions in Postgres; the shipped templates (``config/templates``) seeded."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import yaml

from leadwerk_mailer.domain.templates import Problem, Renderer, Template, parse

Connection = Any
LATEST_TTL = 1.0


def shipped_templates(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    """``config/templates/**/*.yaml`` (layouts included): (file name, document)."""
    return [(str(path.relative_to(folder)), yaml.safe_load(path.read_text()) or {})
            for path in sorted(folder.rglob("*.yaml"))]


class TemplateStore:
    """Every version is kept; a send uses the latest version (cached for a second)."""

    def __init__(self, renderer: Renderer) -> None:
        self._renderer = renderer
        self._versions: dict[tuple[str, str, int], Template] = {}
        self._latest: dict[tuple[str, str], tuple[float, Template | None]] = {}

    async def latest(self, connection: Connection, workspace: str,
                     template_id: str) -> Template | None:
        key = (workspace, template_id)
        cached = self._latest.get(key)
        if cached is not None and time.monotonic() - cached[0] < LATEST_TTL:
            return cached[1]
        row = await connection.fetchrow(
            "SELECT version, document FROM templates WHERE workspace = $1 AND template_id = $2 "
            "ORDER BY version DESC LIMIT 1", workspace, template_id)
        template = None
        if row is not None:
            version_key = (workspace, template_id, row["version"])
            if version_key not in self._versions:
                self._versions[version_key] = Template.model_validate(
                    orjson.loads(row["document"]))
            template = self._versions[version_key]
        self._latest[key] = (time.monotonic(), template)
        return template

    async def layouts(self, connection: Connection, workspace: str) -> dict[str, Template]:
        rows = await connection.fetch(
            "SELECT DISTINCT ON (template_id) template_id FROM templates WHERE workspace = $1 "
            "AND document->>'kind' = 'layout' ORDER BY template_id, version DESC", workspace)
        found = {}
        for row in rows:
            layout = await self.latest(connection, workspace, row["template_id"])
            if layout is not None:
                found[layout.id] = layout
        return found

    async def names(self, connection: Connection, workspace: str) -> set[str]:
        rows = await connection.fetch(
            "SELECT DISTINCT template_id FROM templates WHERE workspace = $1", workspace)
        return {r["template_id"] for r in rows}

    async def validate(self, connection: Connection, workspace: str,
                       document: dict[str, Any]) -> tuple[Template | None, list[Problem]]:
        template, problems = parse(document)
        if template is None:
            return None, problems
        layouts = await self.layouts(connection, workspace)
        if template.kind == "layout":
            layouts[template.id] = template
        problems = self._renderer.check(template, layouts)
        return (None if problems else template), problems

    async def save(self, connection: Connection, workspace: str, template: Template, *,
                   actor: str) -> Template:
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                                     f"template:{workspace}:{template.id}")
            version = 1 + await connection.fetchval(
                "SELECT coalesce(max(version), 0) FROM templates WHERE workspace = $1 "
                "AND template_id = $2", workspace, template.id)
            stored = template.model_copy(update={"version": version})
            await connection.execute(
                "INSERT INTO templates (workspace, template_id, version, document, actor) "
                "VALUES ($1, $2, $3, $4, $5)", workspace, template.id, version,
                stored.model_dump_json(exclude_none=True), actor)
        self._latest.pop((workspace, template.id), None)
        return stored

    async def seed(self, connection: Connection, workspace: str,
                   shipped: list[tuple[str, dict[str, Any]]]) -> list[str]:
        """Shipped templates the database does not know yet become version 1 (layouts
        first, so the templates in them validate)."""
        seeded = []
        ordered = sorted(shipped, key=lambda item: item[1].get("kind") != "layout")
        for name, document in ordered:
            known = await connection.fetchval(
                "SELECT 1 FROM templates WHERE workspace = $1 AND template_id = $2",
                workspace, document.get("id"))
            if known:
                continue
            template, problems = await self.validate(connection, workspace, document)
            if template is None:
                raise ValueError(f"{name}: " + "; ".join(f"{p.location}: {p.message}"
                                                         for p in problems))
            await self.save(connection, workspace, template, actor=f"config:{name}")
            seeded.append(template.id)
        return seeded
