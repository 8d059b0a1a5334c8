"""Sending one email command exactly once, and saying what happened.

Per command (its envelope id is the idempotency key, the ``messages`` primary key):

1. ``received`` is recorded with the command (a redelivered command finds its row and stops);
2. the policy is checked at send time (suppression, consent, expiry) and the template
   rendered; a refusal or a template bug ends here as ``suppressed`` or ``failed``;
3. ``sending`` is committed, then the SMTP transaction runs, then ``sent`` (or ``deferred`` /
   ``bounced``) is committed together with the email event in the outbox.

A mailer killed between 3's first commit and its last leaves ``sending``: the redelivered
command then does not send again (the relay may have accepted it) and records ``uncertain``.
That window is the length of one SMTP transaction (ADR 0012). A mailer killed before 3 leaves
``received`` or ``claimed``: the retry worker picks such rows up after a grace period. Each
delivery starts by claiming the row (``received`` → ``claimed``), so of two hands (a
redelivered command, the retry worker) only one sends.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import parseaddr
from typing import Any

import orjson

from leadwerk_mailer.config import WorkspaceMail
from leadwerk_mailer.domain.bounces import Bounce
from leadwerk_mailer.domain.message import (
    DkimKey,
    Envelope,
    add_pixel,
    build,
    sign,
    track_links,
    use_openssl_for_dkim,
)
from leadwerk_mailer.domain.policy import refusal
from leadwerk_mailer.domain.templates import Renderer, RenderError
from leadwerk_mailer.metrics import MailerMetrics
from leadwerk_mailer.settings import MailerSettings
from leadwerk_mailer.templates import TemplateStore
from leadwerk_mailer.transport import Outcome, Relay
from leadwerk_platform.envelope import Envelope as Message
from leadwerk_platform.envelope import encode, format_timestamp
from leadwerk_platform.kafka.producer import OutgoingMessage
from leadwerk_platform.outbox import OutboxRelay, add_to_outbox
from leadwerk_platform.timers import DueTimer
from leadwerk_platform.tokens import EmailToken, TokenKind, TokenSigner

logger = logging.getLogger(__name__)

OUTBOX_STREAM = "mailer"
#: How long marketing mail waits for a pending double opt-in when its command has no not_after.
HOLD_FOR = timedelta(days=7)
_NAMESPACE = uuid.UUID("3b2f6c1e-9d4a-5e7b-8c0f-1a2b3c4d5e6f")
Connection = Any


@dataclass
class Deps:
    settings: MailerSettings
    pool: Any
    templates: TemplateStore
    renderer: Renderer
    relays: dict[str, Relay]  # "marketing", "transactional"
    signer: TokenSigner
    outbox: OutboxRelay
    metrics: MailerMetrics
    clock: Callable[[], datetime]
    workspaces: dict[str, WorkspaceMail] = field(default_factory=dict)


class Delivery:
    def __init__(self, deps: Deps) -> None:
        self._deps = deps
        key = deps.settings.dkim_key()
        self._dkim = DkimKey(deps.settings.dkim_domain, deps.settings.dkim_selector, key) \
            if key and deps.settings.dkim_domain else None
        if self._dkim is not None:
            use_openssl_for_dkim()
        _, sender = parseaddr(deps.settings.default_sender)
        self._id_domain = sender.rpartition("@")[2] or "leadwerk.localhost"
        #: Woken when a message is deferred or held, so its retry is timed from now.
        self.retries: DueTimer | None = None

    async def accept(self, command: Message) -> bool:
        """Record a command once; ``True`` when it is new (or was left unsent)."""
        data, now = command.data, self._deps.clock()
        async with self._deps.pool.acquire() as connection, connection.transaction():
            inserted = await connection.fetchval(
                "INSERT INTO messages (command_id, workspace, contact_id, template_id, class, "
                "to_address, state, command, created_at, updated_at) VALUES ($1, $2, $3, $4, "
                "$5, $6, 'received', $7, $8, $8) ON CONFLICT DO NOTHING RETURNING true",
                command.id, command.workspace, data["contact_id"], data["template"],
                data["class"], data.get("to"),
                orjson.dumps({**data, "workspace": command.workspace,
                              "received_at": format_timestamp(now)}).decode(), now)
            if inserted:
                return True
            state = await connection.fetchval(
                "SELECT state FROM messages WHERE command_id = $1 FOR UPDATE", command.id)
            if state == "sending":  # killed during SMTP: the relay may have it already
                await self._finish(connection, command.id, "uncertain", reason=(
                    "interrupted during the SMTP transaction; not sent again to rule out "
                    "a duplicate"), event="failed")
        if state == "sending":
            self._deps.outbox.request()
        self._deps.metrics.duplicates.inc()
        return bool(state == "received")

    async def deliver(self, command_id: str) -> str:
        """Check, render, send and record one accepted command; returns its new state."""
        deps, now = self._deps, self._deps.clock()
        async with deps.pool.acquire() as connection:
            # Claim it: of a redelivered command and the retry worker only one goes on.
            claim = uuid.uuid4()
            row = await connection.fetchrow(
                "UPDATE messages SET state = 'claimed', claim = $3, updated_at = $2 "
                "WHERE command_id = $1 AND state = 'received' RETURNING command, attempts",
                command_id, now, claim)
            if row is None:
                return "taken"
            command = orjson.loads(row["command"])
            workspace = command["workspace"]
            reason = refusal(command, now, require_consent=deps.settings.require_consent,
                             suppression=await self._suppression(connection, workspace,
                                                                 command.get("to")),
                             consent=await self._consent(connection, workspace,
                                                         command["contact_id"]))
            hold_until = _hold_until(command)
            if reason == "consent_pending" and now < hold_until:
                # Double opt-in not confirmed yet: hold the mail; the confirmation releases
                # it, and at ``not_after`` (or after 7 days) it is suppressed.
                async with connection.transaction():
                    await connection.execute(
                        "UPDATE messages SET next_attempt_at = $2 WHERE command_id = $1",
                        command_id, hold_until)
                    await self._finish(connection, command_id, "held", reason=reason,
                                       event="deferred", extra={
                                           "next_attempt_at": format_timestamp(hold_until)})
                return await self._done("held")
            if reason is not None:
                async with connection.transaction():
                    await self._finish(connection, command_id, "suppressed", reason=reason)
                return await self._done("suppressed")
            try:
                raw, sender, template_version = await self._compose(connection, command_id,
                                                                    command)
            except RenderError as error:
                async with connection.transaction():
                    await self._finish(connection, command_id, "failed",
                                       reason=f"template {command['template']}: {error}")
                return await self._done("failed")
            still_ours = await connection.fetchval(
                "UPDATE messages SET state = 'sending', template_version = $2, "
                "message_id = $5, attempts = attempts + 1, updated_at = $3 "
                "WHERE command_id = $1 AND state = 'claimed' AND claim = $4 RETURNING true",
                command_id, template_version, now, claim, self._message_id(command_id))
            if not still_ours:  # taken over as abandoned while we were slow: theirs now
                return "taken"
        relay = deps.relays["marketing" if command["class"] == "marketing" else "transactional"]
        outcome = await relay.send(sender, str(parseaddr(command["to"])[1]), raw)
        async with deps.pool.acquire() as connection, connection.transaction():
            state = await self._record(connection, command_id, command, outcome,
                                       attempt=row["attempts"] + 1)
        return await self._done(state)

    async def _done(self, state: str) -> str:
        self._deps.metrics.outcomes.labels(state).inc()
        self._deps.outbox.request()
        if state in {"deferred", "held"} and self.retries is not None:
            self.retries.wake()
        return state

    async def _record(self, connection: Connection, command_id: str, command: dict[str, Any],
                      outcome: Outcome, *, attempt: int) -> str:
        settings, now = self._deps.settings, self._deps.clock()
        if outcome.kind == "sent":
            await self._finish(connection, command_id, "sent", outcome=outcome)
            return "sent"
        if outcome.kind == "permanent":
            hard = (outcome.status or "5").startswith("5")
            await self._finish(connection, command_id, "bounced", reason=outcome.response,
                               extra={"hard": hard}, outcome=outcome)
            if hard:
                await suppress(connection, command["workspace"], str(command["to"]),
                               "hard_bounce", outcome.response)
            return "bounced"
        if attempt > settings.retry_attempts:
            await self._finish(connection, command_id, "failed", reason=(
                f"gave up after {attempt} attempts: {outcome.response}"), outcome=outcome)
            return "failed"
        due = now + timedelta(seconds=settings.retry_base_seconds * 2 ** (attempt - 1))
        await connection.execute(
            "UPDATE messages SET next_attempt_at = $2 WHERE command_id = $1", command_id, due)
        await self._finish(connection, command_id, "deferred", reason=outcome.response,
                           extra={"next_attempt_at": format_timestamp(due), "attempt": attempt},
                           outcome=outcome)
        return "deferred"

    async def _compose(self, connection: Connection, command_id: str,
                       command: dict[str, Any]) -> tuple[bytes, str, int]:
        """The signed message bytes, the envelope sender and the template version."""
        deps, workspace = self._deps, command["workspace"]
        template = await deps.templates.latest(connection, workspace, command["template"])
        if template is None or template.kind != "email":
            raise RenderError(f"no template {command['template']!r}")
        layout = await deps.templates.latest(connection, workspace, template.layout) \
            if template.layout else None
        marketing = command["class"] == "marketing"
        tracked = template.tracking and command["class"] != "internal"
        contact_id = command["contact_id"]
        base = deps.settings.ingest_public_url.rstrip("/")
        context = dict(command.get("personalization") or {})
        unsubscribe = None
        if marketing:
            token = deps.signer.sign(EmailToken(TokenKind.UNSUBSCRIBE, workspace, contact_id,
                                                message_id=command_id, purpose="marketing"))
            unsubscribe = f"{base}/t/u/{token}"
            context["unsubscribe_url"] = unsubscribe
        rendered = deps.renderer.render(template, layout, context)
        html = rendered.html
        if tracked:
            def click(url: str, index: int) -> str:
                token = deps.signer.sign(EmailToken(TokenKind.CLICK, workspace, contact_id,
                                                    message_id=command_id, url=url,
                                                    link_id=str(index)))
                return f"{base}/t/c/{token}"

            html, _ = track_links(html, click)
            html = add_pixel(html, f"{base}/t/o/" + deps.signer.sign(EmailToken(
                TokenKind.OPEN, workspace, contact_id, message_id=command_id)))
        sender = self._sender(command)
        message = build(Envelope(message_id=self._message_id(command_id), sender=sender,
                                 to=str(command["to"]), subject=rendered.subject,
                                 date=deps.clock(), unsubscribe_url=unsubscribe),
                        html, rendered.text)
        raw = message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
        if self._dkim is not None:
            raw = sign(raw, self._dkim)
        return raw, str(parseaddr(sender)[1]), template.version

    def _message_id(self, command_id: str) -> str:
        """The Message-ID header (without brackets): bounces find the command by it."""
        return f"{command_id}@{self._id_domain}"

    def _sender(self, command: dict[str, Any]) -> str:
        """A fixed sender, the contact's owner (the seed documents want mail from the rep),
        or the workspace's sender, else the mailer's default sender."""
        sender = command.get("sender") or {}
        owner = (command.get("personalization") or {}).get("owner")
        if sender.get("kind") == "fixed" and sender.get("address"):
            return str(sender["address"])
        if sender.get("kind") == "owner" and isinstance(owner, str) and "@" in owner:
            return owner
        workspace = self._deps.workspaces.get(str(command.get("workspace")))
        if workspace is not None and workspace.sender:
            return workspace.sender
        return self._deps.settings.default_sender

    async def _finish(self, connection: Connection, command_id: str, state: str, *,
                      reason: str | None = None, outcome: Outcome | None = None,
                      extra: dict[str, Any] | None = None, event: str | None = None) -> None:
        """Record the state and put its email event into the outbox (one transaction)."""
        now = self._deps.clock()
        smtp_code = outcome.code if outcome is not None else None
        status = outcome.status if outcome is not None else None
        smtp_response = outcome.response if outcome is not None and state == "sent" else None
        row = await connection.fetchrow(
            "UPDATE messages SET state = $2, reason = $3, smtp_code = $4, status = $5, "
            "updated_at = $6, sent_at = CASE WHEN $2 = 'sent' THEN $6 ELSE sent_at END, "
            "next_attempt_at = CASE WHEN $2 IN ('deferred', 'held') THEN next_attempt_at END "
            "WHERE command_id = $1 RETURNING workspace, contact_id::text AS contact_id, "
            "template_id, class, to_address, message_id, attempts, command",
            command_id, state, reason, smtp_code, status, now)
        command = orjson.loads(row["command"])
        kind = event or state
        data = {"contact_id": row["contact_id"], "command_id": command_id,
                "template": row["template_id"], "class": row["class"], "to": row["to_address"],
                "origin": command.get("origin") or {}, "reason": reason,
                "smtp_code": smtp_code, "status": status, "message_id": row["message_id"],
                "smtp_response": smtp_response, **(extra or {})}
        envelope = Message(
            id=str(uuid.uuid5(_NAMESPACE, f"{command_id}\x1f{kind}\x1f{row['attempts']}")),
            type=f"email.{kind}.v1", workspace=row["workspace"], occurred_at=now,
            received_at=now, producer="mailer", data=data, correlation_id=command_id)
        await add_to_outbox(connection, OUTBOX_STREAM, [OutgoingMessage(
            self._deps.settings.topic("email-events"),
            f"{row['workspace']}:{row['contact_id']}".encode(), encode(envelope))])

    async def report(self, workspace: str, bounces: Sequence[Bounce]) -> list[dict[str, Any]]:
        """Bounces and complaints reported after sending (a DSN, a provider webhook): the
        message becomes ``bounced`` with its event; hard bounces and complaints suppress the
        address. Delays and deliveries are only acknowledged."""
        results: list[dict[str, Any]] = []
        async with self._deps.pool.acquire() as connection, connection.transaction():
            for bounce in bounces:
                if bounce.kind in {"delayed", "delivered"}:
                    results.append({"recipient": bounce.recipient, "action": "ignored"})
                    continue
                row = await connection.fetchrow(
                    "SELECT command_id::text AS command_id, state FROM messages "
                    "WHERE workspace = $1 AND message_id = $2", workspace, bounce.message_id) \
                    if bounce.message_id else None
                if row is None:
                    row = await connection.fetchrow(
                        "SELECT command_id::text AS command_id, state FROM messages "
                        "WHERE workspace = $1 AND lower(to_address) = $2 "
                        "ORDER BY created_at DESC LIMIT 1", workspace, bounce.recipient)
                complaint = bounce.kind == "complaint"
                reason = "complaint" if complaint else (bounce.diagnostic or bounce.status)
                if complaint or bounce.hard:
                    await suppress(connection, workspace, bounce.recipient,
                                   "complaint" if complaint else "hard_bounce", reason)
                if row is not None and row["state"] in {"sent", "uncertain", "deferred"}:
                    await self._finish(connection, row["command_id"], "bounced", reason=reason,
                                       outcome=Outcome("permanent", None, bounce.status,
                                                       bounce.diagnostic or ""),
                                       extra={"hard": bounce.hard, "complaint": complaint})
                    self._deps.metrics.outcomes.labels("bounced").inc()
                results.append({"recipient": bounce.recipient, "action": bounce.kind,
                                "suppressed": complaint or bounce.hard,
                                "command_id": row["command_id"] if row else None})
        self._deps.outbox.request()
        return results

    @staticmethod
    async def _suppression(connection: Connection, workspace: str, to: object) -> str | None:
        if not isinstance(to, str):
            return None
        address = parseaddr(to)[1].lower()
        reason: str | None = await connection.fetchval(
            "SELECT reason FROM suppressions WHERE workspace = $1 AND address = ANY($2::text[]) "
            "ORDER BY reason = 'unsubscribed' LIMIT 1", workspace,
            [address, address_digest(address)])
        return reason

    @staticmethod
    async def _consent(connection: Connection, workspace: str, contact_id: str) -> str | None:
        action: str | None = await connection.fetchval(
            "SELECT action FROM consent_log WHERE workspace = $1 AND contact_id = $2 "
            "AND purpose = 'marketing' ORDER BY id DESC LIMIT 1", workspace, contact_id)
        return action


def address_digest(address: str) -> str:
    """How an erased person's address stays on the suppression list without being kept."""
    return "sha256:" + hashlib.sha256(parseaddr(address)[1].strip().lower().encode()).hexdigest()


