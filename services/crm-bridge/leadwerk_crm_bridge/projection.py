"""The contacts as the CRM sees them: a projection of scoring's contact-events and
contact-changes (traits, attribution, score, grade, rating, stage) and the recent activities
the rules name."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import orjson

from leadwerk_crm_bridge.domain.sync import summary

Connection = Any
RECENT = timedelta(days=90)
RECENT_LIMIT = 50


def _json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


async def contact_document(connection: Connection, workspace: str,
                           contact_id: str) -> dict[str, Any]:
    """What connectors map onto CRM fields: traits, attribution, score, grade, rating,
    stage and owner (empty traits when the bridge has not seen the contact yet)."""
    row = await connection.fetchrow(
        "SELECT traits, attribution, score, grade, rating, stage FROM contacts "
        "WHERE workspace = $1 AND contact_id = $2", workspace, contact_id)
    if row is None:
        return {"contact_id": contact_id, "traits": {}}
    traits = _json(row["traits"]) or {}
    document = {"contact_id": contact_id, "traits": traits,
                "attribution": _json(row["attribution"]), "score": row["score"],
                "grade": row["grade"], "rating": row["rating"], "stage": row["stage"],
                "owner": traits.get("owner")}
    return {k: v for k, v in document.items() if v is not None}


async def recent_summary(connection: Connection, workspace: str, contact_id: str,
                         now: datetime) -> tuple[list[dict[str, Any]], str]:
    """The contact's activities of the last 90 days (newest first) and their summary in
    words."""
    rows = await connection.fetch(
        "SELECT occurred_at, label FROM recent_activities WHERE workspace = $1 "
        "AND contact_id = $2 AND occurred_at >= $4 ORDER BY occurred_at DESC LIMIT $3",
        workspace, contact_id, RECENT_LIMIT, now - RECENT)
    labels = [{"at": r["occurred_at"].isoformat(), "label": r["label"]} for r in rows]
    return labels, summary(r["label"] for r in rows)


async def forget_old_activities(connection: Connection, now: datetime) -> int:
    """Activities older than 90 days go (the bridge runs this hourly)."""
    result: str = await connection.execute(
        "DELETE FROM recent_activities WHERE occurred_at < $1", now - RECENT)
    return int(result.rsplit(maxsplit=1)[-1])
