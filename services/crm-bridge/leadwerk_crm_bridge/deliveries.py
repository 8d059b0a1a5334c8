"""Outbound deliveries: crm-commands become rows in ``deliveries`` (one per command and
connector, its id the ``webhook-id``); a worker sends due rows, per contact and connector in
order, retries with back-off, and dead-letters after the budget (replayable).

The address connected to is the one checked: the host is resolved once, every address is
checked against SSRF rules (unless the workspace allows private ones), and the request goes
to that IP with the original ``Host`` header and TLS server name.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field

from leadwerk_crm_bridge.domain.outbound import (
    Verdict,
    development_secret,
    forbidden,
    judge,
    sign,
)
from leadwerk_crm_bridge.metrics import BridgeMetrics
from leadwerk_crm_bridge.settings import BridgeSettings
from leadwerk_platform.envelope import Envelope, InvalidMessageError, format_timestamp
from leadwerk_platform.kafka.consumer import ConsumedMessage
from leadwerk_platform.settings import Environment, config_entries
from leadwerk_platform.timers import DueTimer

logger = logging.getLogger(__name__)

CONSUMER = "deliveries"
TOPICS = {"crm-commands": "crm-commands-dlq"}
_NAMESPACE = uuid.UUID("5c0d4e3f-2a1b-5c6d-9e8f-7a6b5c4d3e2f")
Connection = Any


class Connector(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    workspace: str
    kind: str = "webhook"
    url: str = Field(pattern=r"^https?://")
    events: list[str] = Field(default_factory=lambda: ["handoff"])


@dataclass(frozen=True)
class Config:
    connectors: list[Connector] = field(default_factory=list)
    allow_private: frozenset[str] = frozenset()  # workspaces that may call private addresses

    @classmethod
    def load(cls, config_dir: Path) -> Config:
        connectors = [Connector.model_validate(c)
                      for c in config_entries(config_dir, "connectors.yaml", "connectors")]
        private = frozenset(str(w["id"]) for w in config_entries(
            config_dir, "workspaces.yaml", "workspaces") if w.get("allow_private_webhooks"))
        return cls(connectors, private)


@dataclass
class Deps:
    settings: BridgeSettings
    pool: Any
    config: Config
    metrics: BridgeMetrics
    clock: Callable[[], datetime]

    def secrets(self, purpose: Literal["outbound", "inbound"]) -> list[str]:
        """The ``whsec_`` secrets that sign what we send (``outbound``) or verify what CRMs
        send us (``inbound``); outside production, one derived from the platform key when
        none is configured."""
        setting = self.settings.webhook_secrets if purpose == "outbound" \
            else self.settings.inbound_secrets
        configured = setting.get_secret_value().split()
        if configured or self.settings.environment is Environment.PRODUCTION:
            return configured
        return [development_secret(self.settings.secret_key.get_secret_value(), purpose)]


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
                await self._one(connection, message.envelope, now)
        if self._worker is not None:
            self._worker.wake()

    async def _one(self, connection: Connection, command: Envelope, now: datetime) -> None:
        data = command.data
        if not isinstance(data.get("contact_id"), str):
            raise InvalidMessageError(f"{command.type} without a contact id")
        fresh = await connection.fetchval(
            "INSERT INTO processed (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING "
            "RETURNING true", CONSUMER, command.id)
        if not fresh:
            return
        if command.type == "crm.handoff_requested.v1":
            targets = [(c.id, c.url) for c in self._deps.config.connectors
                       if c.workspace == command.workspace and "handoff" in c.events]
            event = "lead.handoff"
        elif command.type == "crm.webhook_requested.v1":
            targets = [("journey-webhook", str(data["url"]))]
            event = str(data.get("event") or "journey.step")
        else:
            return
        body = orjson.dumps({"type": event, "timestamp": format_timestamp(command.occurred_at),
                             "data": {k: v for k, v in data.items() if k != "url"}})
        await connection.executemany(
            "INSERT INTO deliveries (delivery_id, workspace, contact_id, command_id, connector, "
            "url, event, body, state, next_attempt_at, created_at, updated_at) VALUES ($1, $2, "
            "$3, $4, $5, $6, $7, $8, 'pending', $9, $9, $9) ON CONFLICT DO NOTHING",
            [(uuid.uuid5(_NAMESPACE, f"{command.id}\x1f{connector}"), command.workspace,
              data["contact_id"], command.id, connector, url, event, body, now)
             for connector, url in targets])
        self._deps.metrics.queued.inc(len(targets))


@dataclass(frozen=True)
class Answer:
    status: int | None
    error: str | None
    retry_after: str | None = None
    #: Not worth retrying (refused by our own rules): dead at once, replayable after a fix.
    final: bool = False


class DeliveryWorker(DueTimer):
    """Sends due deliveries. Rows are leased (their next attempt pushed past the request
    timeout) in a short transaction, so several processes share the work with
    ``SKIP LOCKED``; a contact's deliveries to one connector go in order."""

    def __init__(self, deps: Deps, client: httpx.AsyncClient) -> None:
        super().__init__(deps.clock, batch=deps.settings.parallel)
        self._deps = deps
        self._client = client

    async def next_due(self) -> datetime | None:
        async with self._deps.pool.acquire() as connection:
            due: datetime | None = await connection.fetchval(
                "SELECT min(next_attempt_at) FROM deliveries WHERE state = 'pending'")
        return due

    async def run_due(self) -> int:
        deps, now = self._deps, self._deps.clock()
        lease = now + timedelta(seconds=deps.settings.request_timeout * 3)
        async with deps.pool.acquire() as connection, connection.transaction():
            rows = await connection.fetch(
                "UPDATE deliveries SET next_attempt_at = $3 WHERE delivery_id IN ("
                "SELECT d.delivery_id FROM deliveries d WHERE d.state = 'pending' "
                "AND d.next_attempt_at <= $1 AND NOT EXISTS (SELECT 1 FROM deliveries e "
                "WHERE e.workspace = d.workspace AND e.contact_id = d.contact_id "
                "AND e.connector = d.connector AND e.state = 'pending' "
                "AND e.created_at < d.created_at) ORDER BY d.next_attempt_at LIMIT $2 "
                "FOR UPDATE SKIP LOCKED) RETURNING delivery_id::text AS delivery_id, workspace, "
                "url, body, attempts", now, deps.settings.parallel, lease)
        await asyncio.gather(*(self._deliver(row) for row in rows))
        return len(rows)

    async def _deliver(self, row: Any) -> None:
        deps = self._deps
        answer = await self.send(row["workspace"], row["url"], row["delivery_id"],
                                 bytes(row["body"]))
        now, attempt = deps.clock(), row["attempts"] + 1
        verdict = Verdict("dead", reason=str(answer.error)) if answer.final else judge(
            answer.status, answer.error, attempt=attempt, now=now,
            retry_after_header=answer.retry_after, attempts=deps.settings.retry_attempts,
            base=deps.settings.retry_base_seconds, ceiling=deps.settings.retry_max_seconds)
        state = {"delivered": "delivered", "retry": "pending", "dead": "dead"}[verdict.kind]
        async with deps.pool.acquire() as connection:
            await connection.execute(
                "UPDATE deliveries SET state = $2::text, attempts = $3, next_attempt_at = $4, "
                "last_status = $5, last_error = $6, updated_at = $7::timestamptz, "
                "delivered_at = CASE WHEN $2::text = 'delivered' THEN $7::timestamptz END "
                "WHERE delivery_id = $1", row["delivery_id"],
                state, attempt, verdict.at, answer.status,
                None if verdict.kind == "delivered" else verdict.reason, now)
        deps.metrics.attempts.labels(verdict.kind).inc()

    async def send(self, workspace: str, url: str, delivery_id: str, body: bytes) -> Answer:
        """One signed POST to ``url`` through the SSRF check."""
        secrets = self._deps.secrets("outbound")
        if not secrets:
            return Answer(None, "no webhook secret configured (LEADWERK_WEBHOOK_SECRETS)",
                          final=True)
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https"
                                                           else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM)
        except OSError as error:
            return Answer(None, f"cannot resolve {host}: {error}")
        address = str(infos[0][4][0])
        if workspace not in self._deps.config.allow_private:
            refusals = [r for r in (forbidden(str(i[4][0])) for i in infos) if r]
            if refusals:
                return Answer(None, f"refused (SSRF protection): {refusals[0]}", final=True)
        netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        headers = {"Content-Type": "application/json", "Host": parts.netloc.rpartition("@")[2],
                   "User-Agent": "Leadwerk-crm-bridge/1",
                   **sign(secrets, delivery_id, self._deps.clock(), body)}
        try:
            response = await self._client.post(
                target, content=body, headers=headers,
                extensions={"sni_hostname": host} if parts.scheme == "https" else {})
        except httpx.HTTPError as error:
            return Answer(None, f"{type(error).__name__}: {error}")
        return Answer(response.status_code, None, response.headers.get("retry-after"))
