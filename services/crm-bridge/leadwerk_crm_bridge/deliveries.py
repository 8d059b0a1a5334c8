"""Outbound deliveries: what the CRM should learn becomes rows in ``deliveries`` (one per
event and connector, its id stable); a worker groups due rows into batches (one request each,
up to the connector's batch size, a contact at most once per batch so its deliveries go in
order), sends them through the connector's channel, retries with back-off behind a circuit
breaker per endpoint, and dead-letters after the budget (replayable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

import asyncpg
import orjson

from leadwerk_crm_bridge.channels import Answer, Batch, Channel, Item, Outcome
from leadwerk_crm_bridge.config import Config, Connector
from leadwerk_crm_bridge.domain.breaker import Breaker
from leadwerk_crm_bridge.domain.outbound import Verdict, development_secret, judge
from leadwerk_crm_bridge.metrics import BridgeMetrics
from leadwerk_crm_bridge.projection import contact_document, recent_summary
from leadwerk_crm_bridge.settings import BridgeSettings
from leadwerk_platform.envelope import Envelope, InvalidMessageError, format_timestamp
from leadwerk_platform.kafka.consumer import ConsumedMessage
from leadwerk_platform.settings import Environment
from leadwerk_platform.timers import DueTimer

CONSUMER = "deliveries"
TOPICS = {"crm-commands": "crm-commands-dlq"}
JOURNEY_WEBHOOK = "journey-webhook"  # the connector name of journeys' own webhook URLs
_NAMESPACE = uuid.UUID("5c0d4e3f-2a1b-5c6d-9e8f-7a6b5c4d3e2f")
REDACTED = b"{}"
Connection = Any
logger = logging.getLogger(__name__)


@dataclass
class Deps:
    settings: BridgeSettings
    pool: Any
    config: Config
    metrics: BridgeMetrics
    clock: Callable[[], datetime]
    #: The values of connectors' secret environment variables, by variable name.
    environ: dict[str, str] = field(default_factory=dict)

    def secrets(self, purpose: Literal["outbound", "inbound"]) -> list[str]:
        return webhook_secrets(self.settings, purpose)

    def secret(self, connector: Connector, name: Literal["token", "client_id",
                                                           "client_secret"]) -> str | None:
        variable = connector.secrets.get(name)
        return self.environ.get(variable) if variable else None


def webhook_secrets(settings: BridgeSettings,
                    purpose: Literal["outbound", "inbound"]) -> list[str]:
    """The ``whsec_`` secrets that sign what we send (``outbound``) or verify what CRMs send
    us (``inbound``); outside production, one derived from the platform key when none is
    configured."""
    setting = settings.webhook_secrets if purpose == "outbound" else settings.inbound_secrets
    configured = setting.get_secret_value().split()
    if configured or settings.environment is Environment.PRODUCTION:
        return configured
    return [development_secret(settings.secret_key.get_secret_value(), purpose)]


def valid_uuid(value: Any, what: str) -> str:
    """A well-formed id in canonical form, or the message is invalid (dead-lettered)."""
    try:
        return str(uuid.UUID(str(value)))
    except ValueError as error:
        raise InvalidMessageError(f"{what} is not a uuid: {value!r}") from error


@contextlib.contextmanager
def malformed_is_invalid(envelope: Envelope) -> Iterator[None]:
    """A message whose fields have the wrong shape (or that the database refuses as data)
    is dead-lettered, not retried until the consumer gives up."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, asyncpg.DataError) as error:
        if isinstance(error, InvalidMessageError):
            raise
        raise InvalidMessageError(f"{envelope.type}: {type(error).__name__}: {error}",
                                  ) from error


def event_body(event: str, at: datetime, data: dict[str, Any]) -> bytes:
    """The canonical form of what a connector delivers (a Standard Webhooks payload)."""
    return orjson.dumps({"type": event, "timestamp": format_timestamp(at), "data": data})


