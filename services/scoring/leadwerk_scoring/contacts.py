"""Reading and changing contacts for the API: profile, timeline, explanation, export, merge,
stage changes and erasure (Postgres; messages through the outbox stream ``api``)."""

from __future__ import annotations

import uuid
from typing import Any

from leadwerk_platform.kafka.producer import OutgoingMessage
from leadwerk_platform.outbox import add_to_outbox
from leadwerk_scoring.adapters import identities as store
from leadwerk_scoring.adapters.messages import CONTACT_CHANGES, contact_message, derived_id
from leadwerk_scoring.domain import lifecycle
from leadwerk_scoring.domain.identity import Identifier, Merge
from leadwerk_scoring.domain.model import decayed, rating
from leadwerk_scoring.runtime import Deps
from leadwerk_scoring.scorer import ScoreWriter, lock_score

OUTBOX_STREAM = "api"


class NotFoundError(LookupError):
    pass


async def contact_document(deps: Deps, connection: Any, workspace: str,
                           contact_id: str) -> dict[str, Any]:
    """Everything the contacts API shows about one contact (merges followed)."""
    requested = contact_id
    contact_id = await store.current_id(connection, workspace, contact_id)
    row = await connection.fetchrow(
        "SELECT created_at, updated_at, last_seen_at, traits, first_touch, last_touch "
        "FROM contacts WHERE workspace = $1 AND contact_id = $2", workspace, contact_id)
    score = await connection.fetchrow(
        "SELECT engagement, engagement_at, grade, known, stage, stage_changed_at, "
        "model_version FROM scores WHERE workspace = $1 AND contact_id = $2",
        workspace, contact_id)
    if row is None:
        seen = await connection.fetchval(
            "SELECT max(occurred_at) FROM timeline WHERE workspace = $1 AND contact_id = $2",
            workspace, contact_id)
        if seen is None and score is None:
            raise NotFoundError(requested)
    identifiers = await connection.fetch(
        "SELECT kind, value FROM identities WHERE workspace = $1 AND contact_id = $2 "
        "ORDER BY kind, value", workspace, contact_id)
    model = await deps.models.current(connection, workspace)
    now = deps.clock()
    engagement = 0.0
    if score is not None and score["engagement_at"] is not None:
        engagement = decayed(score["engagement"], score["engagement_at"], now, model.half_life)
    engagement = round(engagement, 2)
    grade = score["grade"] if score else model.fit.default_grade
    traits = store.load_json(row["traits"]) if row else {}
    values = store.trait_values(traits)
    band = model.band(engagement)
    return {
        "id": contact_id,
        "requested_id": requested,
        "workspace": workspace,
        "known": row is not None,
        "traits": values,
        "trait_updated_at": {name: entry["at"] for name, entry in traits.items()},
        "identifiers": [{"kind": r["kind"], "value": r["value"]} for r in identifiers],
        "score": engagement,
        "grade": grade,
        "band": band,
        "rating": rating(grade, band),
        "stage": score["stage"] if score else ("lead" if row else "visitor"),
        "stage_changed_at": store.stamp(score["stage_changed_at"]) if score else None,
        "owner": values.get("owner"),
        "attribution": {
            "first_touch": store.load_json(row["first_touch"]) if row else None,
            "last_touch": store.load_json(row["last_touch"]) if row else None,
        },
        "created_at": store.stamp(row["created_at"]) if row else None,
        "last_seen_at": store.stamp(row["last_seen_at"]) if row else None,
        "model_version": model.version,
    }


async def find(connection: Any, workspace: str, identifier: Identifier) -> str | None:
    return await connection.fetchval(  # type: ignore[no-any-return]
        "SELECT contact_id::text FROM identities WHERE workspace = $1 AND kind = $2 "
        "AND value = $3", workspace, identifier.kind, identifier.value)


