"""contact-events and contact-changes → the projection, and deliveries for every connector
that syncs what happened (``events`` in connectors.yaml): lifecycle and score changes,
selected activities, profile changes, erasures. One transaction per fetched batch, each event
once (the ``processed`` table)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from leadwerk_crm_bridge.config import Kind
from leadwerk_crm_bridge.deliveries import (
    REDACTED,
    DeliveryWorker,
    Deps,
    delivery_row,
    enqueue,
    event_body,
    insert_deliveries,
    malformed_is_invalid,
    valid_uuid,
)
from leadwerk_crm_bridge.domain.sync import activity_view, label_for
from leadwerk_crm_bridge.projection import contact_document
from leadwerk_platform.envelope import Envelope, InvalidMessageError
from leadwerk_platform.kafka.consumer import ConsumedMessage

CONSUMER = "sync"
TOPICS = {"contact-events": "contact-events-dlq", "contact-changes": "contact-changes-dlq"}
Connection = Any
_ERASURE = uuid.UUID("3e1f0c2a-7d4b-5e6f-9a8b-1c2d3e4f5a6b")


def _jsonb(value: Any) -> str:
    return orjson.dumps(value).decode()


@dataclass
class _Batch:
    """What a fetched batch of activities writes in one go, and the contacts it read."""

    remembered: list[tuple[str, str, str, datetime, str]] = field(default_factory=list)
    deliveries: list[tuple[Any, ...]] = field(default_factory=list)
    contacts: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    queued: int = 0

    async def flush(self, connection: Connection) -> None:
        if self.remembered:
            await connection.executemany(
                "INSERT INTO recent_activities (workspace, contact_id, event_id, occurred_at, "
                "label) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING", self.remembered)
        await insert_deliveries(connection, self.deliveries)
        self.queued += len(self.deliveries)
        self.remembered, self.deliveries = [], []


class SyncHandler:
    def __init__(self, deps: Deps, worker: DeliveryWorker | None) -> None:
        self._deps = deps
        self._worker = worker

    async def __call__(self, message: ConsumedMessage) -> None:
        await self.batch([message])

    async def batch(self, messages: Sequence[ConsumedMessage]) -> None:
        state = _Batch()
        async with self._deps.pool.acquire() as connection, connection.transaction():
            fresh = {r["event_id"] for r in await connection.fetch(
                "INSERT INTO processed (consumer, event_id) SELECT $1, unnest($2::uuid[]) "
                "ON CONFLICT DO NOTHING RETURNING event_id", CONSUMER,
                [valid_uuid(m.envelope.id, "the event id") for m in messages])}
            for message in messages:
                if uuid.UUID(message.envelope.id) in fresh:
                    with malformed_is_invalid(message.envelope):
                        await self._one(connection, message.envelope, state)
            await state.flush(connection)
        if state.queued and self._worker is not None:
            self._worker.wake()

    async def _one(self, connection: Connection, envelope: Envelope, state: _Batch) -> None:
        data = envelope.data
        contact_id = data.get("survivor_id") if envelope.type == "contact.merged.v1" \
            else data.get("contact_id")
        contact_id = valid_uuid(contact_id, "the contact id")
        if envelope.type == "contact.activity.v1":
            await self._activity(connection, envelope, state)
            return
        # Anything else writes at once, so what the batch holds goes first (in order).
        await state.flush(connection)
        state.contacts.pop((envelope.workspace, contact_id), None)
        state.queued += await self._change(connection, envelope, contact_id)

    async def _change(self, connection: Connection, envelope: Envelope,
                      contact_id: str) -> int:
        data = envelope.data
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
                    "contact_id) DO UPDATE SET stage = $3, score = coalesce($4, contacts.score), "
                    "rating = coalesce($5, contacts.rating), updated_at = $6",
                    workspace, contact_id, data.get("to_stage"), data.get("score"),
                    data.get("rating"), at)
                return await self._sync(
                    connection, envelope, "lifecycle", "contact.stage_changed",
                    {k: data.get(k) for k in ("from_stage", "to_stage", "cause", "reason")})
            case "contact.merged.v1":
                await self._merged(connection, workspace, contact_id,
                                   valid_uuid(data.get("merged_id"), "merged_id"))
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

    async def _activity(self, connection: Connection, envelope: Envelope,
                        state: _Batch) -> None:
        """A selected activity: remembered for the summary and queued for the connectors
        (written with the batch's others in one go)."""
        data, workspace = envelope.data, envelope.workspace
        if not data.get("known"):
            return
        label = label_for(activity_view(data), self._deps.config.activities)
        if label is None:
            return
        contact_id = str(data["contact_id"])
        state.remembered.append((workspace, contact_id, envelope.id, envelope.occurred_at,
                                 label))
        targets = self._deps.config.targets(workspace, "activity")
        if not targets:
            return
        key = (workspace, contact_id)
        if key not in state.contacts:
            state.contacts[key] = await contact_document(connection, workspace, contact_id)
        body = event_body("contact.activity", envelope.occurred_at, {
            "contact_id": contact_id, "event_id": envelope.id,
            "occurred_at": envelope.occurred_at.isoformat(), "type": data.get("kind"),
            "event": data.get("name"), "label": label, "contact": state.contacts[key]})
        now = self._deps.clock()
        state.deliveries.extend(delivery_row(
            c.id, c.url, workspace=workspace, contact_id=contact_id, source_id=envelope.id,
            kind="activity", body=body, now=now) for c in targets)
        self._deps.metrics.queued.labels("activity").inc(len(targets))

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
        # A record the survivor took over goes; one it could not (it has its own in that
        # CRM) stays with the merged id, so an erasure can still reach it.
        await connection.execute(
            "DELETE FROM crm_records m WHERE workspace = $1 AND contact_id = $3 AND EXISTS ("
            "SELECT 1 FROM crm_records s WHERE s.workspace = m.workspace AND s.connector = "
            "m.connector AND s.contact_id = $2 AND s.crm_id = m.crm_id)",
            workspace, survivor, merged)
        for table in ("recent_activities", "contacts"):
            await connection.execute(
                f"DELETE FROM {table} WHERE workspace = $1 AND contact_id = $2",  # noqa: S608
                workspace, merged)

    async def _erased(self, connection: Connection, envelope: Envelope) -> int:
        """Erasure: nothing more goes out about the person, what we keep is redacted, and
        each CRM that syncs erasures is asked to erase them too."""
        workspace = envelope.workspace
        merged = envelope.data.get("merged_ids") or []
        if not isinstance(merged, list):
            raise InvalidMessageError("merged_ids is a list")
        ids = [valid_uuid(envelope.data["contact_id"], "the contact id"),
               *(valid_uuid(m, "a merged id") for m in merged)]
        emails = await connection.fetch(
            "SELECT contact_id::text AS contact_id, traits->>'email' AS email FROM contacts "
            "WHERE workspace = $1 AND contact_id = ANY($2::uuid[])", workspace, ids)
        await connection.executemany(
            "INSERT INTO erasures (workspace, contact_id, erased_at) VALUES ($1, $2, $3) "
            "ON CONFLICT DO NOTHING", [(workspace, c, envelope.occurred_at) for c in ids])
        # Waiting and dead deliveries are cancelled, all are redacted; what is in flight
        # finishes (the erasure queues behind it) and is redacted when it does.
        await connection.execute(
            "UPDATE deliveries SET state = CASE WHEN state IN ('pending', 'dead') "
            "THEN 'cancelled' ELSE state END, body = $3, last_error = NULL "
            "WHERE workspace = $1 AND contact_id = ANY($2::uuid[]) AND kind <> 'erasure' "
            "AND NOT (state = 'pending' AND batch_id IS NOT NULL)", workspace, ids, REDACTED)
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
