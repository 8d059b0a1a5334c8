"""When contacts enter journeys: at once on an activity or a change of the contact (event,
form, stage, score, segment), or later from a durable trigger timer (a date trait, a silence).

A date trigger is armed when the trait changes; a silence trigger (``inactive_for``) is armed
at every activity of the contact's own and moved on by the next one, so it fires only for a
contact that stayed silent. A journey activated later arms both for the contacts the workflow
already knows. Timers fire through the same ``FOR UPDATE SKIP LOCKED`` worker as enrollments.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from leadwerk_platform.conditions import Condition, all_hold, parse_period
from leadwerk_platform.kafka.producer import OutgoingMessage
from leadwerk_workflow.domain.calendar import date_value, zone
from leadwerk_workflow.domain.engine import ContactState
from leadwerk_workflow.domain.journey import Journey
from leadwerk_workflow.engine import Connection, Engine, loads

#: Activities of the contact's own: a silence trigger counts the time since the last one.
#: Identify, alias and group calls can come from back-office systems and do not count.
OWN_ACTIVITY = frozenset({"page", "screen", "track", "email_opened", "email_clicked",
                          "form_submitted", "optin_confirmed"})


class Triggers:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def on_activity(self, connection: Connection, workspace: str, contact_id: str, *,
                          activity: tuple[str, Any, dict[str, Any]], at: datetime,
                          known: bool, outgoing: list[OutgoingMessage]) -> None:
        """``known``: an identified contact (silence triggers leave anonymous devices out)."""
        kind, name, properties = activity
        own = known and kind in OWN_ACTIVITY
        if own:
            await connection.execute(
                "INSERT INTO contact_state (workspace, contact_id, last_active_at, updated_at) "
                "VALUES ($1, $2, $3, now()) ON CONFLICT (workspace, contact_id) DO UPDATE SET "
                "last_active_at = greatest(contact_state.last_active_at, $3)",
                workspace, contact_id, at)
        for journey in await self._engine.journeys.active(connection, workspace):
            trigger = journey.trigger
            reason = None
            if trigger.event is not None and trigger.event.matches(kind, name, properties):
                reason = f"event {kind} {name or ''}".strip()
            elif trigger.form is not None and kind == "form_submitted" and \
                    properties.get("form_id") == trigger.form:
                reason = f"form {trigger.form}"
            elif trigger.inactive_for is not None and own:
                await self._arm(connection, workspace, journey, contact_id,
                                due=at + parse_period(trigger.inactive_for),
                                reason=f"no activity for {trigger.inactive_for}", later=True)
            if reason is not None:
                await self._engine.enroll(connection, workspace, journey, contact_id,
                                          reason=reason, outgoing=outgoing)

    async def on_change(self, connection: Connection, workspace: str, before: ContactState,
                        after: ContactState, outgoing: list[OutgoingMessage]) -> None:
        """The contact's projection changed from ``before`` to ``after``."""
        now = self._engine.now()
        for journey in await self._engine.journeys.active(connection, workspace):
            trigger = journey.trigger
            reason = None
            if trigger.stage is not None and after.stage == trigger.stage != before.stage:
                reason = f"stage became {trigger.stage}"
            elif trigger.score_at_least is not None and isinstance(after.score, int | float) \
                    and after.score >= trigger.score_at_least and (
                        before.score is None or before.score < trigger.score_at_least):
                reason = f"score reached {after.score:g}"
            elif trigger.segment is not None and all_hold(trigger.segment, after.values()) \
                    and not all_hold(trigger.segment, before.values()):
                reason = _segment_reason(trigger.segment, after)
            elif trigger.date is not None:
                name = trigger.date.trait
                if after.traits.get(name) != before.traits.get(name):
                    due = self._date_due(journey, after)
                    stale = parse_period(journey.settings.stale_after)
                    if due is None or due < now - stale:
                        await self._disarm(connection, workspace, journey, after.contact_id)
                    else:
                        await self._arm(connection, workspace, journey, after.contact_id,
                                        due=due, reason=f"date {name} "
                                                        f"{after.traits.get(name)}")
            if reason is not None:
                await self._engine.enroll(connection, workspace, journey, after.contact_id,
                                          reason=reason, outgoing=outgoing)

    @staticmethod
    def _date_due(journey: Journey, contact: ContactState) -> datetime | None:
        trigger = journey.trigger.date
        assert trigger is not None  # noqa: S101 - only called for date triggers
        moment = date_value(contact.traits.get(trigger.trait), trigger.at,
                            zone(contact.traits.get("timezone")))
        return None if moment is None else moment + trigger.shift

    async def arm_all(self, connection: Connection, workspace: str, journey: Journey) -> int:
        """Arm a timed trigger for every contact the workflow knows (a journey activated)."""
        trigger, now = journey.trigger, self._engine.now()
        if trigger.inactive_for is not None:
            result: str = await connection.execute(
                "INSERT INTO trigger_timers (workspace, journey_id, contact_id, due_at, reason) "
                "SELECT workspace, $2, contact_id, last_active_at + $3::interval, $4 "
                "FROM contact_state WHERE workspace = $1 AND last_active_at IS NOT NULL "
                "AND last_active_at + $3::interval >= $5 ON CONFLICT DO NOTHING",
                workspace, journey.id, parse_period(trigger.inactive_for),
                f"no activity for {trigger.inactive_for}", now)
            return int(result.rsplit(maxsplit=1)[-1])
        if trigger.date is not None:
            armed = 0
            rows = await connection.fetch(
                "SELECT contact_id::text AS contact_id, traits FROM contact_state "
                "WHERE workspace = $1 AND traits ? $2", workspace, trigger.date.trait)
            for row in rows:
                contact = ContactState(row["contact_id"], _traits(row["traits"]))
                due = self._date_due(journey, contact)
                if due is not None and due >= now:
                    await self._arm(connection, workspace, journey, row["contact_id"], due=due,
                                    reason=f"date {trigger.date.trait} "
                                           f"{contact.traits.get(trigger.date.trait)}")
                    armed += 1
            return armed
        if trigger.segment is not None:
            return await self._arm_members(connection, workspace, journey, trigger.segment)
        return 0

    async def _arm_members(self, connection: Connection, workspace: str, journey: Journey,
                           segment: dict[str, Condition]) -> int:
        """A timer due now for each contact in the segment already (re-entry rules apply when
        it fires); contacts are read in pages, not all at once."""
        armed, after, now = 0, "00000000-0000-0000-0000-000000000000", self._engine.now()
        while True:
            rows = await connection.fetch(
                "SELECT contact_id::text AS contact_id, traits, score, grade, rating, stage "
                "FROM contact_state WHERE workspace = $1 AND contact_id > $2::uuid "
                "ORDER BY contact_id LIMIT 1000", workspace, after)
            if not rows:
                return armed
            after = rows[-1]["contact_id"]
            members = [contact for row in rows for contact in [ContactState(
                row["contact_id"], _traits(row["traits"]), row["score"], row["grade"],
                row["rating"], row["stage"])] if all_hold(segment, contact.values())]
            await connection.executemany(
                "INSERT INTO trigger_timers (workspace, journey_id, contact_id, due_at, reason) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (workspace, journey_id, contact_id) "
                "DO NOTHING", [(workspace, journey.id, c.contact_id, now,
                                _segment_reason(segment, c)) for c in members])
            armed += len(members)

    async def fire_due(self, connection: Connection, now: datetime, limit: int,
                       outgoing: list[OutgoingMessage]) -> int:
        """Enroll the contacts whose trigger timers are due (each timer fires once)."""
        rows = await connection.fetch(
            "DELETE FROM trigger_timers WHERE (workspace, journey_id, contact_id) IN ("
            "SELECT workspace, journey_id, contact_id FROM trigger_timers WHERE due_at <= $1 "
            "ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING workspace, journey_id, "
            "contact_id::text AS contact_id, due_at, reason", now, limit)
        for row in rows:
            journeys = await self._engine.journeys.active(connection, row["workspace"])
            journey = next((j for j in journeys if j.id == row["journey_id"]
                            and j.trigger.armed_at_activation), None)
            if journey is None:
                continue  # paused or changed since the timer was armed
            if now - row["due_at"] > parse_period(journey.settings.stale_after):
                self._engine.count_timer("trigger_stale")
                continue
            await self._engine.enroll(connection, row["workspace"], journey, row["contact_id"],
                                      reason=row["reason"], outgoing=outgoing)
            self._engine.count_timer("trigger_fired")
        return len(rows)

    @staticmethod
    async def _arm(connection: Connection, workspace: str, journey: Journey, contact_id: str,
                   *, due: datetime, reason: str, later: bool = False) -> None:
        """Set the contact's timer for ``journey`` (``later``: never move it earlier)."""
        await connection.execute(
            "INSERT INTO trigger_timers (workspace, journey_id, contact_id, due_at, reason) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (workspace, journey_id, contact_id) "
            "DO UPDATE SET reason = EXCLUDED.reason, due_at = CASE WHEN $6 THEN "
            "greatest(trigger_timers.due_at, EXCLUDED.due_at) ELSE EXCLUDED.due_at END",
            workspace, journey.id, contact_id, due, reason, later)

    @staticmethod
    async def _disarm(connection: Connection, workspace: str, journey: Journey,
                      contact_id: str) -> None:
        await connection.execute(
            "DELETE FROM trigger_timers WHERE workspace = $1 AND journey_id = $2 "
            "AND contact_id = $3", workspace, journey.id, contact_id)


def _segment_reason(segment: dict[str, Condition], contact: ContactState) -> str:
    values = contact.values()
    return "segment: " + ", ".join(f"{k}={values.get(k)!r}" for k in segment)


def _traits(value: Any) -> dict[str, Any]:
    traits = loads(value)
    return traits if isinstance(traits, dict) else {}
