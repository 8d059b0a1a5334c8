"""Moving the contacts inside an old version of a journey to the active version, by an
explicit rule: each resting step of the old version maps to a step of the new one (the same id
unless the rule names another), and the mapped step must rest the same way. All or nothing:
when one step cannot be mapped, nothing moves and every problem is named."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from leadwerk_workflow.domain.engine import SALES_RESPONSE
from leadwerk_workflow.domain.journey import HandoffStep, Journey, WaitForStep
from leadwerk_workflow.engine import Connection, JourneyStore


class MigrationRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    from_version: int = Field(ge=1)
    #: Resting step in the old version → step in the active one; unnamed steps keep their id.
    steps: dict[str, str] = Field(default_factory=dict)


@dataclass(frozen=True)
class MigrationResult:
    status: int
    body: dict[str, Any]


def _waiting_for(step: Any) -> str | None:
    if isinstance(step, WaitForStep):
        return step.event.kind
    return SALES_RESPONSE if isinstance(step, HandoffStep) and step.sla is not None else None


def plan(old: Journey, new: Journey, resting: set[str],
         rule: MigrationRule) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The step mapping for the old version's resting steps, or the problems (pure)."""
    mapping, problems = {}, []
    for step_id in sorted(resting):
        target = rule.steps.get(step_id, step_id)
        if target not in new.steps:
            problems.append({"location": f"steps.{step_id}", "message":
                             f"version {new.version} has no step {target!r}; map it in steps"})
        elif type(new.step(target)) is not type(old.step(step_id)) or (
                _waiting_for(new.step(target)) is None) != (
                    _waiting_for(old.step(step_id)) is None):
            problems.append({"location": f"steps.{step_id}", "message":
                             f"{target!r} in version {new.version} is a "
                             f"{new.step(target).type} step, not a {old.step(step_id).type}"})
        else:
            mapping[step_id] = target
    return mapping, problems


async def migrate(connection: Connection, journeys: JourneyStore, workspace: str,
                  journey_id: str, rule: MigrationRule, *, now: datetime) -> MigrationResult:
    async with connection.transaction():
        target = await connection.fetchval(
            "SELECT active_version FROM journey_status WHERE workspace = $1 AND journey_id = $2 "
            "AND status = 'active'", workspace, journey_id)
        if target is None:
            return MigrationResult(409, {"detail": "the journey has no active version"})
        exists = await connection.fetchval(
            "SELECT 1 FROM journeys WHERE workspace = $1 AND journey_id = $2 AND version = $3",
            workspace, journey_id, rule.from_version)
        if not exists:
            return MigrationResult(404, {"detail": f"no version {rule.from_version}"})
        if rule.from_version == target:
            return MigrationResult(422, {"detail": "that is the active version"})
        old = await journeys.version(connection, workspace, journey_id, rule.from_version)
        new = await journeys.version(connection, workspace, journey_id, target)
        rows = await connection.fetch(
            "SELECT enrollment_id, contact_id, step FROM enrollments WHERE workspace = $1 "
            "AND journey_id = $2 AND version = $3 AND state = 'active' FOR UPDATE",
            workspace, journey_id, rule.from_version)
        mapping, problems = plan(old, new, {r["step"] for r in rows if r["step"]}, rule)
        if problems:
            return MigrationResult(422, {"detail": "not every resting step maps",
                                         "problems": problems})
        for row in rows:
            step = mapping[row["step"]]
            await connection.execute(
                "UPDATE enrollments SET version = $2, step = $3, waiting_for = $4, "
                "updated_at = $5 WHERE enrollment_id = $1", row["enrollment_id"], target, step,
                _waiting_for(new.step(step)), now)
        await connection.executemany(
            "INSERT INTO journey_history (enrollment_id, workspace, contact_id, journey_id, "
            "version, step_id, action, reason, at) VALUES ($1, $2, $3, $4, $5, $6, 'migrated', "
            "$7, $8)",
            [(r["enrollment_id"], workspace, r["contact_id"], journey_id, target,
              mapping[r["step"]], f"version {rule.from_version} step {r['step']} → version "
                                  f"{target} step {mapping[r['step']]}", now) for r in rows])
    return MigrationResult(200, {"migrated": len(rows), "from_version": rule.from_version,
                                 "to_version": target, "steps": mapping})