async def enqueue(connection: Connection, targets: Sequence[tuple[str, str]], *,
                  workspace: str, contact_id: str, source_id: str, kind: str, body: bytes,
                  now: datetime, coalesce: bool = False) -> int:
    """One delivery per (connector, url) target, its id derived from the source event (a
    redelivered event adds nothing). ``coalesce``: a waiting delivery of the same kind that
    is the contact's last one takes the newer body instead (score changes)."""
    rows = []
    for connector, url in targets:
        if coalesce and await connection.fetchval(
                "UPDATE deliveries d SET body = $5, updated_at = $6 WHERE d.workspace = $1 "
                "AND d.contact_id = $2 AND d.connector = $3 AND d.kind = $4 "
                "AND d.state = 'pending' AND d.batch_id IS NULL AND NOT EXISTS (SELECT 1 "
                "FROM deliveries e WHERE e.workspace = d.workspace AND e.contact_id = "
                "d.contact_id AND e.connector = d.connector AND e.seq > d.seq) "
                "RETURNING true", workspace, contact_id, connector, kind, body, now):
            continue
        rows.append(delivery_row(connector, url, workspace=workspace, contact_id=contact_id,
                                 source_id=source_id, kind=kind, body=body, now=now))
    await insert_deliveries(connection, rows)
    return len(rows)


def delivery_row(connector: str, url: str, *, workspace: str, contact_id: str,
                 source_id: str, kind: str, body: bytes, now: datetime) -> tuple[Any, ...]:
    return (uuid.uuid5(_NAMESPACE, f"{source_id}\x1f{connector}"), workspace, contact_id,
            source_id, connector, url, kind, body, now)