def _hold_until(command: dict[str, Any]) -> datetime:
    not_after = command.get("not_after")
    if isinstance(not_after, str):
        return datetime.fromisoformat(not_after)
    return datetime.fromisoformat(str(command["received_at"])) + HOLD_FOR


async def release_held(connection: Connection, workspace: str, contact_id: str) -> list[str]:
    """Mail held for a double opt-in: back to ``received`` once it is confirmed."""
    rows = await connection.fetch(
        "UPDATE messages SET state = 'received', next_attempt_at = NULL WHERE workspace = $1 "
        "AND contact_id = $2 AND state = 'held' RETURNING command_id::text AS command_id",
        workspace, contact_id)
    return [r["command_id"] for r in rows]


async def suppress(connection: Connection, workspace: str, address: str, reason: str,
                   detail: str | None = None) -> None:
    """Put an address on the suppression list (a later reason does not replace an earlier
    one, except that a hard bounce or complaint outranks an unsubscribe)."""
    await connection.execute(
        "INSERT INTO suppressions (workspace, address, reason, detail) VALUES ($1, $2, $3, $4) "
        "ON CONFLICT (workspace, address) DO UPDATE SET reason = EXCLUDED.reason, "
        "detail = EXCLUDED.detail, created_at = now() "
        "WHERE suppressions.reason NOT IN ('hard_bounce', 'complaint', 'erased')",
        workspace, address if address.startswith("sha256:") else parseaddr(address)[1].lower(),
        reason, detail)


