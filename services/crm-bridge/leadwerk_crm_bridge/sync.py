"""contact-events and contact-changes → the projection, and deliveries for every connector
that syncs what happened (``events`` in connectors.yaml): lifecycle and score changes,
selected activities, profile changes, erasures. One transaction per fetched batch, each event
once (the ``processed`` table)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson

from leadwerk_crm_bridge.config import Kind
from leadwerk_crm_bridge.deliveries import REDACTED, DeliveryWorker, Deps, enqueue, event_body
from leadwerk_crm_bridge.domain.sync import activity_view, label_for
from leadwerk_crm_bridge.projection import contact_document, remember_activity
from leadwerk_platform.envelope import Envelope, InvalidMessageError
from leadwerk_platform.kafka.consumer import ConsumedMessage

CONSUMER = "sync"
TOPICS = {"contact-events": "contact-events-dlq", "contact-changes": "contact-changes-dlq"}
Connection = Any
_ERASURE = uuid.UUID("3e1f0c2a-7d4b-5e6f-9a8b-1c2d3e4f5a6b")


def _jsonb(value: Any) -> str:
    return orjson.dumps(value).decode()


class SyncHandler:
    def __init__(self, deps: Deps, worker: DeliveryWorker | None) -> None:
        self._deps = deps
        self._worker = worker

    async def __call__(self, message: ConsumedMessage) -> None:
        await self.batch([message])

    async def batch(self, messages: Sequence[ConsumedMessage]) -> None:
        queued = 0
        async with self._deps.pool.acquire() as connection, connection.transaction():
            for message in messages:
                queued += await self._one(connection, message.envelope)
        if queued and self._worker is not None:
            self._worker.wake()

    async def _one(self, connection: Connection, envelope: Envelope) -> int:  # noqa: PLR0911
        data = envelope.data
        contact_id = data.get("survivor_id") if envelope.type == "contact.merged.v1" \
            else data.get("contact_id")
        if not isinstance(contact_id, str):
            raise InvalidMessageError(f"{envelope.type} without a contact id")
        if not await connection.fetchval(
                "INSERT INTO processed (consumer, event_id) VALUES ($1, $2) "
                "ON CONFLICT DO NOTHING RETURNING true", CONSUMER, envelope.id):
            return 0
        workspace, at = envelope.workspace, envelope.occurred_at
        match envelope.type:
            case "contact.profile_changed.v1":
                await connection.execute(
                    "INSERT INTO contacts (workspace, contact_id, traits, attribution, "
                    "updated_at) VALUES ($1, $2, $3::jsonb, $4::jsonb, $5) ON CONFLICT "
                    "(workspace, contact_id) DO UPDATE SET traits = $3::jsonb, attribution = "
                    "coalesce($4::jsonb, contacts.attribution), updated_at = $5",
                    workspace, contact_id, _jsonb(data.get("traits") or {}),
                    _jsonb(data["attribution"]) if data.get("attribution") else None, at)
                return await self._sync(connection, envelope, "profile",
                                        "contact.profile_changed",
                                        {"changed": data.get("changed") or {}})
            case "contact.score_changed.v1":
                known = await connection.fetchval(
                    "UPDATE contacts SET score = $3, grade = $4, rating = $5, updated_at = $6 "
                    "WHERE workspace = $1 AND contact_id = $2 RETURNING true", workspace,
                    contact_id, data.get("score"), data.get("grade"), data.get("rating"), at)
                if not known:  # an anonymous visitor: the CRM does not hear of it
                    return 0
                return await self._sync(
                    connection, envelope, "score", "contact.score_changed",
                    {k: data.get(k) for k in ("score", "previous_score", "grade", "rating",
                                              "previous_rating")}, coalesce=True)
            case "contact.stage_changed.v1":
                await connection.execute(
                    "INSERT INTO contacts (workspace, contact_id, stage, score, rating, "
                    "updated_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (workspace, "
                    "contact_id) DO UPDATE SET stage = $3, updated_at = $6",
                    workspace, contact_id, data.get("to_stage"), data.get("score"),
                    data.get("rating"), at)
                return await self._sync(
                    connection, envelope, "lifecycle", "contact.stage_changed",
                    {k: data.get(k) for k in ("from_stage", "to_stage", "cause", "reason")})
            case "contact.activity.v1":
                return await self._activity(connection, envelope)
            case "contact.merged.v1":
                await self._merged(connection, workspace, contact_id, str(data["merged_id"]))
            case "contact.erased.v1":
                return await self._erased(connection, envelope)
        return 0

    async def _sync(self, connection: Connection, envelope: Envelope, kind: Kind,
                    event: str, data: dict[str, Any], *, coalesce: bool = False) -> int:
        targets = self._deps.config.targets(envelope.workspace, kind)
        if not targets:
            return 0
        contact_id = str(envelope.data["contact_id"])
        contact = await contact_document(connection, envelope.workspace, contact_id)
        body = event_body(event, envelope.occurred_at,
                          {"contact_id": contact_id, **data, "contact": contact})
        queued = await enqueue(connection, [(c.id, c.url) for c in targets],
                               workspace=envelope.workspace, contact_id=contact_id,
                               source_id=envelope.id, kind=kind, body=body,
                               now=self._deps.clock(), coalesce=coalesce)
        self._deps.metrics.queued.labels(kind).inc(queued)
        return queued

    async def _activity(self, connection: Connection, envelope: Envelope) -> int:
        data = envelope.data
        if not data.get("known"):
            return 0
        label = label_for(activity_view(data), self._deps.config.activities)
        if label is None:
            return 0
        await remember_activity(connection, envelope.workspace, str(data["contact_id"]),
                                event_id=envelope.id, at=envelope.occurred_at, label=label)
        return await self._sync(connection, envelope, "activity", "contact.activity", {
            "event_id": envelope.id, "occurred_at": envelope.occurred_at.isoformat(),
            "type": data.get("kind"), "event": data.get("name"), "label": label})

    @staticmethod
    async def _merged(connection: Connection, workspace: str, survivor: str,
                      merged: str) -> None:
        """The merged-away contact's activities and CRM records belong to the survivor now
        (a record the survivor already has in that CRM wins)."""
        await connection.execute(
            "INSERT INTO recent_activities (workspace, contact_id, event_id, occurred_at, "
            "label) SELECT workspace, $2, event_id, occurred_at, label FROM "
            "recent_activities WHERE workspace = $1 AND contact_id = $3 ON CONFLICT DO NOTHING",
            workspace, survivor, merged)
        await connection.execute(
            "INSERT INTO crm_records (workspace, connector, contact_id, crm_id, updated_at) "
            "SELECT workspace, connector, $2, crm_id, updated_at FROM crm_records "
            "WHERE workspace = $1 AND contact_id = $3 ON CONFLICT DO NOTHING",
            workspace, survivor, merged)
        for table in ("recent_activities", "crm_records", "contacts"):
            await connection.execute(
                f"DELETE FROM {table} WHERE workspace = $1 AND contact_id = $2",  # noqa: S608
                workspace, merged)

    async def _erased(self, connection: Connection, envelope: Envelope) -> int:
        """Erasure: nothing more goes out about the person, what we keep is redacted, and
        each CRM that syncs erasures is asked to erase them too."""
        workspace = envelope.workspace
        ids = [str(envelope.data["contact_id"]),
               *(str(m) for m in envelope.data.get("merged_ids") or [])]
        emails = await connection.fetch(
            "SELECT contact_id::text AS contact_id, traits->>'email' AS email FROM contacts "
            "WHERE workspace = $1 AND contact_id = ANY($2::uuid[])", workspace, ids)
        await connection.execute(
            "UPDATE deliveries SET state = CASE WHEN state = 'pending' THEN 'cancelled' "
            "ELSE state END, body = $3 WHERE workspace = $1 AND contact_id = ANY($2::uuid[]) "
            "AND kind <> 'erasure'", workspace, ids, REDACTED)
        erasing = {c.id for c in self._deps.config.targets(workspace, "erasure")}
        await connection.execute(
            "DELETE FROM crm_records WHERE workspace = $1 AND contact_id = ANY($2::uuid[]) "
            "AND NOT (connector = ANY($3::text[]))", workspace, ids, sorted(erasing))
        for table in ("recent_activities", "contacts"):
            await connection.execute(
                f"DELETE FROM {table} WHERE workspace = $1 "  # noqa: S608
                "AND contact_id = ANY($2::uuid[])", workspace, ids)
        targets = [(c.id, c.url) for c in self._deps.config.targets(workspace, "erasure")]
        queued = 0
        email_of = {r["contact_id"]: r["email"] for r in emails}
        now: datetime = self._deps.clock()
        for contact_id in ids:
            queued += await enqueue(
                connection, targets, workspace=workspace, contact_id=contact_id,
                source_id=str(uuid.uuid5(_ERASURE, f"{envelope.id}:{contact_id}")),
                kind="erasure",
                body=event_body("contact.erased", envelope.occurred_at,
                                {"contact_id": contact_id, "email": email_of.get(contact_id)}),
                now=now)
        self._deps.metrics.queued.labels("erasure").inc(queued)
        return queued