async def timeline(connection: Any, workspace: str, contact_id: str, *, limit: int,
                   offset: int) -> list[dict[str, Any]]:
    rows = await connection.fetch(
        "SELECT event_id::text AS event_id, type, name, occurred_at, received_at, "
        "session_id::text AS session_id, data FROM timeline WHERE workspace = $1 "
        "AND contact_id = $2 ORDER BY occurred_at DESC, event_id LIMIT $3 OFFSET $4",
        workspace, contact_id, limit, offset)
    return [{"event_id": r["event_id"], "type": r["type"], "name": r["name"],
             "occurred_at": store.stamp(r["occurred_at"]),
             "received_at": store.stamp(r["received_at"]),
             "session_id": r["session_id"], "data": store.load_json(r["data"])} for r in rows]


async def score_history(deps: Deps, connection: Any, workspace: str,
                        contact_id: str) -> dict[str, Any]:
    """Why the score is what it is: every counted rule match and what it is worth now."""
    model = await deps.models.current(connection, workspace)
    now = deps.clock()
    rows = await connection.fetch(
        "SELECT event_id::text AS event_id, event_type, rule, points, occurred_at, "
        "model_version FROM score_history WHERE workspace = $1 AND contact_id = $2 "
        "ORDER BY occurred_at, id", workspace, contact_id)
    entries = []
    by_rule: dict[str, float] = {}
    for r in rows:
        worth = decayed(r["points"], r["occurred_at"], now, model.half_life)
        by_rule[r["rule"]] = by_rule.get(r["rule"], 0.0) + worth
        entries.append({"event_id": r["event_id"], "event_type": r["event_type"],
                        "rule": r["rule"], "points": r["points"], "worth_now": round(worth, 2),
                        "occurred_at": store.stamp(r["occurred_at"]),
                        "model_version": r["model_version"]})
    stages = await connection.fetch(
        "SELECT from_stage, to_stage, cause, reason, event_id::text AS event_id, changed_at "
        "FROM stage_history WHERE workspace = $1 AND contact_id = $2 ORDER BY id",
        workspace, contact_id)
    return {
        "contact_id": contact_id,
        "score": round(sum(by_rule.values()), 2),
        "by_rule": {rule: round(value, 2) for rule, value in sorted(by_rule.items())},
        "history": entries,
        "stages": [{**dict(s), "changed_at": store.stamp(s["changed_at"])} for s in stages],
    }


async def export(deps: Deps, connection: Any, workspace: str, contact_id: str) -> dict[str, Any]:
    """Everything held about the person (GDPR Art. 15)."""
    document = await contact_document(deps, connection, workspace, contact_id)
    contact_id = document["id"]
    merges = await connection.fetch(
        "SELECT merged_id::text AS merged_id, reason, actor, merged_at FROM merges "
        "WHERE workspace = $1 AND survivor_id = $2", workspace, contact_id)
    return {
        "contact": document,
        "timeline": await timeline(connection, workspace, contact_id, limit=1_000_000,
                                   offset=0),
        "scoring": await score_history(deps, connection, workspace, contact_id),
        "merged_contacts": [{**dict(m), "merged_at": store.stamp(m["merged_at"])} for m in merges],
    }


async def merge(deps: Deps, connection: Any, workspace: str, *, survivor: str, merged: str,
                actor: str) -> None:
    """An explicit merge through the API: recorded with its actor, published like any other."""
    survivor = await store.current_id(connection, workspace, survivor)
    merged = await store.current_id(connection, workspace, merged)
    if survivor == merged:
        raise ValueError("both ids already name the same contact")
    async with connection.transaction():
        for contact_id in (survivor, merged):
            exists = await connection.fetchval(
                "SELECT 1 FROM contacts WHERE workspace = $1 AND contact_id = $2 UNION ALL "
                "SELECT 1 FROM timeline WHERE workspace = $1 AND contact_id = $2 LIMIT 1",
                workspace, contact_id)
            if not exists:
                raise NotFoundError(contact_id)
        message = await store.apply_merge(
            connection, deps.settings, workspace, Merge(survivor, merged, "api"), actor=actor,
            now=deps.clock(), cause_event_id=None, correlation_id=None)
        await add_to_outbox(connection, OUTBOX_STREAM, [message])


