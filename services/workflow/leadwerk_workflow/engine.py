"""The workflow engine's I/O: journeys, enrollments, timers and commands in Postgres.

Everything a consumed message or a due timer causes happens in one transaction together with
the "processed" record (or the timer's row lock) and the outbox rows of the commands; the
outbox is flushed afterwards. A command's envelope id is derived from enrollment, step and
visit: the idempotency key the mailer and the crm-bridge deduplicate on.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import yaml

from leadwerk_platform.conditions import parse_period
from leadwerk_platform.envelope import Envelope, encode, format_timestamp
from leadwerk_platform.kafka.producer import OutgoingMessage, Publisher
from leadwerk_workflow.domain.engine import (
    Command,
    ContactState,
    EmailCap,
    Load,
    Outcome,
    Position,
    advance,
    fair_choice,
    rating_value,
    territory_owner,
)
from leadwerk_workflow.domain.journey import (
    AdjustScoreStep,
    AssignOwnerStep,
    ChangeStageStep,
    HandoffStep,
    Journey,
    SendEmailStep,
    SetTraitStep,
    TagStep,
    parse,
)
from leadwerk_workflow.domain.teams import Teams
from leadwerk_workflow.metrics import WorkflowMetrics
from leadwerk_workflow.settings import WorkflowSettings

logger = logging.getLogger(__name__)

CONSUMER = "engine"
ACTIVE_TTL = 1.0
OUTBOX_STREAM = "workflow"
_NAMESPACE = uuid.UUID("8e1f2a3b-4c5d-5e6f-9a0b-1c2d3e4f5a6b")
Connection = Any


def jsonb(value: Any) -> str:
    return orjson.dumps(value).decode()


def loads(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


@dataclass
class Deps:
    settings: WorkflowSettings
    pool: Any
    publisher: Publisher
    metrics: WorkflowMetrics
    clock: Callable[[], datetime]
    teams: Teams = field(default_factory=Teams)


_MOVE = ("UPDATE enrollments SET step = $2, due_at = $3, waiting_for = $4, state = $5, "
         "visits = $6, branches = $7, updated_at = $8::timestamptz, ended_at = CASE "
         "WHEN $5::text = 'active' THEN NULL ELSE $8::timestamptz END, end_reason = CASE "
         "WHEN $5::text = 'completed' THEN 'completed' ELSE end_reason END "
         "WHERE enrollment_id = $1")
_HISTORY = ("INSERT INTO journey_history (enrollment_id, workspace, contact_id, journey_id, "
            "version, step_id, action, reason, at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)")


@dataclass
class Writes:
    """Enrollment moves and history rows, written with one statement each: the timer worker
    moves a whole batch of enrollments in one transaction and flushes once."""

    moves: list[tuple[Any, ...]] = field(default_factory=list)
    history: list[tuple[Any, ...]] = field(default_factory=list)

    async def flush(self, connection: Connection) -> None:
        if self.moves:
            await connection.executemany(_MOVE, self.moves)
            self.moves = []
        if self.history:
            await connection.executemany(_HISTORY, self.history)
            self.history = []


@dataclass(frozen=True)
class Ref:
    """One enrollment: which contact, in which journey version."""

    enrollment_id: str
    workspace: str
    journey: Journey
    contact_id: str


def shipped_journeys(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    """``config/journeys/*.yaml``: (file name, document) in name order."""
    return [(path.name, yaml.safe_load(path.read_text()) or {})
            for path in sorted(folder.glob("*.yaml"))]


def shipped_teams(config_dir: Path) -> Teams:
    """``config/teams.yaml`` (optional): sales teams, partners and their managers."""
    path = config_dir / "teams.yaml"
    return Teams.from_document(yaml.safe_load(path.read_text()) if path.exists() else None)


class JourneyStore:
    """Versions of journeys; the version in force per journey; shipped journeys seeded."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str, int], Journey] = {}
        self._active: dict[str, tuple[float, list[Journey]]] = {}

    async def version(self, connection: Connection, workspace: str, journey_id: str,
                      version: int) -> Journey:
        key = (workspace, journey_id, version)
        if key not in self._cache:
            document = await connection.fetchval(
                "SELECT document FROM journeys WHERE workspace = $1 AND journey_id = $2 "
                "AND version = $3", workspace, journey_id, version)
            self._cache[key] = Journey.model_validate(loads(document))
        return self._cache[key]

    async def active(self, connection: Connection, workspace: str) -> list[Journey]:
        """The journeys taking new entries, read at most once per ``ACTIVE_TTL`` seconds (an
        activation or pause reaches every process within that time)."""
        now = time.monotonic()
        cached = self._active.get(workspace)
        if cached is not None and now - cached[0] < ACTIVE_TTL:
            return cached[1]
        rows = await connection.fetch(
            "SELECT journey_id, active_version FROM journey_status WHERE workspace = $1 "
            "AND status = 'active' AND active_version IS NOT NULL", workspace)
        journeys = [await self.version(connection, workspace, r["journey_id"],
                                       r["active_version"]) for r in rows]
        self._active[workspace] = (now, journeys)
        return journeys

    def forget(self) -> None:
        """Drop the cached list of active journeys (after a change through this process)."""
        self._active.clear()

    async def save(self, connection: Connection, workspace: str, journey: Journey, *,
                   actor: str, activate: bool | None = None) -> Journey:
        """Store a new version. An active journey moves its new entrants to it; contacts
        already inside finish on the version they entered."""
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                                     f"journey:{workspace}:{journey.id}")
            version = 1 + await connection.fetchval(
                "SELECT coalesce(max(version), 0) FROM journeys WHERE workspace = $1 "
                "AND journey_id = $2", workspace, journey.id)
            stored = journey.model_copy(update={"version": version})
            await connection.execute(
                "INSERT INTO journeys (workspace, journey_id, version, document, actor) "
                "VALUES ($1, $2, $3, $4, $5)", workspace, journey.id, version,
                stored.model_dump_json(by_alias=True, exclude_none=True), actor)
            status = await connection.fetchval(
                "SELECT status FROM journey_status WHERE workspace = $1 AND journey_id = $2",
                workspace, journey.id)
            new_status = ("active" if activate else "draft") if activate is not None \
                else (status or "draft")
            await connection.execute(
                "INSERT INTO journey_status (workspace, journey_id, status, active_version) "
                "VALUES ($1, $2, $3, CASE WHEN $3 = 'active' THEN $4::int END) "
                "ON CONFLICT (workspace, journey_id) DO UPDATE SET status = EXCLUDED.status, "
                "active_version = CASE WHEN EXCLUDED.status = 'active' THEN $4::int "
                "ELSE journey_status.active_version END, updated_at = now()",
                workspace, journey.id, new_status, version)
        self.forget()
        return stored

    async def set_status(self, connection: Connection, workspace: str, journey_id: str,
                         status: str) -> bool:
        self.forget()
        result: str = await connection.execute(
            "UPDATE journey_status SET status = $3, updated_at = now(), active_version = "
            "CASE WHEN $3 = 'active' THEN (SELECT max(version) FROM journeys WHERE "
            "workspace = $1 AND journey_id = $2) ELSE active_version END "
            "WHERE workspace = $1 AND journey_id = $2", workspace, journey_id, status)
        return result.endswith(" 1")

    async def seed(self, connection: Connection, workspace: str,
                   shipped: list[tuple[str, dict[str, Any]]], *,
                   teams: set[str] | None = None) -> list[str]:
        """Shipped journeys that the database does not know yet are stored as version 1,
        active unless the file says ``status: draft``."""
        seeded = []
        for name, original in shipped:
            document = dict(original)
            status = document.pop("status", "active")
            journey, problems = parse(document, teams=teams)
            if journey is None:
                raise ValueError(f"{name}: " + "; ".join(f"{p.location}: {p.message}"
                                                         for p in problems))
            exists = await connection.fetchval(
                "SELECT 1 FROM journeys WHERE workspace = $1 AND journey_id = $2",
                workspace, journey.id)
            if not exists:
                await self.save(connection, workspace, journey, actor=f"config:{name}",
                                activate=status == "active")
                seeded.append(journey.id)
        return seeded


class Engine:
    """Enrolls contacts, moves enrollments along, and turns steps into commands."""

    def __init__(self, deps: Deps, journeys: JourneyStore) -> None:
        self._deps = deps
        self.journeys = journeys

    def now(self) -> datetime:
        return self._deps.clock()

    def count_timer(self, outcome: str) -> None:
        self._deps.metrics.timers.labels(outcome).inc()

    async def contact(self, connection: Connection, workspace: str,
                      contact_id: str) -> ContactState:
        return (await self.contacts(connection, {(workspace, contact_id)}))[
            (workspace, contact_id)]

    async def enroll(self, connection: Connection, workspace: str, journey: Journey,
                     contact_id: str, *, reason: str,
                     outgoing: list[OutgoingMessage]) -> str | None:
        """Enter ``contact_id`` into ``journey`` unless its re-entry rule says no."""
        now = self._deps.clock()
        previous = await connection.fetchrow(
            "SELECT bool_or(state = 'active') AS active, max(entered_at) AS last "
            "FROM enrollments WHERE workspace = $1 AND journey_id = $2 AND contact_id = $3",
            workspace, journey.id, contact_id)
        if previous["active"]:
            return None
        if previous["last"] is not None:
            cooldown = journey.settings.cooldown
            if journey.settings.reentry == "never" or (
                    cooldown is not None and previous["last"] > now - cooldown):
                return None
        enrollment_id = str(uuid.uuid4())
        await connection.execute(
            "INSERT INTO enrollments (enrollment_id, workspace, journey_id, version, contact_id, "
            "state, entered_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'active', $6, $6)",
            enrollment_id, workspace, journey.id, journey.version, contact_id, now)
        ref = Ref(enrollment_id, workspace, journey, contact_id)
        await self._history(connection, ref, [(None, "entered", reason)], now)
        self._deps.metrics.enrolled.labels(journey.id).inc()
        await self.run(connection, ref, Position(), via=None, outgoing=outgoing)
        return enrollment_id

    async def run(self, connection: Connection, ref: Ref, position: Position, *,
                  via: str | None, outgoing: list[OutgoingMessage],
                  suppress: bool = False, note: str | None = None,
                  writes: Writes | None = None, contact: ContactState | None = None) -> Outcome:
        """Move the enrollment on (``via``: the edge out of its resting step, ``None`` from
        the start); ``note`` tells why it resumed when the edge alone does not. With
        ``writes`` the enrollment's row and history are collected there for the caller to
        flush (``contact``: the contact's state, already loaded)."""
        now = self._deps.clock()
        batch = writes if writes is not None else Writes()
        if contact is None:
            contact = await self.contact(connection, ref.workspace, ref.contact_id)
        if self._deps.settings.email_cap:
            await batch.flush(connection)  # the cap counts this batch's sends too
        outcome = advance(ref.journey, position, contact, now, enrollment_id=ref.enrollment_id,
                          via=via, suppress=suppress,
                          cap=await self._cap(connection, ref, now))
        moved = outcome.position
        batch.moves.append((
            ref.enrollment_id, moved.step, moved.due_at if moved.state == "active" else None,
            moved.waiting_for, moved.state, jsonb(moved.visits), jsonb(moved.branches), now))
        resting = ref.journey.step(position.step) if position.step else None
        resumed = {"on_event": [(position.step, "event", f"{position.waiting_for} arrived")],
                   "on_timeout": [(position.step, "timeout", "no matching event in time")],
                   "on_breach": [(position.step, "sla_breached",
                                  "sales did not respond within "
                                  f"{getattr(getattr(resting, 'sla', None), 'within', '?')}")]}
        if isinstance(resting, HandoffStep) and via == "next":
            resumed["next"] = [(position.step, "sales_responded", note or "")]
        owners: dict[str, str] = {}  # assign step → "owner (why)"
        for command in outcome.commands:
            if command.kind == "assign":
                owner, why = await self._assign(connection, ref, command, contact, now)
                owners[command.step_id] = f"{owner} ({why})"
                outgoing.append(self._command(
                    Command("contact", command.step_id, command.visit,
                            SetTraitStep(type="set_trait", traits={"owner": owner},
                                         next=command.step.next)), ref, contact, now))
            else:
                outgoing.append(self._command(command, ref, contact, now))
            self._deps.metrics.commands.labels(command.kind).inc()
        entries = list(resumed.get(via or "", []))
        for e in outcome.history:
            entries.append((e.step_id, e.action, e.reason))
            if e.action == "assign" and e.step_id in owners:
                entries.append((e.step_id, "owner", owners[e.step_id]))
            self._deps.metrics.steps.labels(e.action).inc()
        batch.history += self._history_rows(ref, entries, now)
        if writes is None:
            await batch.flush(connection)
        return outcome

    async def _assign(self, connection: Connection, ref: Ref, command: Command,
                      contact: ContactState, now: datetime) -> tuple[str, str]:
        """Choose the owner (territory, else strategy), remember it for the steps that follow
        in this run and record it for fair distribution; the owner and why."""
        step: AssignOwnerStep = command.step
        pool = f"team:{step.team}" if step.team else f"{ref.journey.id}:{command.step_id}"
        reps = self._deps.teams.members(step.team) if step.team else list(step.reps)
        current = contact.traits.get("owner")
        if step.exclude_current and len(reps) > 1:
            reps = [rep for rep in reps if rep != current]
        owner = territory_owner(step, contact)
        reason = "territory"
        if owner is None and step.strategy != "fixed" and not reps:
            owner, reason = current, f"team {step.team} has no members: owner kept"
        elif owner is None and step.strategy == "round_robin":
            turn = await connection.fetchval(
                "INSERT INTO routing_state (workspace, pool, counter) VALUES ($1, $2, 1) "
                "ON CONFLICT (workspace, pool) DO UPDATE SET counter = routing_state.counter + 1 "
                "RETURNING counter", ref.workspace, pool)
            owner, reason = reps[(turn - 1) % len(reps)], f"round robin, turn {turn}"
        elif owner is None and step.strategy == "fair":
            # One assignment per pool at a time: concurrent ones would see the same counts.
            await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                                     f"assign:{ref.workspace}:{pool}")
            rows = await connection.fetch(
                "SELECT owner, count(*) AS n, sum(value) AS total FROM assignments "
                "WHERE workspace = $1 AND pool = $2 AND at > $3 GROUP BY owner",
                ref.workspace, pool, now - parse_period(step.period))
            loads_ = {r["owner"]: Load(r["n"], r["total"]) for r in rows}
            owner, reason = fair_choice(reps, loads_, rating_value(contact.rating))
        elif owner is None:
            owner, reason = step.owner, "fixed"
        await connection.execute(
            "INSERT INTO assignments (workspace, pool, owner, contact_id, rating, value, at) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7)", ref.workspace, pool, owner, ref.contact_id,
            contact.rating, rating_value(contact.rating), now)
        contact.traits["owner"] = owner
        await connection.execute(
            "UPDATE contact_state SET traits = traits || jsonb_build_object('owner', $3::text) "
            "WHERE workspace = $1 AND contact_id = $2", ref.workspace, ref.contact_id, owner)
        return str(owner), reason

    async def _cap(self, connection: Connection, ref: Ref, now: datetime) -> EmailCap | None:
        settings = self._deps.settings
        if not settings.email_cap:
            return None
        limit, window = settings.email_cap_rule()
        sent = await connection.fetch(
            "SELECT at FROM journey_history WHERE workspace = $1 AND contact_id = $2 "
            "AND action = 'email' AND at > $3", ref.workspace, ref.contact_id, now - window)
        return EmailCap(limit, window, [r["at"] for r in sent], settings.email_cap_policy)

    async def exit(self, connection: Connection, ref: Ref, step: str | None,
                   reason: str) -> None:
        now = self._deps.clock()
        await connection.execute(
            "UPDATE enrollments SET state = 'exited', due_at = NULL, ended_at = $2, "
            "end_reason = $3, updated_at = $2 WHERE enrollment_id = $1",
            ref.enrollment_id, now, reason)
        await self._history(connection, ref, [(step, "exited", reason)], now)

    async def _history(self, connection: Connection, ref: Ref,
                       entries: list[tuple[str | None, str, str]], at: datetime) -> None:
        await connection.executemany(_HISTORY, self._history_rows(ref, entries, at))

    @staticmethod
    def _history_rows(ref: Ref, entries: list[tuple[str | None, str, str]],
                      at: datetime) -> list[tuple[Any, ...]]:
        return [(ref.enrollment_id, ref.workspace, ref.contact_id, ref.journey.id,
                 ref.journey.version, step, action, reason, at)
                for step, action, reason in entries]

    async def contacts(self, connection: Connection,
                       keys: set[tuple[str, str]]) -> dict[tuple[str, str], ContactState]:
        """The states of several contacts (workspace, contact id) in one query."""
        rows = await connection.fetch(
            "SELECT workspace, contact_id::text AS contact_id, traits, score, grade, rating, "
            "stage FROM contact_state WHERE (workspace, contact_id) IN (SELECT * FROM "
            "unnest($1::text[], $2::uuid[]))", [w for w, _ in keys], [c for _, c in keys])
        found = {(r["workspace"], r["contact_id"]): ContactState(
            r["contact_id"], loads(r["traits"]), r["score"], r["grade"], r["rating"],
            r["stage"]) for r in rows}
        return {key: found.get((key[0], str(uuid.UUID(key[1])))) or ContactState(key[1])
                for key in keys}

    @staticmethod
    def _snapshot(contact: ContactState) -> dict[str, Any]:
        return {"traits": contact.traits, "score": contact.score, "grade": contact.grade,
                "rating": contact.rating, "stage": contact.stage}

    def _command(self, command: Command, ref: Ref, contact: ContactState,
                 now: datetime) -> OutgoingMessage:
        settings = self._deps.settings
        enrollment_id, workspace, journey = ref.enrollment_id, ref.workspace, ref.journey
        event_id = str(uuid.uuid5(_NAMESPACE, f"{enrollment_id}\x1f{command.step_id}\x1f"
                                              f"{command.visit}"))
        origin = {"journey_id": journey.id, "journey_version": journey.version,
                  "enrollment_id": enrollment_id, "step_id": command.step_id}
        step = command.step
        if command.kind == "contact":
            event_type, topic = "contact.change_requested.v1", "contact-commands"
            data: dict[str, Any] = {"contact_id": contact.contact_id, "origin": origin}
            match step:
                case ChangeStageStep():
                    data["stage"] = {"to": step.stage, "reason": step.reason}
                case AdjustScoreStep():
                    data["points"] = {"value": step.points, "reason": step.reason}
                case SetTraitStep():
                    data["traits"] = step.traits
                case TagStep():
                    data["tags_add"], data["tags_remove"] = step.add, step.remove
        elif command.kind == "webhook":
            event_type, topic = "crm.webhook_requested.v1", "crm-commands"
            data = {"contact_id": contact.contact_id, "url": step.url, "event": step.event,
                    "origin": origin, "snapshot": self._snapshot(contact)}
        elif command.kind == "handoff":
            event_type, topic = "crm.handoff_requested.v1", "crm-commands"
            data = {
                "contact_id": contact.contact_id, "reason": step.reason,
                "owner": contact.traits.get("owner"), "origin": origin,
                "snapshot": self._snapshot(contact)}
        else:
            event_type, topic = "email.send_requested.v1", "email-commands"
            stale = parse_period(journey.settings.stale_after)
            if command.kind == "notify":
                owner = contact.traits.get("owner")
                to = owner if step.to == "owner" else self._deps.teams.manager_of(owner) \
                    if step.to == "manager" else step.to
                sender, kind = {"kind": "default"}, "internal"
            else:
                to = contact.traits.get("email")
                sender = step.sender.model_dump(exclude_none=True)
                kind = "transactional" if isinstance(step, SendEmailStep) and \
                    step.transactional else "marketing"
            data = {"contact_id": contact.contact_id, "template": step.template,
                    "class": kind, "to": to, "sender": sender,
                    "personalization": contact.values(), "origin": origin,
                    "not_after": format_timestamp(now + stale)}
        envelope = Envelope(id=event_id, type=event_type, workspace=workspace,
                            occurred_at=now, received_at=now, producer="workflow", data=data,
                            correlation_id=enrollment_id)
        return OutgoingMessage(settings.topic(topic),
                               f"{workspace}:{contact.contact_id}".encode(), encode(envelope))


def position_of(row: Any) -> Position:
    return Position(step=row["step"], due_at=row["due_at"], waiting_for=row["waiting_for"],
                    visits=loads(row["visits"]), branches=loads(row["branches"]))
