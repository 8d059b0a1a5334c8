"""Work beside the event path: retention of anonymous activity, and re-scoring after a model
change. Neither reacts to events, so neither is on the path invariant 6 is about."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import timedelta

from asyncpg.exceptions import DeadlockDetectedError

from leadwerk_platform.envelope import Envelope
from leadwerk_platform.outbox import OutboxRelay, add_to_outbox
from leadwerk_scoring.adapters.identities import load_json
from leadwerk_scoring.domain.model import rating
from leadwerk_scoring.runtime import Deps
from leadwerk_scoring.scorer import (
    CONSUMER,
    OUTBOX_STREAM,
    ScoreWriter,
    contact_traits,
    lock_score,
    qualify_by_score,
)
from leadwerk_scoring.stitcher import activity_properties

logger = logging.getLogger(__name__)

#: "Processed" records are kept this long: longer than any topic keeps a message to redeliver.
PROCESSED_RETENTION = timedelta(days=14)
_CHUNK = 5000


class Retention:
    """Deletes never-identified visitors' activity older than the configured age (and the
    dedup records older than any redelivery)."""

    def __init__(self, deps: Deps, interval: float = 3600.0) -> None:
        self._deps = deps
        self._interval = interval

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:
                logger.exception("retention run failed; next run as scheduled")
            await asyncio.sleep(self._interval)

    async def run_once(self) -> int:
        """Purge what is due; return how many timeline events went."""
        days = self._deps.settings.anonymous_retention_days
        now = self._deps.clock()
        purged = 0
        async with self._deps.pool.acquire() as connection:
            if days > 0:
                cutoff = now - timedelta(days=days)
                while True:
                    deleted = await connection.fetch(
                        "DELETE FROM timeline WHERE ctid = ANY(ARRAY(SELECT ctid FROM timeline "
                        "WHERE NOT known AND received_at < $1 LIMIT $2)) "
                        "RETURNING workspace, contact_id", cutoff, _CHUNK)
                    purged += len(deleted)
                    if deleted:
                        await connection.execute(
                            "DELETE FROM scores s USING unnest($1::text[], $2::uuid[]) "
                            "AS d(workspace, contact_id) WHERE s.workspace = d.workspace "
                            "AND s.contact_id = d.contact_id AND NOT s.known AND NOT EXISTS "
                            "(SELECT 1 FROM timeline t WHERE t.workspace = s.workspace "
                            "AND t.contact_id = s.contact_id)",
                            [r["workspace"] for r in deleted],
                            [r["contact_id"] for r in deleted])
                    if len(deleted) < _CHUNK:
                        break
            await connection.execute("DELETE FROM processed WHERE processed_at < $1",
                                     now - PROCESSED_RETENTION)
        self._deps.metrics.purged.inc(purged)
        return purged


@dataclass
class RescoreProgress:
    state: str = "idle"  # idle | running | done | failed
    total: int = 0
    done: int = 0
    changed: int = 0
    model_version: int | None = None
    error: str | None = None


class Rescorer:
    """Re-scores every contact of a workspace from its timeline under the model in force.

    Per contact, in one transaction: the score row is locked, its history and cap counters are
    rebuilt from the timeline, and every replayed event is recorded as processed by the scorer,
    so an event the scorer has not reached yet is not counted a second time later.
    """

    def __init__(self, deps: Deps, relay: OutboxRelay) -> None:
        self._deps = deps
        self._relay = relay
        self.progress = RescoreProgress()
        self._task: asyncio.Task[None] | None = None

    def start(self, workspace: str) -> RescoreProgress:
        if self._task is not None and not self._task.done():
            return self.progress
        self.progress = RescoreProgress(state="running")
        self._task = asyncio.create_task(self.run(workspace))
        return self.progress

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def run(self, workspace: str) -> None:
        progress = self.progress
        progress.state = "running"
        try:
            async with self._deps.pool.acquire() as connection:
                ids = [r["contact_id"] for r in await connection.fetch(
                    "SELECT contact_id::text AS contact_id FROM scores WHERE workspace = $1 "
                    "ORDER BY contact_id", workspace)]
            progress.total = len(ids)
            for contact_id in ids:
                for attempt in range(5):
                    try:
                        progress.changed += await self.rescore(workspace, contact_id)
                        break
                    except DeadlockDetectedError:
                        if attempt == 4:
                            raise
                progress.done += 1
                self._deps.metrics.rescore_progress.set(progress.done)
            await self._relay.flush()
            progress.state = "done"
        except Exception as error:
            logger.exception("re-scoring failed")
            progress.state, progress.error = "failed", repr(error)

    async def rescore(self, workspace: str, contact_id: str) -> int:
        """Rebuild one contact's score; return 1 if its score or rating changed."""
        async with self._deps.pool.acquire() as connection, connection.transaction():
            model = await self._deps.models.current(connection, workspace)
            self.progress.model_version = model.version
            now = self._deps.clock()
            row = await lock_score(connection, workspace, contact_id, model, now)
            previous = row.value_at(now, model)
            previous_rating = rating(row.grade, model.band(round(previous, 2)))
            events = await connection.fetch(
                "SELECT event_id::text AS event_id, type, name, occurred_at, received_at, "
                "session_id::text AS session_id, known, data FROM timeline "
                "WHERE workspace = $1 AND contact_id = $2 ORDER BY occurred_at, event_id",
                workspace, row.contact_id)
            for table in ("score_history", "rule_counts"):
                await connection.execute(
                    f"DELETE FROM {table} WHERE workspace = $1 "  # noqa: S608 - fixed names
                    "AND contact_id = $2", workspace, row.contact_id)
            await connection.execute(
                "INSERT INTO processed (consumer, event_id) SELECT $1, unnest($2::uuid[]) "
                "ON CONFLICT DO NOTHING", CONSUMER, [e["event_id"] for e in events])
            row.engagement, row.engagement_at, row.causes = 0.0, None, []
            writer = ScoreWriter(self._deps, connection)
            sessions: set[str] = set()
            for event in events:
                data = load_json(event["data"])
                started = event["session_id"] is not None and event["session_id"] not in sessions
                if event["session_id"] is not None:
                    sessions.add(event["session_id"])
                envelope = Envelope(id=event["event_id"], type=f"tracking.{event['type']}.v1",
                                    workspace=workspace, occurred_at=event["occurred_at"],
                                    received_at=event["received_at"], producer="scoring",
                                    data=data)
                activity = {**activity_properties(event["type"], data),
                            "type": event["type"], "event": event["name"]}
                await writer.points(row, model, envelope, activity, started)
                row.known = row.known or event["known"]
            if row.known:
                traits = await contact_traits(connection, workspace, row.contact_id)
                row.grade = model.grade(traits)
                await qualify_by_score(connection, writer, row, model, traits=traits, at=now,
                                       cause_event_id=None)
            score = round(row.value_at(now, model), 2)
            changed = score != round(previous, 2) or \
                rating(row.grade, model.band(score)) != previous_rating
            # One change per contact, not one per replayed rule match.
            row.causes = [{"rule": "rescore", "points": round(score - previous, 2)}] \
                if changed else []
            await writer.save(row, model, now, previous_score=previous,
                              previous_rating=previous_rating,
                              cause_id=f"rescore:{model.version}")
            await add_to_outbox(connection, OUTBOX_STREAM, writer.outgoing)
        return int(changed)