class RetryWorker(DueTimer):
    """Sends deferred messages when their back-off has passed, and messages a killed mailer
    left accepted but unsent. ``FOR UPDATE SKIP LOCKED`` gives each row to one process."""

    def __init__(self, deps: Deps, delivery: Delivery) -> None:
        self._abandoned = timedelta(seconds=deps.settings.abandoned_after_seconds)
        super().__init__(deps.clock, batch=50, max_sleep=self._abandoned.total_seconds())
        self._deps = deps
        self._delivery = delivery

    async def next_due(self) -> datetime | None:
        async with self._deps.pool.acquire() as connection:
            due: datetime | None = await connection.fetchval(
                "SELECT min(next_attempt_at) FROM messages WHERE state IN ('deferred', 'held')")
        return due

    async def run_due(self) -> int:
        now = self._deps.clock()
        async with self._deps.pool.acquire() as connection, connection.transaction():
            rows = await connection.fetch(
                "UPDATE messages SET state = 'received', updated_at = $1 WHERE command_id IN ("
                "SELECT command_id FROM messages WHERE (state IN ('deferred', 'held') AND "
                "next_attempt_at <= $1) OR (state IN ('received', 'claimed') AND updated_at < $2) "
                "ORDER BY updated_at LIMIT 50 FOR UPDATE SKIP LOCKED) "
                "RETURNING command_id::text AS command_id", now, now - self._abandoned)
        for row in rows:
            await self._delivery.deliver(row["command_id"])
        return len(rows)