async def insert_deliveries(connection: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Rows of :func:`delivery_row`, in order (their ``seq`` is the order per contact)."""
    if rows:
        await connection.executemany(
            "INSERT INTO deliveries (delivery_id, workspace, contact_id, command_id, "
            "connector, url, kind, event, body, state, created_at, updated_at) VALUES ($1, $2, "
            "$3, $4, $5, $6, $7, $7, $8, 'pending', $9, $9) ON CONFLICT DO NOTHING", rows)


async def replay_dead(connection: Connection, workspace: str, now: datetime, *,
                      delivery_id: str | None = None,
                      connector: str | None = None) -> list[str]:
    """Dead-lettered deliveries (one, those of a connector, or all of the workspace) wait
    again, behind the contact's newer deliveries; they form new batches (a single delivery
    keeps its id as the batch id)."""
    rows = await connection.fetch(
        "UPDATE deliveries SET state = 'pending', attempts = 0, batch_id = NULL, "
        "seq = DEFAULT, next_attempt_at = $2, updated_at = $2 "
        "WHERE workspace = $1 AND state = 'dead' "
        "AND ($3::uuid IS NULL OR delivery_id = $3::uuid) "
        "AND ($4::text IS NULL OR connector = $4) RETURNING delivery_id::text",
        workspace, now, delivery_id, connector)
    return [str(r["delivery_id"]) for r in rows]


class CommandHandler:
    """crm-commands → deliveries (one transaction per fetched batch)."""

    def __init__(self, deps: Deps, worker: DeliveryWorker | None) -> None:
        self._deps = deps
        self._worker = worker

    async def __call__(self, message: ConsumedMessage) -> None:
        await self.batch([message])

    async def batch(self, messages: Sequence[ConsumedMessage]) -> None:
        now = self._deps.clock()
        async with self._deps.pool.acquire() as connection, connection.transaction():
            for message in messages:
                with malformed_is_invalid(message.envelope):
                    await self._one(connection, message.envelope, now)
        if self._worker is not None:
            self._worker.wake()

    async def _one(self, connection: Connection, command: Envelope, now: datetime) -> None:
        data = command.data
        contact_id = valid_uuid(data.get("contact_id"), f"{command.type}'s contact id")
        fresh = await connection.fetchval(
            "INSERT INTO processed (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING "
            "RETURNING true", CONSUMER, command.id)
        if not fresh:
            return
        if command.type == "crm.handoff_requested.v1":
            targets = [(c.id, c.url) for c in self._deps.config.targets(command.workspace,
                                                                          "handoff")]
            kind, event = "handoff", "lead.handoff"
            payload = await handoff_data(connection, command.workspace, data, now)
        elif command.type == "crm.webhook_requested.v1":
            if not isinstance(data.get("url"), str):
                raise InvalidMessageError("crm.webhook_requested.v1 without a url")
            targets = [(JOURNEY_WEBHOOK, data["url"])]
            kind, event = "webhook", str(data.get("event") or "journey.step")
            payload = {k: v for k, v in data.items() if k != "url"}
        else:
            return
        queued = await enqueue(connection, targets, workspace=command.workspace,
                               contact_id=contact_id, source_id=command.id, kind=kind,
                               body=event_body(event, command.occurred_at, payload), now=now)
        self._deps.metrics.queued.labels(kind).inc(queued)


async def handoff_data(connection: Connection, workspace: str, data: dict[str, Any],
                       now: datetime) -> dict[str, Any]:
    """The hand-off as sales gets it: the command, the contact as the bridge knows it, and a
    summary of the recent activity. Score, grade, rating and stage come from the journey's
    snapshot where it has them: the state that caused the hand-off, which the bridge's own
    projection (another topic) may not have caught up with yet."""
    contact = await contact_document(connection, workspace, data["contact_id"])
    snapshot = data.get("snapshot") or {}
    for name in ("score", "grade", "rating", "stage"):
        if snapshot.get(name) is not None:
            contact[name] = snapshot[name]
    contact["traits"] = {**(snapshot.get("traits") or {}), **contact.get("traits", {})}
    if data.get("owner"):
        contact["owner"] = data["owner"]
    labels, summary = await recent_summary(connection, workspace, data["contact_id"], now)
    return {**data, "contact": contact, "summary": summary, "recent_activity": labels}


class DeliveryWorker(DueTimer):
    """Forms batches and sends due ones. Batches are leased (their next attempt pushed past
    the request timeout) in a short transaction, so several processes share the work with
    ``SKIP LOCKED``."""

    def __init__(self, deps: Deps, channels: dict[str, Channel]) -> None:
        super().__init__(deps.clock, batch=deps.settings.parallel)
        self._deps = deps
        self._channels = channels
        self._breakers: dict[str, Breaker] = defaultdict(lambda: Breaker(
            deps.settings.breaker_failures, deps.settings.breaker_cooldown_seconds))

    async def next_due(self) -> datetime | None:
        async with self._deps.pool.acquire() as connection:
            due: datetime | None = await connection.fetchval(
                "SELECT least((SELECT min(next_attempt_at) FROM batches WHERE state = "
                "'pending'), (SELECT $1::timestamptz FROM deliveries d WHERE d.state = "
                "'pending' AND d.batch_id IS NULL AND NOT EXISTS (SELECT 1 FROM deliveries e "
                "WHERE e.workspace = d.workspace AND e.contact_id = d.contact_id AND "
                "e.connector = d.connector AND e.state = 'pending' AND e.seq < d.seq) "
                "LIMIT 1))", self._deps.clock())
        return due

    async def run_due(self) -> int:
        await self._form()
        deps, now = self._deps, self._deps.clock()
        lease = now + timedelta(seconds=deps.settings.request_timeout * 3)
        async with deps.pool.acquire() as connection:
            async with connection.transaction():
                leased = await connection.fetch(
                    "UPDATE batches SET next_attempt_at = $3 WHERE batch_id IN (SELECT "
                    "batch_id FROM batches WHERE state = 'pending' AND next_attempt_at <= $1 "
                    "ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING "
                    "batch_id::text AS batch_id, workspace, connector, attempts, "
                    "next_attempt_at AS lease",
                    now, deps.settings.parallel, lease)
            if not leased:
                return 0
            rows = await connection.fetch(
                "SELECT delivery_id::text AS delivery_id, batch_id::text AS batch_id, "
                "contact_id::text AS contact_id, kind, url, body FROM deliveries "
                "WHERE batch_id = ANY($1::uuid[]) AND state = 'pending' ORDER BY seq",
                [b["batch_id"] for b in leased])
            items: dict[str, list[Item]] = defaultdict(list)
            for row in rows:
                items[row["batch_id"]].append(Item(row["delivery_id"], row["contact_id"],
                                                   row["kind"], row["url"], bytes(row["body"])))
            known = await connection.fetch(
                "SELECT workspace, connector, contact_id::text AS contact_id, crm_id "
                "FROM crm_records WHERE contact_id = ANY($1::uuid[])",
                list({r["contact_id"] for r in rows}))
        crm_ids: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
        for record in known:
            crm_ids[(record["workspace"], record["connector"])][record["contact_id"]] = \
                record["crm_id"]
        await asyncio.gather(*(
            self._send(lease_row, items[lease_row["batch_id"]],
                       crm_ids[(lease_row["workspace"], lease_row["connector"])])
            if items.get(lease_row["batch_id"])
            else self._close(lease_row["batch_id"], "delivered")  # all cancelled (erasure)
            for lease_row in leased))
        return len(leased)

    async def _form(self) -> None:
        """Waiting deliveries → batches: the first waiting delivery of each contact and
        connector, grouped per connector into requests of the connector's batch size."""
        deps, now = self._deps, self._deps.clock()
        async with deps.pool.acquire() as connection, connection.transaction():
            rows = await connection.fetch(
                "SELECT d.delivery_id::text AS delivery_id, d.workspace, d.connector, d.kind "
                "FROM deliveries d WHERE d.state = 'pending' AND d.batch_id IS NULL "
                "AND NOT EXISTS (SELECT 1 FROM deliveries e WHERE e.workspace = d.workspace "
                "AND e.contact_id = d.contact_id AND e.connector = d.connector "
                "AND e.state = 'pending' AND e.seq < d.seq) ORDER BY d.seq LIMIT $1 "
                "FOR UPDATE SKIP LOCKED", deps.settings.parallel * 100)
            if not rows:
                return
            groups: dict[tuple[str, str, str], list[str]] = defaultdict(list)
            for row in rows:
                connector = deps.config.connector(row["workspace"], row["connector"])
                groups[(row["workspace"], row["connector"],
                        _group(connector, row["kind"], row["delivery_id"]))].append(
                    row["delivery_id"])
            batches: list[tuple[uuid.UUID, str, str, list[str]]] = []
            for (workspace, connector_id, _), ids in groups.items():
                connector = deps.config.connector(workspace, connector_id)
                size = connector.size if connector is not None else 1
                for start in range(0, len(ids), size):
                    chunk = ids[start:start + size]
                    batch_id = uuid.UUID(chunk[0]) if len(chunk) == 1 else uuid.uuid5(
                        _NAMESPACE, ",".join(sorted(chunk)))
                    batches.append((batch_id, workspace, connector_id, chunk))
            await connection.executemany(
                "INSERT INTO batches (batch_id, workspace, connector, state, attempts, "
                "next_attempt_at, created_at, updated_at) VALUES ($1, $2, $3, 'pending', 0, "
                "$4, $4, $4) ON CONFLICT (batch_id) DO UPDATE SET state = 'pending', "
                "attempts = 0, next_attempt_at = $4, updated_at = $4",
                [(b[0], b[1], b[2], now) for b in batches])
            await connection.executemany(
                "UPDATE deliveries SET batch_id = $1 WHERE delivery_id = ANY($2::uuid[])",
                [(b[0], b[3]) for b in batches])

    async def _send(self, lease: Any, items: list[Item], crm_ids: dict[str, str]) -> None:
        deps = self._deps
        connector = deps.config.connector(lease["workspace"], lease["connector"])
        batch = Batch(lease["batch_id"], lease["workspace"], connector, items,
                      {i.contact_id: crm_ids[i.contact_id] for i in items
                       if i.contact_id in crm_ids})
        # Host and port only: a URL's user:password@ must not reach a metric label or a log.
        endpoint = f"{lease['workspace']}:{lease['connector']}" if connector is not None \
            else urlsplit(items[0].url).netloc.rpartition("@")[2]
        breaker = self._breakers[endpoint]
        wait = breaker.wait(time.monotonic())
        if wait > 0:
            await self._postpone(batch.batch_id, lease["lease"],
                                 deps.clock() + timedelta(seconds=wait),
                                 f"circuit open for {endpoint}")
            deps.metrics.attempts.labels(_kind(connector), "circuit_open").inc()
            return
        started = time.monotonic()
        try:
            # Within the lease: past it another process may take the batch over.
            async with asyncio.timeout(deps.settings.request_timeout * 2.5):
                outcome = await self._deliver(batch)
        except TimeoutError:
            outcome = Outcome(Answer(None, "the batch took longer than its lease"))
        except Exception as error:
            logger.exception("delivering batch %s failed", batch.batch_id)
            outcome = Outcome(Answer(None, f"internal error: {type(error).__name__}",
                                     final=True))
        deps.metrics.latency.labels(_kind(connector)).observe(time.monotonic() - started)
        answer = outcome.answer
        broken = answer.status is None or answer.status >= 500 or answer.status == 408
        breaker.record(not broken, time.monotonic())
        deps.metrics.circuit_open.labels(endpoint).set(1 if breaker.is_open else 0)
        now, attempt = deps.clock(), lease["attempts"] + 1
        verdict = Verdict("dead", reason=str(answer.error)) if answer.final else judge(
            answer.status, answer.error, attempt=attempt, now=now,
            retry_after_header=answer.retry_after, attempts=deps.settings.retry_attempts,
            base=deps.settings.retry_base_seconds, ceiling=deps.settings.retry_max_seconds)
        if not await self._record(batch, outcome, verdict, attempt, now, lease["lease"]):
            return  # the lease ran out and another process took the batch over
        deps.metrics.attempts.labels(_kind(connector), verdict.kind).inc()
        deps.metrics.delivered.labels(_kind(connector)).inc(
            0 if verdict.kind != "delivered" else len(items) - len(outcome.failed))

    async def _deliver(self, batch: Batch) -> Outcome:
        kind = _kind(batch.connector)
        if batch.connector is None and batch.items[0].kind != "webhook":
            return Outcome(Answer(None, "the connector is no longer configured", final=True))
        channel = self._channels.get(kind)
        if channel is None:
            return Outcome(Answer(None, f"no {kind} connector in this version", final=True))
        return await channel.deliver(batch)

    async def _record(self, batch: Batch, outcome: Outcome, verdict: Verdict,  # noqa: PLR0917
                      attempt: int, now: datetime, lease: datetime) -> bool:
        """The outcome, if the batch is still ours (its lease unchanged)."""
        state = {"delivered": "delivered", "retry": "pending", "dead": "dead"}[verdict.kind]
        answer = outcome.answer
        error = None if verdict.kind == "delivered" else verdict.reason
        connector = batch.connector
        async with self._deps.pool.acquire() as connection, connection.transaction():
            if not await connection.fetchval(
                    "UPDATE batches SET state = $2, attempts = $3, next_attempt_at = "
                    "coalesce($4, next_attempt_at), updated_at = $5 WHERE batch_id = $1 "
                    "AND next_attempt_at = $6 RETURNING true",
                    batch.batch_id, state, attempt, verdict.at, now, lease):
                return False
            await connection.execute(
                "UPDATE deliveries SET state = $2::text, attempts = $3, next_attempt_at = $4, "
                "last_status = $5, last_error = $6, updated_at = $7::timestamptz, "
                "delivered_at = CASE WHEN $2::text = 'delivered' THEN $7::timestamptz END "
                "WHERE batch_id = $1 AND state = 'pending' AND NOT (delivery_id = ANY($8))",
                batch.batch_id, state, attempt, verdict.at, answer.status, error, now,
                [uuid.UUID(d) for d in outcome.failed])
            if outcome.failed:
                await connection.executemany(
                    "UPDATE deliveries SET state = 'dead', attempts = $3, last_status = $4, "
                    "last_error = $2, updated_at = $5 WHERE delivery_id = $1 "
                    "AND state = 'pending'",
                    [(uuid.UUID(d), why, attempt, answer.status, now)
                     for d, why in outcome.failed.items()])
            erased = {str(r["contact_id"]) for r in await connection.fetch(
                "SELECT contact_id FROM erasures WHERE workspace = $1 "
                "AND contact_id = ANY($2::uuid[])", batch.workspace,
                list({i.contact_id for i in batch.items}))}
            if connector is not None:
                await self._records(connection, batch, outcome, erased, now)
            if erased:  # in flight when the person was erased: nothing of them stays here
                await connection.execute(
                    "UPDATE deliveries SET body = $3, last_error = NULL WHERE batch_id = $1 "
                    "AND state <> 'pending' AND contact_id = ANY($2::uuid[])",
                    batch.batch_id, sorted(erased), REDACTED)
        return True

    @staticmethod
    async def _records(connection: Connection, batch: Batch, outcome: Outcome,
                       erased: set[str], now: datetime) -> None:
        """The CRM ids learned (kept for an erased contact only until the CRM erases it
        too); after a delivered erasure, the contact's ids and deliveries are forgotten."""
        connector = batch.connector
        assert connector is not None  # noqa: S101
        erasing = "erasure" in connector.events
        learned = [(batch.workspace, connector.id, c, crm, now)
                   for c, crm in outcome.crm_ids.items() if c not in erased or erasing]
        if learned:
            await connection.executemany(
                "INSERT INTO crm_records (workspace, connector, contact_id, crm_id, "
                "updated_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (workspace, "
                "connector, contact_id) DO UPDATE SET crm_id = $4, updated_at = $5", learned)
        done = [i.contact_id for i in batch.items if i.kind == "erasure"
                and i.delivery_id not in outcome.failed]
        if done and outcome.answer.status is not None and outcome.answer.status < 300:
            await connection.execute(
                "UPDATE deliveries SET body = $4, last_error = NULL WHERE workspace = $1 "
                "AND connector = $2 AND contact_id = ANY($3::uuid[])",
                batch.workspace, connector.id, done, REDACTED)
            await connection.execute(
                "DELETE FROM crm_records WHERE workspace = $1 AND connector = $2 "
                "AND contact_id = ANY($3::uuid[])", batch.workspace, connector.id, done)

    async def _postpone(self, batch_id: str, lease: datetime, at: datetime,
                        why: str) -> None:
        async with self._deps.pool.acquire() as connection, connection.transaction():
            if await connection.fetchval(
                    "UPDATE batches SET next_attempt_at = $3 WHERE batch_id = $1 "
                    "AND next_attempt_at = $2 RETURNING true", batch_id, lease, at):
                await connection.execute(
                    "UPDATE deliveries SET next_attempt_at = $2, last_error = $3 "
                    "WHERE batch_id = $1 AND state = 'pending'", batch_id, at, why)

    async def _close(self, batch_id: str, state: str) -> None:
        async with self._deps.pool.acquire() as connection:
            await connection.execute("UPDATE batches SET state = $2 WHERE batch_id = $1",
                                     batch_id, state)


def _group(connector: Connector | None, kind: str, delivery_id: str) -> str:
    """Which deliveries may share a request: a CRM takes contact changes, hand-offs and
    activities together (erasures alone); a webhook receiver gets activities batched and
    every other event on its own."""
    if connector is None or kind == "erasure":
        return delivery_id
    if connector.kind == "webhook":
        return "activity" if kind == "activity" else delivery_id
    return "records"


def _kind(connector: Connector | None) -> str:
    return connector.kind if connector is not None else "webhook"
