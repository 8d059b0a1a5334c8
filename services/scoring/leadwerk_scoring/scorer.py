"""The scorer: contact events and CRM feedback → contact changes (score, grade, stage).

Same discipline as the stitcher: one transaction per batch with the "processed" records, the
score rows (locked per contact), the explanation rows and the outbox; flush, then acknowledge.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from leadwerk_platform.envelope import Envelope
from leadwerk_platform.kafka.producer import OutgoingMessage
from leadwerk_platform.kafka.streams import Rejected, StreamMessage
from leadwerk_platform.outbox import OutboxRelay, add_to_outbox
from leadwerk_platform.timers import DueTimer
from leadwerk_scoring.adapters.identities import (
    MAX_MERGE_HOPS,
    current_id,
    current_ids,
    jsonb,
    load_json,
    trait_values,
)
from leadwerk_scoring.adapters.messages import (
    CONTACT_CHANGES,
    CONTACT_EVENTS,
    contact_message,
    derived_id,
)
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
from leadwerk_scoring.domain.profile import merge_traits
from leadwerk_scoring.runtime import Deps

logger = logging.getLogger(__name__)

CONSUMER = "scorer"
#: The message types the scorer applies; the rest of its topics (email events other than
#: bounces, …) are recorded as processed without locking a score row.
APPLIED = frozenset({"contact.activity.v1", "contact.profile_changed.v1", "contact.merged.v1",
                     "contact.change_requested.v1", "crm.lead_feedback.v1",
                     "crm.contact_updated.v1", "email.bounced.v1"})
OUTBOX_STREAM = "scorer"
_DOWNGRADE_BATCH = 500


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
    gone: bool = False  # merged into another row during this batch, or erased

    def value_at(self, moment: datetime, model: ScoringModel) -> float:
        if self.engagement_at is None:
            return 0.0
        return decayed(self.engagement, self.engagement_at, moment, model.half_life)


async def lock_score(connection: Any, workspace: str, contact_id: str,
                     model: ScoringModel, now: datetime) -> ScoreRow:
    """Lock (creating if needed) the score row of what ``contact_id`` is now, following merges
    that commit while we wait for the lock."""
    for _ in range(MAX_MERGE_HOPS):
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
        self._history: list[tuple[Any, ...]] = []
        self._stages: list[tuple[Any, ...]] = []

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
            self._history.append((row.workspace, row.contact_id, envelope.id,
                                  activity.get("type") or "", rule.id, rule.points,
                                  envelope.occurred_at, model.version))
            self._deps.metrics.points.labels(rule.id).inc()

    def adjust(self, row: ScoreRow, model: ScoringModel, envelope: Envelope, points: float,
               rule: str) -> None:
        """Points given by a command (a journey step), explained like a rule match."""
        row.engagement, row.engagement_at = add_points(
            row.engagement, row.engagement_at, points, envelope.occurred_at, model.half_life)
        row.causes.append({"rule": rule, "points": points, "event_id": envelope.id})
        self._history.append((row.workspace, row.contact_id, envelope.id, "command", rule,
                              points, envelope.occurred_at, model.version))

    async def transition(self, row: ScoreRow, change: Transition | None, model: ScoringModel,
                         at: datetime, cause_event_id: str | None) -> None:
        if change is None:
            return
        if change.to_stage == "recycled" and row.engagement_at is not None:
            # Engagement counts as earned since the recycle when it happened after it; what
            # the score already holds happened before (a CRM's clock, or its seconds, can
            # put the verdict before the visits that led to it).
            at = max(at, row.engagement_at)
        row.stage = change.to_stage
        self._stages.append((row.workspace, row.contact_id, change.from_stage, change.to_stage,
                             change.cause, change.reason, cause_event_id, at))
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
        """Announce, store and flush one row (for callers that handle one contact)."""
        self.announce(row, model, at, previous_score=previous_score,
                      previous_rating=previous_rating, cause_id=cause_id)
        await self.store([(row, model)], at)
        await self.flush()

    def announce(self, row: ScoreRow, model: ScoringModel, at: datetime, *,
                 previous_score: float, previous_rating: str, cause_id: str) -> None:
        """A score change message when this event moved the score or the rating."""
        score = round(row.value_at(at, model), 2)
        new_rating = rating(row.grade, model.band(score))
        causes, row.causes = row.causes, []
        if not causes and new_rating == previous_rating:
            return
        self.outgoing.append(contact_message(
            self._deps.settings, CONTACT_CHANGES, "contact.score_changed.v1",
            event_id=derived_id("score", row.contact_id, cause_id), workspace=row.workspace,
            contact_id=row.contact_id, occurred_at=at, correlation_id=None,
            data={"contact_id": row.contact_id, "score": score,
                  "previous_score": round(previous_score, 2), "grade": row.grade,
                  "band": model.band(score), "rating": new_rating,
                  "previous_rating": previous_rating, "model_version": model.version,
                  "causes": causes}))

    async def store(self, rows: Sequence[tuple[ScoreRow, ScoringModel]], at: datetime) -> None:
        """Write the rows back (one statement for all)."""
        values = []
        for row, model in rows:
            downgrade_at = None
            if row.stage == "mql" and row.engagement_at is not None:
                downgrade_at = falls_below_at(row.engagement, row.engagement_at,
                                              model.lifecycle.mql.downgrade_below,
                                              model.half_life)
            values.append((row.workspace, row.contact_id, row.engagement, row.engagement_at,
                           row.grade, row.known, row.stage, at, downgrade_at, model.version))
        if values:
            await self._connection.executemany(
                "UPDATE scores SET engagement = $3, engagement_at = $4, grade = $5, "
                "known = $6, stage = $7, stage_changed_at = CASE WHEN stage = $7 "
                "THEN stage_changed_at ELSE $8 END, downgrade_at = $9, model_version = $10, "
                "updated_at = $8 WHERE workspace = $1 AND contact_id = $2", values)

    async def flush(self) -> None:
        """Write the collected explanation and stage-history rows."""
        if self._history:
            await self._connection.executemany(
                "INSERT INTO score_history (workspace, contact_id, event_id, event_type, rule, "
                "points, occurred_at, model_version) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                self._history)
            self._history = []
        if self._stages:
            await self._connection.executemany(
                "INSERT INTO stage_history (workspace, contact_id, from_stage, to_stage, "
                "cause, reason, event_id, changed_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                self._stages)
            self._stages = []


async def qualify_by_score(connection: Any, writer: ScoreWriter, row: ScoreRow,
                           model: ScoringModel, *, traits: dict[str, Any], at: datetime,
                           cause_event_id: str | None) -> None:
    """The score-driven stage change (MQL, or back to lead), if any; a recycled contact's
    points earned since the recycle are read only when its score would qualify."""
    score = row.value_at(at, model)
    fresh = await engagement_since_recycled(connection, writer, row, model, at) \
        if row.stage == "recycled" and lifecycle.qualifies(score, traits, model) else None
    await writer.transition(row, lifecycle.on_score(row.stage, score, traits, model,
                                                    fresh=fresh), model, at, cause_event_id)


async def engagement_since_recycled(connection: Any, writer: ScoreWriter, row: ScoreRow,
                                    model: ScoringModel, at: datetime) -> float:
    """The points a recycled contact earned after its last recycle, as they count at ``at``
    (the explanation rows of this batch are written first, so they count too)."""
    await writer.flush()
    earned = await connection.fetch(
        "SELECT points, occurred_at FROM score_history WHERE workspace = $1 "
        "AND contact_id = $2 AND occurred_at > (SELECT max(changed_at) FROM stage_history "
        "WHERE workspace = $1 AND contact_id = $2 AND to_stage = 'recycled')",
        row.workspace, row.contact_id)
    return sum(decayed(r["points"], r["occurred_at"], at, model.half_life) for r in earned)


async def contact_traits(connection: Any, workspace: str, contact_id: str) -> dict[str, Any]:
    traits = await connection.fetchval(
        "SELECT traits FROM contacts WHERE workspace = $1 AND contact_id = $2",
        workspace, contact_id)
    return trait_values(load_json(traits)) if traits is not None else {}


async def lock_scores(connection: Any, keys: set[tuple[str, str]],
                      models: dict[str, ScoringModel],
                      now: datetime) -> dict[tuple[str, str], ScoreRow]:
    """Lock (creating where needed) the score rows of many contacts, in one order for every
    process; returns a row per requested (workspace, id), merges followed."""
    resolved = await current_ids(connection, keys)
    targets = sorted({(w, i) for (w, _), i in resolved.items()})
    if not targets:
        return {}
    await connection.execute(
        "INSERT INTO scores (workspace, contact_id, model_version, updated_at) "
        "SELECT w, id, v, $4 FROM unnest($1::text[], $2::uuid[], $3::int[]) AS k(w, id, v) "
        "ORDER BY w, id ON CONFLICT DO NOTHING",
        [w for w, _ in targets], [i for _, i in targets],
        [models[w].version for w, _ in targets], now)
    rows = await connection.fetch(
        "SELECT s.workspace, s.contact_id::text AS contact_id, engagement, engagement_at, "
        "grade, known, stage, model_version FROM scores s "
        "JOIN unnest($1::text[], $2::uuid[]) AS k(w, id) "
        "ON s.workspace = k.w AND s.contact_id = k.id "
        "ORDER BY s.workspace, s.contact_id FOR UPDATE OF s",
        [w for w, _ in targets], [i for _, i in targets])
    locked = {(r["workspace"], r["contact_id"]): ScoreRow(
        r["workspace"], r["contact_id"], r["engagement"], r["engagement_at"], r["grade"],
        r["known"], r["stage"], r["model_version"]) for r in rows}
    # A merge that committed while we waited for a lock: those few go the careful way.
    again = await current_ids(connection, set(locked))
    for key, now_id in again.items():
        if now_id != key[1] or key not in locked:
            locked[key] = await lock_score(connection, key[0], key[1], models[key[0]], now)
    return {key: locked[(key[0], resolved[key])] for key in keys}


class Scorer:
    """The batch handler of the ``scoring.scorer`` stream processor.

    Per batch: the score rows of every contact in it are locked at once (sorted, so processes
    never deadlock), events are applied in order in memory, and rows, explanations and stage
    history are written back with one statement each.
    """

    def __init__(self, deps: Deps, relay: OutboxRelay, timer: DowngradeTimer | None) -> None:
        self._deps = deps
        self._relay = relay
        self._timer = timer

    async def __call__(self, batch: Sequence[StreamMessage]) -> list[Rejected]:
        with self._deps.metrics.batch_seconds.labels(CONSUMER).time():
            return await self._handle(batch)

    async def _handle(self, batch: Sequence[StreamMessage]) -> list[Rejected]:
        rejected: list[Rejected] = []
        async with self._deps.pool.acquire() as connection, connection.transaction():
            fresh = {r["event_id"] for r in await connection.fetch(
                "INSERT INTO processed (consumer, event_id) "
                "SELECT $1, unnest($2::uuid[]) ON CONFLICT DO NOTHING RETURNING event_id::text",
                CONSUMER, list({m.envelope.id for m in batch}))}
            todo: list[tuple[StreamMessage, str]] = []
            for message in batch:
                envelope = message.envelope
                if envelope.id not in fresh:
                    self._deps.metrics.duplicates.labels(CONSUMER).inc()
                    continue
                fresh.discard(envelope.id)
                contact_id = envelope.data.get("contact_id") or envelope.data.get("survivor_id")
                if not isinstance(contact_id, str):
                    rejected.append(Rejected(message, f"{envelope.type} without a contact id"))
                    continue
                if envelope.type not in APPLIED:
                    continue  # another service's event on a shared topic: no row to lock
                todo.append((message, contact_id))
            now = self._deps.clock()
            models = {w: await self._deps.models.current(connection, w)
                      for w in {m.envelope.workspace for m, _ in todo}}
            rows = await lock_scores(connection, {(m.envelope.workspace, c) for m, c in todo},
                                     models, now)
            traits = await self._traits(connection, [r for r in rows.values() if r.known])
            writer = ScoreWriter(self._deps, connection)
            for message, contact_id in todo:
                envelope = message.envelope
                key = (envelope.workspace, contact_id)
                problem = await self._apply(connection, writer, envelope, rows=rows, key=key,
                                            model=models[envelope.workspace], traits=traits)
                if problem:
                    rejected.append(Rejected(message, problem))
            stored = {id(r): r for r in rows.values() if not r.gone}
            await writer.store([(r, models[r.workspace]) for r in stored.values()], now)
            await writer.flush()
            await add_to_outbox(connection, OUTBOX_STREAM, writer.outgoing)
        await self._relay.flush()
        self._deps.metrics.events.labels(CONSUMER).inc(len(batch))
        if self._timer is not None:
            self._timer.wake()
        return rejected

    async def _traits(self, connection: Any,
                      rows: Sequence[ScoreRow]) -> dict[tuple[str, str], dict[str, Any]]:
        if not rows:
            return {}
        found = await connection.fetch(
            "SELECT c.workspace, c.contact_id::text AS contact_id, c.traits FROM contacts c "
            "JOIN unnest($1::text[], $2::uuid[]) AS k(w, id) "
            "ON c.workspace = k.w AND c.contact_id = k.id",
            [r.workspace for r in rows], [r.contact_id for r in rows])
        return {(r["workspace"], r["contact_id"]): trait_values(load_json(r["traits"]))
                for r in found}

    async def _apply(self, connection: Any, writer: ScoreWriter, envelope: Envelope, *,
                     rows: dict[tuple[str, str], ScoreRow], key: tuple[str, str],
                     model: ScoringModel,
                     traits: dict[tuple[str, str], dict[str, Any]]) -> str | None:
        data = envelope.data
        row = rows[key]
        now = self._deps.clock()
        at = envelope.occurred_at
        if await self._gone(connection, envelope, row):
            return None
        previous_score = row.value_at(at, model)
        previous_rating = rating(row.grade, model.band(round(previous_score, 2)))
        row.causes = []
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
                                        event_id=envelope.id, traits=traits)
            case "contact.profile_changed.v1":
                row.known = True
                if isinstance(data.get("traits"), dict):
                    traits[(row.workspace, row.contact_id)] = data["traits"]
                await writer.transition(row, lifecycle.on_identified(row.stage), model, at,
                                        envelope.id)
                await self._qualify(connection, writer, row, model, at=at,
                                    event_id=envelope.id, traits=traits)
            case "contact.merged.v1":
                await self._merge(connection, writer, rows=rows, row=row, model=model,
                                  envelope=envelope)
            case "contact.change_requested.v1" | "crm.lead_feedback.v1":
                # Only known contacts are in journeys and the CRM; this may arrive before the
                # activity that identified the contact, so it identifies it too.
                row.known = True
                await writer.transition(row, lifecycle.on_identified(row.stage), model, at,
                                        envelope.id)
                problem = await self._change(connection, writer, row, model, envelope, traits) \
                    if envelope.type == "contact.change_requested.v1" \
                    else await self._feedback(writer, row, model, envelope)
                if problem:
                    return problem
            case "crm.contact_updated.v1":
                # Sales changed the owner or a field in the CRM: a trait like any other
                # (the more recent value wins).
                updated = await self._set_traits(connection, writer, row, envelope,
                                                 data={"traits": envelope.data.get("traits")})
                if updated is not None:
                    traits[(row.workspace, row.contact_id)] = updated
            case "email.bounced.v1":
                await self._bounced(connection, writer, row, envelope, traits)
        writer.announce(row, model, now if at > now else at, previous_score=previous_score,
                        previous_rating=previous_rating, cause_id=envelope.id)
        return None

    async def _change(self, connection: Any, writer: ScoreWriter, row: ScoreRow,  # noqa: PLR0917
                      model: ScoringModel, envelope: Envelope,
                      traits: dict[tuple[str, str], dict[str, Any]]) -> str | None:
        """A change another service asked for: traits and tags, points, stage."""
        data, at = envelope.data, envelope.occurred_at
        origin = data.get("origin") or {}
        rule = f"journey:{origin.get('journey_id', 'unknown')}"
        stage = data.get("stage")
        change = None
        if stage:
            try:
                current = "lead" if row.stage == "visitor" else row.stage
                manual = lifecycle.manual(current, str(stage.get("to")), stage.get("reason"))
            except TransitionError as error:
                return str(error)
            if manual is not None:
                change = Transition(row.stage, manual.to_stage, "journey", manual.reason)
        if data.get("traits") or data.get("tags_add") or data.get("tags_remove"):
            updated = await self._set_traits(connection, writer, row, envelope)
            if updated is not None:
                traits[(row.workspace, row.contact_id)] = updated
        points = data.get("points")
        if points and isinstance(points.get("value"), int | float):
            writer.adjust(row, model, envelope, float(points["value"]), rule)
        if change is not None:
            await writer.transition(row, change, model, at, envelope.id)
        await self._qualify(connection, writer, row, model, at=at, event_id=envelope.id,
                            traits=traits)
        return None

    @staticmethod
    async def _feedback(writer: ScoreWriter, row: ScoreRow, model: ScoringModel,
                        envelope: Envelope) -> str | None:
        """Sales' verdict from the CRM (``crm.lead_feedback.v1``)."""
        try:
            change = lifecycle.on_feedback(row.stage, str(envelope.data.get("status")),
                                           envelope.data.get("reason"))
        except TransitionError as error:
            return str(error)
        await writer.transition(row, change, model, envelope.occurred_at, envelope.id)
        return None

    async def _gone(self, connection: Any, envelope: Envelope, row: ScoreRow) -> bool:
        """Another service asks about a contact that is gone (erased, or never existed):
        nothing to change, and no empty score row left behind."""
        if envelope.type not in {"contact.change_requested.v1", "crm.lead_feedback.v1",
                                 "crm.contact_updated.v1", "email.bounced.v1"} \
                or await connection.fetchval(
                "SELECT 1 FROM contacts WHERE workspace = $1 AND contact_id = $2",
                row.workspace, row.contact_id):
            return False
        row.gone = True
        await connection.execute(
            "DELETE FROM scores WHERE workspace = $1 AND contact_id = $2 "
            "AND engagement_at IS NULL", row.workspace, row.contact_id)
        self._deps.metrics.skipped.labels("unknown_contact").inc()
        return True

    async def _bounced(self, connection: Any, writer: ScoreWriter, row: ScoreRow,
                       envelope: Envelope, traits: dict[tuple[str, str], dict[str, Any]],
                       ) -> None:
        """Nobody reads mail at this address (hard bounce) or the person called it spam
        (complaint): the contact's ``email_status`` says so, for segments, journey
        conditions and the CRM."""
        data = envelope.data
        if not (data.get("hard") or data.get("complaint")):
            return
        status = "complaint" if data.get("complaint") else "bounced"
        updated = await self._set_traits(connection, writer, row, envelope,
                                         data={"traits": {"email_status": status}})
        if updated is not None:
            traits[(row.workspace, row.contact_id)] = updated

    async def _set_traits(self, connection: Any, writer: ScoreWriter, row: ScoreRow,
                          envelope: Envelope,
                          data: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Trait and tag changes (``data``: the envelope's own unless given)."""
        data = envelope.data if data is None else data
        stored = await connection.fetchval(
            "SELECT traits FROM contacts WHERE workspace = $1 AND contact_id = $2 FOR UPDATE",
            row.workspace, row.contact_id)
        if stored is None:
            return None
        current = load_json(stored)
        tags = list((current.get("tags") or {}).get("value") or [])
        tags = [t for t in tags if t not in set(data.get("tags_remove") or [])]
        tags += [t for t in data.get("tags_add") or [] if t not in tags]
        updates = {**(data.get("traits") or {})}
        if data.get("tags_add") or data.get("tags_remove"):
            updates["tags"] = tags
        merged, changed = merge_traits(current, updates, envelope.occurred_at)
        await connection.execute(
            "UPDATE contacts SET traits = $3, updated_at = now() WHERE workspace = $1 "
            "AND contact_id = $2", row.workspace, row.contact_id, jsonb(merged))
        values = trait_values(merged)
        if changed:
            writer.outgoing.append(contact_message(
                self._deps.settings, CONTACT_EVENTS, "contact.profile_changed.v1",
                event_id=derived_id("profile", envelope.id), workspace=row.workspace,
                contact_id=row.contact_id, occurred_at=envelope.occurred_at,
                correlation_id=envelope.correlation_id,
                data={"contact_id": row.contact_id, "changed": {n: values[n] for n in changed},
                      "traits": values}))
        return values

    async def _qualify(self, connection: Any, writer: ScoreWriter, row: ScoreRow,
                       model: ScoringModel, *, at: datetime, event_id: str,
                       traits: dict[tuple[str, str], dict[str, Any]]) -> None:
        """Grade from the profile, then the score-driven lifecycle rules."""
        key = (row.workspace, row.contact_id)
        if key not in traits:
            traits[key] = await contact_traits(connection, row.workspace, row.contact_id)
        row.grade = model.grade(traits[key])
        await qualify_by_score(connection, writer, row, model, traits=traits[key], at=at,
                               cause_event_id=event_id)

    async def _merge(self, connection: Any, writer: ScoreWriter, *,
                     rows: dict[tuple[str, str], ScoreRow], row: ScoreRow,
                     model: ScoringModel, envelope: Envelope) -> None:
        """Move the merged contact's score state onto the survivor (``row``)."""
        workspace, merged = envelope.workspace, str(envelope.data.get("merged_id"))
        if merged == row.contact_id:
            return
        await writer.flush()  # explanation rows of this batch move with the contact
        in_batch = next((r for r in rows.values()
                         if r.workspace == workspace and r.contact_id == merged), None)
        if in_batch is not None:
            other: dict[str, Any] | None = {
                "engagement": in_batch.engagement, "engagement_at": in_batch.engagement_at,
                "known": in_batch.known, "stage": in_batch.stage}
            in_batch.gone = True
            for key, value in list(rows.items()):
                if value is in_batch:
                    rows[key] = row
        else:
            found = await connection.fetchrow(
                "SELECT engagement, engagement_at, known, stage FROM scores "
                "WHERE workspace = $1 AND contact_id = $2 FOR UPDATE", workspace, merged)
            other = dict(found) if found is not None else None
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
        await writer.flush()
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


class DowngradeTimer(DueTimer):
    """Moves MQLs back to lead at the exact moment decay takes them below the lower threshold.

    Not a cron job: each score row knows when it will cross (computed from the half-life), and
    the timer sleeps until the earliest such moment (or until the scorer wakes it).
    """

    def __init__(self, deps: Deps, relay: OutboxRelay, max_sleep: float = 300.0) -> None:
        super().__init__(deps.clock, batch=_DOWNGRADE_BATCH, max_sleep=max_sleep)
        self._deps = deps
        self._relay = relay

    async def next_due(self) -> datetime | None:
        async with self._deps.pool.acquire() as connection:
            due: datetime | None = await connection.fetchval(
                "SELECT min(downgrade_at) FROM scores WHERE downgrade_at IS NOT NULL")
        return due

    async def run_due(self) -> int:
        """Apply every downgrade that is due now; return how many contacts moved."""
        moved = 0
        now = self._deps.clock()
        async with self._deps.pool.acquire() as connection, connection.transaction():
            rows = await connection.fetch(
                "SELECT workspace, contact_id::text AS contact_id FROM scores "
                "WHERE downgrade_at <= $1 ORDER BY downgrade_at LIMIT $2 "
                "FOR UPDATE SKIP LOCKED", now, _DOWNGRADE_BATCH)
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