async def change_stage(deps: Deps, connection: Any, workspace: str, contact_id: str, *,
                       stage: str, reason: str | None) -> None:
    """A stage set by a person through the API (raises ``TransitionError``)."""
    async with connection.transaction():
        contact_id = await store.current_id(connection, workspace, contact_id)
        if not await connection.fetchval(
                "SELECT 1 FROM contacts WHERE workspace = $1 AND contact_id = $2",
                workspace, contact_id):
            raise NotFoundError(contact_id)
        model = await deps.models.current(connection, workspace)
        now = deps.clock()
        row = await lock_score(connection, workspace, contact_id, model, now)
        row.known = True
        if row.stage == "visitor":
            row.stage = "lead"
        change = lifecycle.manual(row.stage, stage, reason)
        writer = ScoreWriter(deps, connection)
        score = row.value_at(now, model)
        previous_rating = rating(row.grade, model.band(round(score, 2)))
        action_id = str(uuid.uuid4())
        await writer.transition(row, change, model, now, None)
        await writer.save(row, model, now, previous_score=score,
                          previous_rating=previous_rating, cause_id=action_id)
        await add_to_outbox(connection, OUTBOX_STREAM, writer.outgoing)


async def erase(deps: Deps, connection: Any, workspace: str, contact_id: str) -> str:
    """GDPR erasure: delete everything here, block the identifiers, tell every service."""
    async with connection.transaction():
        contact_id = await store.current_id(connection, workspace, contact_id)
        merged = [r["merged_id"] for r in await connection.fetch(
            "SELECT merged_id::text AS merged_id FROM merges "
            "WHERE workspace = $1 AND survivor_id = $2", workspace, contact_id)]
        ids = [contact_id, *merged]
        identities = await connection.fetch(
            "SELECT kind, value FROM identities WHERE workspace = $1 "
            "AND contact_id = ANY($2::uuid[])", workspace, ids)
        known = await connection.fetchval(
            "SELECT 1 FROM contacts WHERE workspace = $1 AND contact_id = $2",
            workspace, contact_id)
        if not known and not identities:
            raise NotFoundError(contact_id)
        digests = sorted({store.identifier_digest(workspace, Identifier(r["kind"], r["value"]))
                          for r in identities} |
                         {store.identifier_digest(workspace, Identifier("contact", i))
                          for i in ids})
        now = deps.clock()
        await connection.executemany(
            "INSERT INTO blocked_identities (workspace, digest, blocked_at) VALUES ($1, $2, $3) "
            "ON CONFLICT DO NOTHING", [(workspace, d, now) for d in digests])
        for table in ("identities", "timeline", "contacts", "scores", "score_history",
                      "rule_counts", "stage_history"):
            await connection.execute(
                f"DELETE FROM {table} WHERE workspace = $1 "  # noqa: S608 - fixed names
                "AND contact_id = ANY($2::uuid[])", workspace, ids)
        await connection.execute(
            "DELETE FROM merges WHERE workspace = $1 AND (survivor_id = ANY($2::uuid[]) "
            "OR merged_id = ANY($2::uuid[]))", workspace, ids)
        message: OutgoingMessage = contact_message(
            deps.settings, CONTACT_CHANGES, "contact.erased.v1",
            event_id=derived_id("erased", workspace, contact_id), workspace=workspace,
            contact_id=contact_id, occurred_at=now, correlation_id=None,
            data={"contact_id": contact_id, "merged_ids": merged,
                  "identifier_digests": digests, "requested_by": "api"})
        await add_to_outbox(connection, OUTBOX_STREAM, [message])
    return contact_id
