"""The workflow's durable timers: enrollments resting at a step, and trigger timers."""

from __future__ import annotations

from datetime import datetime

from leadwerk_platform.conditions import parse_period
from leadwerk_platform.kafka.producer import OutgoingMessage
from leadwerk_platform.outbox import OutboxRelay, add_to_outbox
from leadwerk_platform.timers import DueTimer
from leadwerk_workflow.domain.journey import (
    HandoffStep,
    Journey,
    SendEmailStep,
    WaitForStep,
    WaitStep,
    WaitWindowStep,
)
from leadwerk_workflow.engine import OUTBOX_STREAM, Deps, Engine, Ref, Writes, position_of
from leadwerk_workflow.triggers import Triggers


def timeout_edge(journey: Journey, step_id: str) -> str:
    """The edge out of a resting step when its timer falls due."""
    step = journey.step(step_id)
    if isinstance(step, WaitStep | WaitWindowStep):
        return "next"
    if isinstance(step, SendEmailStep):
        return "self"  # a send the frequency cap or quiet hours delayed
    if isinstance(step, WaitForStep):
        return "on_timeout"
    if isinstance(step, HandoffStep):
        return "on_breach"
    msg = f"step {step_id} of {journey.id} does not rest"
    raise ValueError(msg)


class TimerWorker(DueTimer):
    """Fires due timers. Several processes can run it: ``FOR UPDATE SKIP LOCKED`` hands each
    due enrollment (and trigger timer) to one of them, and the move happens in the transaction
    holding the lock, so each timer fires once. Sleeps until the earliest due time (or until
    woken)."""

    def __init__(self, deps: Deps, engine: Engine, relay: OutboxRelay, triggers: Triggers,
                 max_sleep: float = 60.0) -> None:
        super().__init__(deps.clock, batch=deps.settings.timer_batch, max_sleep=max_sleep)
        self._deps = deps
        self._engine = engine
        self._relay = relay
        self._triggers = triggers

    async def next_due(self) -> datetime | None:
        async with self._deps.pool.acquire() as connection:
            due: datetime | None = await connection.fetchval(
                "SELECT least((SELECT min(due_at) FROM enrollments WHERE state = 'active' "
                "AND due_at IS NOT NULL), (SELECT min(due_at) FROM trigger_timers))")
        return due

    async def run_due(self) -> int:
        """Handle up to one batch of due enrollments and one of due trigger timers; return
        the larger count (a full batch runs again at once)."""
        now = self._deps.clock()
        outgoing: list[OutgoingMessage] = []
        async with self._deps.pool.acquire() as connection, connection.transaction():
            fired = await self._triggers.fire_due(connection, now,
                                                  self._deps.settings.timer_batch, outgoing)
            await add_to_outbox(connection, OUTBOX_STREAM, outgoing)
        if outgoing:
            self._relay.request()
        return max(fired, await self._run_enrollments(now))

    async def _run_enrollments(self, now: datetime) -> int:
        outgoing: list[OutgoingMessage] = []
        async with self._deps.pool.acquire() as connection, connection.transaction():
            rows = await connection.fetch(
                "SELECT enrollment_id::text AS enrollment_id, workspace, journey_id, version, "
                "contact_id::text AS contact_id, step, due_at, waiting_for, visits, branches "
                "FROM enrollments WHERE state = 'active' AND due_at <= $1 ORDER BY due_at "
                "LIMIT $2 FOR UPDATE SKIP LOCKED", now, self._deps.settings.timer_batch)
            writes = Writes()
            contacts = await self._engine.contacts(
                connection, {(r["workspace"], r["contact_id"]) for r in rows})
            for row in rows:
                journey = await self._engine.journeys.version(
                    connection, row["workspace"], row["journey_id"], row["version"])
                late = now - row["due_at"] > parse_period(journey.settings.stale_after)
                policy = journey.settings.stale_policy if late else "run"
                ref = Ref(row["enrollment_id"], row["workspace"], journey, row["contact_id"])
                if policy == "end":
                    await self._engine.exit(connection, ref, row["step"],
                                            "stale after an outage")
                    self._deps.metrics.timers.labels("ended_stale").inc()
                    continue
                await self._engine.run(
                    connection, ref, position_of(row),
                    via=timeout_edge(journey, row["step"]), outgoing=outgoing,
                    suppress=policy == "skip", writes=writes,
                    contact=contacts[(row["workspace"], row["contact_id"])])
                self._deps.metrics.timers.labels("skipped_stale" if policy == "skip"
                                                  else "fired").inc()
            await writes.flush(connection)
            await add_to_outbox(connection, OUTBOX_STREAM, outgoing)
        if outgoing:
            self._relay.request()  # committed with the outbox rows: publishing can follow
        return len(rows)
