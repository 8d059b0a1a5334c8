"""The scorer: contact events and CRM feedback → contact changes (score, grade, stage).

Same discipline as the stitcher: one transaction per batch with the "processed" records, the
score rows (locked per contact), the explanation rows and the outbox; flush, then acknowledge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from leadwerk_platform.envelope import Envelope
from leadwerk_platform.kafka.producer import OutgoingMessage
from leadwerk_platform.kafka.streams import Rejected, StreamMessage
from leadwerk_platform.outbox import OutboxRelay, add_to_outbox
from leadwerk_scoring.adapters.identities import current_id, load_json, trait_values
from leadwerk_scoring.adapters.messages import CONTACT_CHANGES, contact_message, derived_id
from leadwerk_scoring.domain import lifecycle
from leadwerk_scoring.domain.lifecycle import Transition, TransitionError
from leadwerk_scoring.domain.model import (
    VISIT,
    ScoringModel,
    add_points,
    cap_window,
    decayed,
    falls_below_at,
    rating,
)
from leadwerk_scoring.runtime import Deps

logger = logging.getLogger(__name__)

CONSUMER = "scorer"
OUTBOX_STREAM = "scorer"
_MAX_MERGE_HOPS = 16


@dataclass
class ScoreRow:
    """A contact's score state, locked for the current transaction."""

    workspace: str
    contact_id: str
    engagement: float
    engagement_at: datetime | None
    grade: str
    known: bool
    stage: str
    model_version: int
    causes: list[dict[str, Any]] = field(default_factory=list)

    def value_at(self, moment: datetime, model: ScoringModel) -> float:
        if self.engagement_at is None:
            return 0.0
        return decayed(self.engagement, self.engagement_at, moment, model.half_life)


