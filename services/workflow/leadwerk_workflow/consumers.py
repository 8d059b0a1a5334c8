"""What the workflow consumes (``contact-events``, ``contact-changes``; group
``workflow.engine``) and what each message does. Plain aiokafka through the shared
:class:`~leadwerk_platform.kafka.consumer.ConsumerRuntime` (ADR 0010): per message, one
transaction with the "processed" record, the enrollment changes and the outbox."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from leadwerk_platform.conditions import all_hold
from leadwerk_platform.envelope import Envelope, InvalidMessageError
from leadwerk_platform.kafka.consumer import ConsumedMessage
from leadwerk_platform.kafka.producer import OutgoingMessage
from leadwerk_platform.outbox import OutboxRelay, add_to_outbox
from leadwerk_workflow.domain.engine import SALES_RESPONSE, SALES_RESPONSES, ContactState
from leadwerk_workflow.engine import (
    CONSUMER,
    OUTBOX_STREAM,
    Deps,
    Engine,
    Ref,
    jsonb,
    loads,
    position_of,
)
from leadwerk_workflow.timers import TimerWorker
from leadwerk_workflow.triggers import Triggers

TOPICS = {"contact-events": "contact-events-dlq", "contact-changes": "contact-changes-dlq",
          "email-events": "email-events-dlq"}
#: What the mailer did with a journey's email, as the step's history shows it.
EMAIL_OUTCOMES = {"email.sent.v1": "email_sent", "email.bounced.v1": "email_bounced",
                  "email.failed.v1": "email_failed", "email.suppressed.v1": "email_suppressed",
                  "email.deferred.v1": "email_deferred"}
_ENROLLMENT_COLUMNS = (
    "enrollment_id::text AS enrollment_id, workspace, journey_id, version, "
    "contact_id::text AS contact_id, step, due_at, waiting_for, visits, branches")


class ContactEventHandler:
    def __init__(self, deps: Deps, engine: Engine, relay: OutboxRelay, triggers: Triggers,
                 timers: TimerWorker | None) -> None:
        self._deps = deps
        self._engine = engine
        self._relay = relay
        self._triggers = triggers
        self._timers = timers

    async def __call__(self, message: ConsumedMessage) -> None:
        await self.batch([message])

    async def batch(self, messages: Sequence[ConsumedMessage]) -> None:
        """Several messages in one transaction (the runtime's fast path; on any error it
        rolls back and comes again one message at a time)."""
        outgoing: list[OutgoingMessage] = []
        async with self._deps.pool.acquire() as connection, connection.transaction():
            for message in messages:
                await self._one(connection, message.envelope, outgoing)
            await add_to_outbox(connection, OUTBOX_STREAM, outgoing)
        for message in messages:
            self._deps.metrics.events.labels(message.envelope.type).inc()
        if outgoing:
            self._relay.request()  # committed with the outbox rows: publishing can follow
        if self._timers is not None:
            self._timers.wake()

    async def _one(self, connection: Any, envelope: Envelope,
                   outgoing: list[OutgoingMessage]) -> None:
        data = envelope.data
        contact_id = data.get("contact_id") or data.get("survivor_id")
        if not isinstance(contact_id, str):
            raise InvalidMessageError(f"{envelope.type} without a contact id")
        fresh = await connection.fetchval(
            "INSERT INTO processed (consumer, event_id) VALUES ($1, $2) "
            "ON CONFLICT DO NOTHING RETURNING true", CONSUMER, envelope.id)
        if fresh:  # else redelivered: its effects (and outbox rows) are already there
            await self._apply(connection, envelope, contact_id, outgoing)

    async def _apply(self, connection: Any, envelope: Envelope, contact_id: str,
                     outgoing: list[OutgoingMessage]) -> bool:
        """What the message does; ``False`` for a type the workflow ignores."""
        workspace, data = envelope.workspace, envelope.data
        change: dict[str, Any] | None = None
        match envelope.type:
            case "contact.activity.v1":
                await self._activity(connection, workspace, contact_id, data, outgoing)
                await self._triggers.on_activity(
                    connection, workspace, contact_id, outgoing=outgoing,
                    activity=(str(data.get("kind")), data.get("name"),
                              data.get("properties") or {}),
                    at=envelope.occurred_at, known=bool(data.get("known")))
            case "contact.profile_changed.v1":
                change = {"traits": data.get("traits") or {}}
            case "contact.score_changed.v1":
                change = {"score": data.get("score"), "grade": data.get("grade"),
                          "rating": data.get("rating")}
            case "contact.stage_changed.v1":
                change = {"stage": data.get("to_stage")}
            case "contact.merged.v1":
                await self._merge(connection, workspace, str(data["survivor_id"]),
                                  str(data["merged_id"]))
            case "contact.erased.v1":
                ids = [contact_id, *[str(i) for i in data.get("merged_ids") or []]]
                for table in ("enrollments", "journey_history", "contact_state",
                              "trigger_timers", "assignments"):
                    await connection.execute(
                        f"DELETE FROM {table} WHERE workspace = $1 "  # noqa: S608
                        "AND contact_id = ANY($2::uuid[])", workspace, ids)
            case kind if kind in EMAIL_OUTCOMES:
                await self._email_outcome(connection, envelope, contact_id)
            case _:
                return False
        if change is not None:
            before, after = await self._project(connection, workspace, contact_id,
                                                **change)
            await self._goals(connection, workspace, contact_id)
            if after.stage != before.stage and after.stage in SALES_RESPONSES:
                await self._sales_responded(connection, workspace, contact_id,
                                            str(after.stage), outgoing)
            await self._triggers.on_change(connection, workspace, before, after, outgoing)
        return True

    async def _activity(self, connection: Any, workspace: str, contact_id: str,
                        data: dict[str, Any], outgoing: list[OutgoingMessage]) -> None:
        kind, name = str(data.get("kind")), data.get("name")
        properties = data.get("properties") or {}
        rows = await connection.fetch(
            f"SELECT {_ENROLLMENT_COLUMNS} FROM enrollments WHERE workspace = $1 "  # noqa: S608
            "AND contact_id = $2 AND state = 'active' AND (waiting_for = $3 OR $3 = "
            "'unsubscribed') FOR UPDATE", workspace, contact_id, kind)
        for row in rows:
            journey = await self._engine.journeys.version(connection, workspace,
                                                          row["journey_id"], row["version"])
            ref = Ref(row["enrollment_id"], workspace, journey, contact_id)
            if kind == "unsubscribed" and journey.settings.exit_on_unsubscribe:
                await self._engine.exit(connection, ref, row["step"], "unsubscribed")
                continue
            step = journey.step(row["step"]) if row["step"] else None
            event = getattr(step, "event", None)
            if row["waiting_for"] == kind and event is not None and \
                    event.matches(kind, name, properties):
                await self._engine.run(connection, ref, position_of(row), via="on_event",
                                       outgoing=outgoing)

    async def _email_outcome(self, connection: Any, envelope: Envelope,
                             contact_id: str) -> None:
        """The mailer's verdict on a journey's email goes into that step's history ("why did
        this contact not get it": no consent, unsubscribed …); a hard bounce or a complaint
        ends the contact's journeys that exit on unsubscribe, since nobody reads the mail."""
        data, workspace = envelope.data, envelope.workspace
        origin = data.get("origin") or {}
        action = EMAIL_OUTCOMES[envelope.type]
        reason = data.get("reason") or data.get("smtp_response") or data.get("template")
        enrollment = origin.get("enrollment_id")
        if isinstance(enrollment, str):
            await connection.execute(
                "INSERT INTO journey_history (enrollment_id, workspace, contact_id, journey_id, "
                "version, step_id, action, reason, at) SELECT enrollment_id, workspace, "
                "contact_id, journey_id, $2, $3, $4, $5, $6 FROM enrollments "
                "WHERE enrollment_id::text = $1",
                enrollment, int(origin.get("journey_version") or 0),
                origin.get("step_id"), action, str(reason or ""), envelope.occurred_at)
        if envelope.type == "email.bounced.v1" and (data.get("hard") or data.get("complaint")):
            rows = await connection.fetch(
                f"SELECT {_ENROLLMENT_COLUMNS} FROM enrollments "  # noqa: S608
                "WHERE workspace = $1 AND contact_id = $2 AND state = 'active' FOR UPDATE",
                workspace, contact_id)
            for row in rows:
                journey = await self._engine.journeys.version(connection, workspace,
                                                              row["journey_id"], row["version"])
                if journey.settings.exit_on_unsubscribe:
                    await self._engine.exit(
                        connection, Ref(row["enrollment_id"], workspace, journey, contact_id),
                        row["step"], "complaint" if data.get("complaint") else
                        "email bounced")

    async def _sales_responded(self, connection: Any, workspace: str, contact_id: str,
                               stage: str, outgoing: list[OutgoingMessage]) -> None:
        """Sales set a stage: hand-offs waiting on their SLA go on."""
        rows = await connection.fetch(
            f"SELECT {_ENROLLMENT_COLUMNS} FROM enrollments WHERE workspace = $1 "  # noqa: S608
            "AND contact_id = $2 AND state = 'active' AND waiting_for = $3 FOR UPDATE",
            workspace, contact_id, SALES_RESPONSE)
        for row in rows:
            journey = await self._engine.journeys.version(connection, workspace,
                                                          row["journey_id"], row["version"])
            await self._engine.run(connection, Ref(row["enrollment_id"], workspace, journey,
                                                   contact_id),
                                   position_of(row), via="next", outgoing=outgoing,
                                   note=f"stage {stage}")

    async def _goals(self, connection: Any, workspace: str, contact_id: str) -> None:
        """Leave every journey whose goal the contact now meets, wherever it is."""
        rows = await connection.fetch(
            f"SELECT {_ENROLLMENT_COLUMNS} FROM enrollments WHERE workspace = $1 "  # noqa: S608
            "AND contact_id = $2 AND state = 'active' FOR UPDATE", workspace, contact_id)
        if not rows:
            return
        contact = await self._engine.contact(connection, workspace, contact_id)
        for row in rows:
            journey = await self._engine.journeys.version(connection, workspace,
                                                          row["journey_id"], row["version"])
            if journey.goal and all_hold(journey.goal, contact.values()):
                await self._engine.exit(
                    connection, Ref(row["enrollment_id"], workspace, journey, contact_id),
                    row["step"], "goal reached")

    async def _project(self, connection: Any, workspace: str, contact_id: str,
                       **values: Any) -> tuple[ContactState, ContactState]:
        """Update the workflow's picture of the contact; return it before and after."""
        previous = await connection.fetchrow(
            "SELECT traits, score, grade, rating, stage FROM contact_state "
            "WHERE workspace = $1 AND contact_id = $2 FOR UPDATE", workspace, contact_id)
        current = dict(previous) if previous is not None else {
            "traits": "{}", "score": None, "grade": None, "rating": None, "stage": None}
        merged = {**current, **values}
        if isinstance(merged["traits"], dict):
            merged["traits"] = jsonb(merged["traits"])
        await connection.execute(
            "INSERT INTO contact_state (workspace, contact_id, traits, score, grade, rating, "
            "stage, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, now()) "
            "ON CONFLICT (workspace, contact_id) DO UPDATE SET traits = EXCLUDED.traits, "
            "score = EXCLUDED.score, grade = EXCLUDED.grade, rating = EXCLUDED.rating, "
            "stage = EXCLUDED.stage, updated_at = now()",
            workspace, contact_id, merged["traits"], merged["score"], merged["grade"],
            merged["rating"], merged["stage"])
        return _state(contact_id, current), _state(contact_id, merged)

    async def _merge(self, connection: Any, workspace: str, survivor: str, merged: str) -> None:
        """Enrollments, trigger timers and assignments follow the surviving contact; where
        both are in the same journey, the survivor's enrollment (and timer) stays and the
        other one exits."""
        await connection.execute(
            "UPDATE enrollments SET state = 'exited', due_at = NULL, ended_at = now(), "
            "end_reason = 'merged into ' || $3 WHERE workspace = $1 AND contact_id = $2 "
            "AND state = 'active' AND journey_id IN (SELECT journey_id FROM enrollments "
            "WHERE workspace = $1 AND contact_id = $3 AND state = 'active')",
            workspace, merged, survivor)
        await connection.execute(
            "DELETE FROM trigger_timers WHERE workspace = $1 AND contact_id = $2 AND journey_id "
            "IN (SELECT journey_id FROM trigger_timers WHERE workspace = $1 AND contact_id = $3)",
            workspace, merged, survivor)
        for table in ("enrollments", "journey_history", "trigger_timers", "assignments"):
            await connection.execute(
                f"UPDATE {table} SET contact_id = $3 "  # noqa: S608 - fixed names
                "WHERE workspace = $1 AND contact_id = $2", workspace, merged, survivor)
        await connection.execute(
            "DELETE FROM contact_state WHERE workspace = $1 AND contact_id = $2",
            workspace, merged)


def _state(contact_id: str, row: dict[str, Any]) -> ContactState:
    traits = loads(row["traits"])
    return ContactState(contact_id, traits if isinstance(traits, dict) else {}, row["score"],
                        row["grade"], row["rating"], row["stage"])