async def lock_score(connection: Any, workspace: str, contact_id: str,
                     model: ScoringModel, now: datetime) -> ScoreRow:
    """Lock (creating if needed) the score row of what ``contact_id`` is now, following merges
    that commit while we wait for the lock."""
    for _ in range(_MAX_MERGE_HOPS):
        contact_id = await current_id(connection, workspace, contact_id)
        await connection.execute(
            "INSERT INTO scores (workspace, contact_id, model_version, updated_at) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            workspace, contact_id, model.version, now)
        row = await connection.fetchrow(
            "SELECT engagement, engagement_at, grade, known, stage, model_version FROM scores "
            "WHERE workspace = $1 AND contact_id = $2 FOR UPDATE", workspace, contact_id)
        now_id = await current_id(connection, workspace, contact_id)
        if now_id == contact_id and row is not None:
            return ScoreRow(workspace, contact_id, row["engagement"], row["engagement_at"],
                            row["grade"], row["known"], row["stage"], row["model_version"])
        # Merged away while we waited: drop the empty row our insert may have made, go on.
        await connection.execute(
            "DELETE FROM scores WHERE workspace = $1 AND contact_id = $2 "
            "AND engagement_at IS NULL AND NOT known", workspace, contact_id)
    msg = f"merge chain of {contact_id} too long"
    raise RuntimeError(msg)


class ScoreWriter:
    """Applies points and transitions to a locked row and collects the outgoing changes."""

    def __init__(self, deps: Deps, connection: Any) -> None:
        self._deps = deps
        self._connection = connection
        self.outgoing: list[OutgoingMessage] = []

    async def points(self, row: ScoreRow, model: ScoringModel, envelope: Envelope,
                     activity: dict[str, Any], session_started: bool) -> None:
        matched = [r for r in model.engagement.rules if r.matches(activity)]
        if session_started:
            matched += [r for r in model.engagement.rules
                        if r.matches({**activity, "type": VISIT})]
        for rule in matched:
            window = cap_window(rule, envelope.occurred_at)
            if rule.cap is not None:
                counted = await self._connection.fetchval(
                    "INSERT INTO rule_counts (workspace, contact_id, rule, window_start, count) "
                    "VALUES ($1, $2, $3, $4, 1) ON CONFLICT (workspace, contact_id, rule, "
                    "window_start) DO UPDATE SET count = rule_counts.count + 1 "
                    "WHERE rule_counts.count < $5 RETURNING count",
                    row.workspace, row.contact_id, rule.id, window, rule.cap.times)
                if counted is None:
                    self._deps.metrics.capped.labels(rule.id).inc()
                    continue
            row.engagement, row.engagement_at = add_points(
                row.engagement, row.engagement_at, rule.points, envelope.occurred_at,
                model.half_life)
            row.causes.append({"rule": rule.id, "points": rule.points,
                               "event_id": envelope.id})
            await self._connection.execute(
                "INSERT INTO score_history (workspace, contact_id, event_id, event_type, rule, "
                "points, occurred_at, model_version) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                row.workspace, row.contact_id, envelope.id, activity.get("type", ""), rule.id,
                rule.points, envelope.occurred_at, model.version)
            self._deps.metrics.points.labels(rule.id).inc()

    async def transition(self, row: ScoreRow, change: Transition | None, model: ScoringModel,
                         at: datetime, cause_event_id: str | None) -> None:
        if change is None:
            return
        row.stage = change.to_stage
        await self._connection.execute(
            "INSERT INTO stage_history (workspace, contact_id, from_stage, to_stage, cause, "
            "reason, event_id, changed_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            row.workspace, row.contact_id, change.from_stage, change.to_stage, change.cause,
            change.reason, cause_event_id, at)
        self._deps.metrics.transitions.labels(change.from_stage, change.to_stage,
                                              change.cause).inc()
        score = round(row.value_at(at, model), 2)
        self.outgoing.append(contact_message(
            self._deps.settings, CONTACT_CHANGES, "contact.stage_changed.v1",
            event_id=derived_id("stage", row.contact_id, cause_event_id or at.isoformat(),
                                change.to_stage),
            workspace=row.workspace, contact_id=row.contact_id, occurred_at=at,
            correlation_id=None,
            data={"contact_id": row.contact_id, "from_stage": change.from_stage,
                  "to_stage": change.to_stage, "cause": change.cause, "reason": change.reason,
                  "score": score, "rating": rating(row.grade, model.band(score)),
                  "cause_event_id": cause_event_id,
                  "changed_at": at.isoformat().replace("+00:00", "Z")}))

    async def save(self, row: ScoreRow, model: ScoringModel, at: datetime, *,
                   previous_score: float, previous_rating: str, cause_id: str) -> None:
        """Write the row back; announce a score change when score or rating moved."""
        downgrade_at = None
        if row.stage == "mql" and row.engagement_at is not None:
            downgrade_at = falls_below_at(row.engagement, row.engagement_at,
                                          model.lifecycle.mql.downgrade_below, model.half_life)
        await self._connection.execute(
            "UPDATE scores SET engagement = $3, engagement_at = $4, grade = $5, known = $6, "
            "stage = $7, stage_changed_at = CASE WHEN stage = $7 THEN stage_changed_at "
            "ELSE $8 END, downgrade_at = $9, model_version = $10, updated_at = $8 "
            "WHERE workspace = $1 AND contact_id = $2",
            row.workspace, row.contact_id, row.engagement, row.engagement_at, row.grade,
            row.known, row.stage, at, downgrade_at, model.version)
        score = round(row.value_at(at, model), 2)
        new_rating = rating(row.grade, model.band(score))
        if not row.causes and new_rating == previous_rating:
            return
        self.outgoing.append(contact_message(
            self._deps.settings, CONTACT_CHANGES, "contact.score_changed.v1",
            event_id=derived_id("score", row.contact_id, cause_id), workspace=row.workspace,
            contact_id=row.contact_id, occurred_at=at, correlation_id=None,
            data={"contact_id": row.contact_id, "score": score,
                  "previous_score": round(previous_score, 2), "grade": row.grade,
                  "band": model.band(score), "rating": new_rating,
                  "previous_rating": previous_rating, "model_version": model.version,
                  "causes": row.causes}))


async def contact_traits(connection: Any, workspace: str, contact_id: str) -> dict[str, Any]:
    traits = await connection.fetchval(
        "SELECT traits FROM contacts WHERE workspace = $1 AND contact_id = $2",
        workspace, contact_id)
    return trait_values(load_json(traits)) if traits is not None else {}


class Scorer:
    """The batch handler of the ``scoring.scorer`` stream processor."""

    def __init__(self, deps: Deps, relay: OutboxRelay, timer: DowngradeTimer | None) -> None:
        self._deps = deps
        self._relay = relay
        self._timer = timer

    async def __call__(self, batch: Sequence[StreamMessage]) -> list[Rejected]:
        rejected: list[Rejected] = []
        async with self._deps.pool.acquire() as connection, connection.transaction():
            fresh = {r["event_id"] for r in await connection.fetch(
                "INSERT INTO processed (consumer, event_id) "
                "SELECT $1, unnest($2::uuid[]) ON CONFLICT DO NOTHING RETURNING event_id::text",
                CONSUMER, list({m.envelope.id for m in batch}))}
            writer = ScoreWriter(self._deps, connection)
            for message in batch:
                envelope = message.envelope
                if envelope.id not in fresh:
                    self._deps.metrics.duplicates.labels(CONSUMER).inc()
                    continue
                fresh.discard(envelope.id)
                problem = await self._apply(connection, writer, envelope)
                if problem:
                    rejected.append(Rejected(message, problem))
            await add_to_outbox(connection, OUTBOX_STREAM, writer.outgoing)
        await self._relay.flush()
        self._deps.metrics.events.labels(CONSUMER).inc(len(batch))
        if self._timer is not None:
            self._timer.wake()
        return rejected

    async def _apply(self, connection: Any, writer: ScoreWriter,
                     envelope: Envelope) -> str | None:
        data = envelope.data
        contact_id = data.get("contact_id") or data.get("survivor_id")
        if not isinstance(contact_id, str):
            return f"{envelope.type} without a contact id"
        model = await self._deps.models.current(connection, envelope.workspace)
        now = self._deps.clock()
        row = await lock_score(connection, envelope.workspace, contact_id, model, now)
        previous_score = row.value_at(envelope.occurred_at, model)
        previous_rating = rating(row.grade, model.band(round(previous_score, 2)))
        at = envelope.occurred_at
        match envelope.type:
            case "contact.activity.v1":
                session = data.get("session") or {}
                activity = {**(data.get("properties") or {}), "type": data.get("kind"),
                            "event": data.get("name")}
                await writer.points(row, model, envelope, activity,
                                    bool(session.get("started")))
                if data.get("known") and not row.known:
                    row.known = True
                    await writer.transition(row, lifecycle.on_identified(row.stage), model, at,
                                            envelope.id)
                if row.known:
                    await self._qualify(connection, writer, row, model, at=at,
                                        event_id=envelope.id)
            case "contact.profile_changed.v1":
                row.known = True
                await writer.transition(row, lifecycle.on_identified(row.stage), model, at,
                                        envelope.id)
                await self._qualify(connection, writer, row, model, at=at,
                                    event_id=envelope.id, traits=data.get("traits"))
            case "contact.merged.v1":
                await self._merge(connection, writer, row, model, envelope)
            case "crm.lead_feedback.v1":
                row.known = True
                try:
                    change = lifecycle.on_feedback(row.stage, str(data.get("status")),
                                                   data.get("reason"))
                except TransitionError as error:
                    return str(error)
                await writer.transition(row, change, model, at, envelope.id)
            case _:
                return None  # another service's event on a shared topic: not ours to score
        await writer.save(row, model, now if at > now else at, previous_score=previous_score,
                          previous_rating=previous_rating, cause_id=envelope.id)
        return None

    async def _qualify(self, connection: Any, writer: ScoreWriter, row: ScoreRow,
                       model: ScoringModel, *, at: datetime, event_id: str,
                       traits: dict[str, Any] | None = None) -> None:
        """Grade from the profile, then the score-driven lifecycle rules."""
        if traits is None:
            traits = await contact_traits(connection, row.workspace, row.contact_id)
        row.grade = model.grade(traits)
        await writer.transition(row, lifecycle.on_score(row.stage, row.value_at(at, model),
                                                        traits, model), model, at, event_id)

    async def _merge(self, connection: Any, writer: ScoreWriter, row: ScoreRow,
                     model: ScoringModel, envelope: Envelope) -> None:
        """Move the merged contact's score state onto the survivor (``row``)."""
        workspace, merged = envelope.workspace, str(envelope.data.get("merged_id"))
        if merged == row.contact_id:
            return
        other = await connection.fetchrow(
            "SELECT engagement, engagement_at, known, stage FROM scores "
            "WHERE workspace = $1 AND contact_id = $2 FOR UPDATE", workspace, merged)
        if other is None:
            return
        if other["engagement_at"] is not None:
            row.engagement, row.engagement_at = add_points(
                row.engagement, row.engagement_at, other["engagement"], other["engagement_at"],
                model.half_life)
            row.causes.append({"rule": "merge", "points": other["engagement"],
                               "event_id": envelope.id})
        row.known = True
        target = lifecycle.further(row.stage, other["stage"])
        if target != row.stage:
            await writer.transition(row, Transition(row.stage, target, "merge"), model,
                                    envelope.occurred_at, envelope.id)
        for table in ("score_history", "stage_history"):
            await connection.execute(
                f"UPDATE {table} SET contact_id = $3 "  # noqa: S608 - fixed table names
                "WHERE workspace = $1 AND contact_id = $2", workspace, merged, row.contact_id)
        await connection.execute(
            "INSERT INTO rule_counts (workspace, contact_id, rule, window_start, count) "
            "SELECT workspace, $3, rule, window_start, count FROM rule_counts "
            "WHERE workspace = $1 AND contact_id = $2 ON CONFLICT (workspace, contact_id, rule, "
            "window_start) DO UPDATE SET count = rule_counts.count + EXCLUDED.count",
            workspace, merged, row.contact_id)
        await connection.execute(
            "DELETE FROM rule_counts WHERE workspace = $1 AND contact_id = $2", workspace, merged)
        await connection.execute(
            "DELETE FROM scores WHERE workspace = $1 AND contact_id = $2", workspace, merged)


class DowngradeTimer:
    """Moves MQLs back to lead at the exact moment decay takes them below the lower threshold.

    Not a cron job: each score row knows when it will cross (computed from the half-life), and
    the timer sleeps until the earliest such moment (or until the scorer wakes it).
    """

    def __init__(self, deps: Deps, relay: OutboxRelay, max_sleep: float = 300.0) -> None:
        self._deps = deps
        self._relay = relay
        self._max_sleep = max_sleep
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self.run_due()
                delay = await self._next_delay()
            except Exception:
                logger.exception("downgrade timer failed; retrying")
                delay = 5.0
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _next_delay(self) -> float:
        async with self._deps.pool.acquire() as connection:
            due = await connection.fetchval(
                "SELECT min(downgrade_at) FROM scores WHERE downgrade_at IS NOT NULL")
        if due is None:
            return self._max_sleep
        seconds: float = (due - self._deps.clock()) / timedelta(seconds=1)
        return min(max(seconds, 0.01), self._max_sleep)

    async def run_due(self) -> int:
        """Apply every downgrade that is due now; return how many contacts moved."""
        moved = 0
        now = self._deps.clock()
        async with self._deps.pool.acquire() as connection, connection.transaction():
            rows = await connection.fetch(
                "SELECT workspace, contact_id::text AS contact_id FROM scores "
                "WHERE downgrade_at <= $1 ORDER BY downgrade_at LIMIT 500 "
                "FOR UPDATE SKIP LOCKED", now)
            writer = ScoreWriter(self._deps, connection)
            for item in rows:
                model = await self._deps.models.current(connection, item["workspace"])
                row = await lock_score(connection, item["workspace"], item["contact_id"],
                                       model, now)
                score = row.value_at(now, model)
                previous_rating = rating(row.grade, model.band(round(score, 2)))
                change = lifecycle.on_score(row.stage, score, {}, model)
                if change is not None and change.to_stage == "lead":
                    moved += 1
                    await writer.transition(row, change, model, now, None)
                await writer.save(row, model, now, previous_score=score,
                                  previous_rating=previous_rating,
                                  cause_id=f"decay:{now.isoformat()}")
            await add_to_outbox(connection, OUTBOX_STREAM, writer.outgoing)
        if rows:
            await self._relay.flush()
        return moved
