"""Sending each email command exactly once, and saying what happened.

Per command (its envelope id is the idempotency key, the ``messages`` primary key):

1. ``received`` is recorded with the command (a redelivered command finds its row and stops);
2. the command is claimed (``received`` → ``claimed``, with a claim token, so of two hands - a
   redelivered command, the retry worker - only one goes on) and the policy is checked
   (suppression, consent, expiry); a refusal ends here as ``suppressed`` or ``held``;
3. the template is rendered and the message signed; a template bug ends as ``failed``;
4. ``sending`` is committed, then the SMTP transaction runs, then ``sent`` (or ``deferred`` /
   ``bounced``) is committed together with the email event in the outbox.

A mailer killed between 4's first commit and its last leaves ``sending``: the redelivered
command then does not send again (the relay may have accepted it) and records ``uncertain``.
A mailer killed before 4 leaves ``received`` or ``claimed``: the retry worker picks such rows
up after a grace period.

The work is batched, not the guarantee (ADR 0015): a fetched batch of commands is recorded in
one transaction, and a delivery run moves its commands through the steps above in *waves*:
when the run needs more, a few commands are claimed and checked (one UPDATE, one SELECT),
then one statement - one commit - records the outcomes of finished SMTP transactions and of
refusals with their events in the outbox and marks the next messages ``sending``. At most one
message per SMTP
connection is ``sending`` at any moment (:class:`SendingWindow`): a message keeps its place
from the commit that marks it ``sending`` to the commit that records its outcome, so a kill
leaves at most that many ``uncertain`` - the window of ADR 0012, one SMTP transaction long per
connection. The policy is checked when a message is claimed, a few messages before its turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson

from leadwerk_mailer.config import WorkspaceMail
from leadwerk_mailer.domain.bounces import Bounce
from leadwerk_mailer.domain.message import DkimSigner, Envelope, add_pixel, build, track_links
from leadwerk_mailer.domain.policy import refusal, split_address
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
#: While a delivery run goes on, its email events are published at most this often.
PUBLISH_EVERY = 0.2
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


@dataclass(frozen=True)
class Finish:
    """A state to record for a message, with the email event about it (one transaction)."""

    command_id: str
    state: str
    reason: str | None = None
    outcome: Outcome | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: The event type's verb when it is not the state (``held`` → ``deferred``).
    event: str | None = None
    next_attempt_at: datetime | None = None


@dataclass
class _Job:
    """A claimed command on its way through one delivery run."""

    command_id: str
    command: dict[str, Any]
    #: As in its row: attempts so far (this one included once it is ``sending``), the
    #: Message-ID of the last one. The email events are written from them.
    attempts: int
    message_id: str | None
    recipient: str = ""  # the address of ``to``, if it is a string
    raw: bytes = b""
    sender: str = ""
    template_version: int = 0

    def facts(self) -> dict[str, Any]:
        """What an email event says about the message, as its row holds it (the row's contact
        is checked when the event is written)."""
        command = self.command
        return {"workspace": command["workspace"],
                "contact_id": str(uuid.UUID(str(command["contact_id"]))),
                "template_id": str(command["template"]), "class": str(command["class"]),
                "to_address": command["to"] if isinstance(command.get("to"), str) else None,
                "message_id": self.message_id, "attempts": self.attempts,
                "origin": command.get("origin")}


class SendingWindow:
    """How many messages of this process may be ``sending`` at once: one per SMTP connection.
    Shared by every delivery run (commands, retries, released holds)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = size
        self._freed = asyncio.Event()

    @property
    def free(self) -> int:
        return self._free

    def take(self, wanted: int) -> int:
        """Up to ``wanted`` places; how many were free."""
        taken = max(0, min(wanted, self._free))
        self._free -= taken
        return taken

    def give(self, count: int) -> None:
        if count:
            self._free += count
            self._freed.set()

    async def freed(self) -> None:
        """Until some run gives places back."""
        self._freed.clear()
        await self._freed.wait()


@dataclass
class _Run:
    """One :meth:`Delivery.deliver_many`: where each of its commands is."""

    waiting: deque[str]  # accepted, not claimed yet
    states: dict[str, str]
    claim: uuid.UUID = field(default_factory=uuid.uuid4)
    to_compose: deque[_Job] = field(default_factory=deque)  # claimed and allowed
    composing: int = 0  # being rendered and signed right now
    composed: deque[_Job] = field(default_factory=deque)  # rendered and signed
    decided: list[tuple[_Job, Finish]] = field(default_factory=list)  # render failed
    sending: dict[asyncio.Task[Outcome], _Job] = field(default_factory=dict)
    sent: list[tuple[_Job, Outcome]] = field(default_factory=list)  # to record
    places: int = 0  # window places held: one per message sending or sent, not recorded
    #: Set when a message was composed or an SMTP transaction ended (the wave loop waits).
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set when there is something to compose (the composer waits).
    work: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.to_compose or self.composing or self.composed
                    or self.decided or self.sending or self.sent)

    def harvest(self) -> None:
        """Move finished SMTP transactions to ``sent``. One that failed unexpectedly raises
        (after the others were moved): its message stays ``sending`` and so becomes
        ``uncertain``, never sent twice."""
        failed: BaseException | None = None
        for task in [t for t in self.sending if t.done()]:
            job = self.sending.pop(task)
            if task.cancelled() or task.exception() is not None:
                failed = failed or task.exception() or asyncio.CancelledError()
            else:
                self.sent.append((job, task.result()))
        if failed is not None:
            raise failed

    def start(self, job: _Job, sending: Callable[[_Job], Coroutine[Any, Any, Outcome]]) -> None:
        task = asyncio.create_task(sending(job))
        task.add_done_callback(lambda _: self.progress.set())
        self.sending[task] = job


class Delivery:
    def __init__(self, deps: Deps) -> None:
        self._deps = deps
        key = deps.settings.dkim_key()
        self._dkim = DkimSigner(deps.settings.dkim_domain, deps.settings.dkim_selector, key) \
            if key and deps.settings.dkim_domain else None
        _, sender = split_address(deps.settings.default_sender)
        self._id_domain = sender.rpartition("@")[2] or "leadwerk.localhost"
        self._window = SendingWindow(deps.settings.smtp_pool_size)
        #: Messages ready to start that make a wave worth its commit while others are sending.
        self._gather = max(1, deps.settings.smtp_pool_size // 2)
        #: Claimed per wave when a run's backlog runs short: enough to keep the window full.
        self._claim_size = 2 * deps.settings.smtp_pool_size
        self._publish_due = 0.0
        self._grace = timedelta(seconds=deps.settings.consent_grace_seconds)
        #: Woken when a message is deferred or held, so its retry is timed from now.
        self.retries: DueTimer | None = None

    async def accept_many(self, commands: Sequence[Message]) -> list[str]:
        """Record each command once, all in one transaction; returns the ids to deliver: the
        new ones and those found still ``received``. A command found ``sending`` was
        interrupted during its SMTP transaction: it becomes ``uncertain``, not sent again."""
        unique: dict[str, Message] = {}
        for command in commands:
            unique.setdefault(command.id, command)
        if not unique:
            return []
        now = self._deps.clock()
        new = list(unique.values())
        async with self._deps.pool.acquire() as connection, connection.transaction():
            inserted = {r["command_id"] for r in await connection.fetch(
                "INSERT INTO messages (command_id, workspace, contact_id, template_id, class, "
                "to_address, state, command, created_at, updated_at) SELECT i, w, c, t, k, a, "
                "'received', d::jsonb, $8, $8 FROM unnest($1::uuid[], $2::text[], $3::uuid[], "
                "$4::text[], $5::text[], $6::text[], $7::text[]) AS u(i, w, c, t, k, a, d) "
                "ON CONFLICT DO NOTHING RETURNING command_id::text AS command_id",
                [c.id for c in new], [c.workspace for c in new],
                [c.data["contact_id"] for c in new], [str(c.data["template"]) for c in new],
                [str(c.data["class"]) for c in new],
                [c.data.get("to") if isinstance(c.data.get("to"), str) else None for c in new],
                [orjson.dumps({**c.data, "workspace": c.workspace,
                               "received_at": format_timestamp(now)}).decode() for c in new],
                now)}
            known = [c.id for c in new if c.id not in inserted]
            states = {r["command_id"]: r["state"] for r in await connection.fetch(
                "SELECT command_id::text AS command_id, state FROM messages "
                "WHERE command_id = ANY($1::uuid[]) FOR UPDATE", known)} if known else {}
            interrupted = [Finish(c, "uncertain", reason=(
                "interrupted during the SMTP transaction; not sent again to rule out a "
                "duplicate"), event="failed") for c, state in states.items() if state == "sending"]
            await self._finish_many(connection, interrupted)
        if interrupted:
            self._deps.outbox.request()
        self._deps.metrics.duplicates.inc(len(known) + len(commands) - len(unique))
        return [c.id for c in new if c.id in inserted or states.get(c.id) == "received"]

    async def deliver_many(self, command_ids: Sequence[str]) -> dict[str, str]:
        """Claim, check, render, send and record accepted commands; returns each one's new
        state (``taken`` when another hand had it). Two tasks share the work: the composer
        renders and signs one message at a time (yielding between the steps, so SMTP
        answers are read meanwhile), and this one runs the waves, each recording whatever
        SMTP transactions ended while the last wave was at the database."""
        run = _Run(deque(dict.fromkeys(command_ids)), dict.fromkeys(command_ids, "taken"))
        if not run.busy:
            return run.states
        async with self._deps.pool.acquire() as connection:
            composer = asyncio.create_task(self._composer(run))
            try:
                while run.busy:
                    if composer.done():
                        composer.result()  # it failed: so does the run
                    await self._step(connection, run)
            finally:
                composer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await composer
                await self._wind_down(connection, run)
        self._deps.outbox.request()
        return run.states

    def _publish_soon(self) -> None:
        """Ask the outbox relay to publish, at most every ``PUBLISH_EVERY`` seconds during a
        run (each publication is a transaction of its own; the rows are safe meanwhile)."""
        now = time.monotonic()
        if now >= self._publish_due:
            self._publish_due = now + PUBLISH_EVERY
            self._deps.outbox.request()

    async def _step(self, connection: Connection, run: _Run) -> None:
        run.harvest()
        reusable = len(run.sent)  # the places of sends recorded in this wave go on to new ones
        launchable = min(len(run.composed), reusable + self._window.free)
        backlog = len(run.to_compose) + run.composing + len(run.composed)
        claim_now = bool(run.waiting) and backlog < self._claim_size // 2
        composer_idle = not run.to_compose and not run.composing
        # A wave costs a commit: gather a few messages to start unless connections are idle,
        # and record outcomes alone only when nothing is coming from the composer.
        if launchable >= self._gather or (launchable and not run.sending) or claim_now \
                or (composer_idle and (run.sent or run.decided or launchable)):
            extra = self._window.take(launchable - reusable)
            run.places += extra
            launch = [run.composed.popleft() for _ in range(launchable)]
            claim = [run.waiting.popleft()
                     for _ in range(min(len(run.waiting), self._claim_size))] if claim_now else []
            started = await self._wave(connection, run, launch, claim)
            surplus = reusable + extra - len(started)
            run.places -= surplus
            self._window.give(surplus)
            for job in started:
                run.start(job, self._send)
            run.work.set()
        elif run.composed and not run.sending and not run.sent:
            await self._window.freed()  # other runs hold every place
        else:
            run.progress.clear()
            await run.progress.wait()

    async def _composer(self, run: _Run) -> None:
        """Renders and signs claimed messages, keeping a window's worth ready."""
        try:
            while True:
                if run.to_compose and len(run.composed) < self._window.size:
                    run.composing = 1
                    await self._prepare(run, run.to_compose.popleft())
                    run.composing = 0
                    run.progress.set()
                    await asyncio.sleep(0)
                else:
                    run.work.clear()
                    await run.work.wait()
        finally:
            run.progress.set()  # the wave loop sees the end (or the error)

    async def _wave(self, connection: Connection, run: _Run, launch: list[_Job],
                    claim: list[str]) -> list[_Job]:
        """Claim and check ``claim``; then, in one statement (one commit), record finished
        sends, failed renders and refusals with their events, and mark ``launch``
        ``sending`` (those still claimed by this run)."""
        records = [(job, self._outcome(job, outcome)) for job, outcome in run.sent]
        decided = len(run.decided)  # the composer may add more while this wave waits
        records += run.decided[:decided]
        allowed: list[_Job] = []
        if claim:
            allowed, refused = await self._claim(connection, run.claim, claim)
            records += refused
        hard = [(job, f) for job, f in records if f.state == "bounced" and f.extra["hard"]]
        # A hard bounce suppresses the address in the same transaction (rare: only then one).
        async with connection.transaction() if hard else contextlib.nullcontext():
            for job, finish in hard:
                await suppress(connection, job.command["workspace"], job.recipient,
                               "hard_bounce", finish.reason)
            started, missing = await self._record(connection, run.claim, records, launch)
            if missing:  # merged or erased meanwhile: written from the row as it is now
                async with connection.transaction():
                    await self._finish_many(connection, missing)
        del run.decided[:decided]
        run.sent.clear()
        run.to_compose.extend(allowed)
        if held := [f.command_id for _, f in records if f.state == "held"]:
            # A consent logged after this claim read the log found nothing held to release:
            # those messages are checked again now.
            run.waiting.extend(await release_changed(connection, held))
        for _, finish in records:
            run.states[finish.command_id] = finish.state
            self._deps.metrics.outcomes.labels(finish.state).inc()
        for job in started:
            run.states[job.command_id] = "sending"
            job.attempts += 1
            job.message_id = self._message_id(job.command_id)
        if records:
            self._publish_soon()
        if self.retries is not None and any(f.state in {"deferred", "held"} for _, f in records):
            self.retries.wake()
        return started

    async def _record(self, connection: Connection, claim: uuid.UUID,
                      records: list[tuple[_Job, Finish]],
                      launch: list[_Job]) -> tuple[list[_Job], list[Finish]]:
        """One statement: the states of ``records`` with their events in the outbox (for
        rows still of the contact the event names), and ``launch`` marked ``sending`` where
        this run still holds the claim (a slow run may have lost one to the retry worker,
        which now delivers it). Returns the jobs started and the records left out."""
        now = self._deps.clock()
        events = [self._outgoing(_event(finish, {"command_id": job.command_id, **job.facts()},
                                        now)) for job, finish in records]
        row = await connection.fetchrow(
            "WITH finished AS (UPDATE messages m SET state = u.state, reason = u.reason, "
            "smtp_code = u.code, status = u.status, updated_at = $1, "
            "sent_at = CASE WHEN u.state = 'sent' THEN $1 ELSE m.sent_at END, "
            "next_attempt_at = CASE WHEN u.state IN ('deferred', 'held') "
            "THEN u.next_attempt_at END FROM unnest($2::uuid[], $3::uuid[], $4::text[], "
            "$5::text[], $6::int[], $7::text[], $8::timestamptz[]) "
            "AS u(id, contact_id, state, reason, code, status, next_attempt_at) "
            "WHERE m.command_id = u.id AND m.contact_id = u.contact_id "
            "RETURNING m.command_id), "
            # The platform's outbox rows (leadwerk_platform.outbox), in the order given.
            "events AS (INSERT INTO outbox (stream, topic, key, value) "
            "SELECT $9, $10, e.key, e.value FROM unnest($2::uuid[], $11::bytea[], $12::bytea[]) "
            "WITH ORDINALITY AS e(id, key, value, n) "
            "WHERE e.id IN (SELECT command_id FROM finished) ORDER BY e.n), "
            "started AS (UPDATE messages m SET state = 'sending', template_version = s.version, "
            "message_id = s.message_id, attempts = m.attempts + 1, updated_at = $1 "
            "FROM unnest($13::uuid[], $14::int[], $15::text[]) AS s(id, version, message_id) "
            "WHERE m.command_id = s.id AND m.state = 'claimed' AND m.claim = $16 "
            "RETURNING m.command_id) "
            "SELECT ARRAY(SELECT command_id::text FROM finished) AS finished, "
            "ARRAY(SELECT command_id::text FROM started) AS started",
            now, [job.command_id for job, _ in records],
            [job.facts()["contact_id"] for job, _ in records],
            [f.state for _, f in records], [f.reason for _, f in records],
            [f.outcome.code if f.outcome is not None else None for _, f in records],
            [f.outcome.status if f.outcome is not None else None for _, f in records],
            [f.next_attempt_at for _, f in records], OUTBOX_STREAM,
            self._deps.settings.topic("email-events"), [e.key for e in events],
            [e.value for e in events],
            [j.command_id for j in launch], [j.template_version for j in launch],
            [self._message_id(j.command_id) for j in launch], claim)
        finished, ours = set(row["finished"]), set(row["started"])
        return ([j for j in launch if j.command_id in ours],
                [f for _, f in records if f.command_id not in finished])

    async def _wind_down(self, connection: Connection, run: _Run) -> None:
        """After the last wave, or an error: SMTP transactions in flight end, and what they
        did is recorded if the database lets us (else those messages stay ``sending``)."""
        try:
            if run.sending:
                await asyncio.wait(run.sending)
                with contextlib.suppress(Exception):
                    run.harvest()
            if (run.sent or run.decided) and not connection.is_closed():
                await self._wave(connection, run, [], [])
        except Exception:
            logger.exception("could not record %d sent messages; they stay 'sending'",
                             len(run.sent))
        finally:
            self._window.give(run.places)
            run.places = 0

    async def _claim(self, connection: Connection, claim: uuid.UUID,
                     command_ids: list[str]) -> tuple[list[_Job], list[tuple[_Job, Finish]]]:
        """Claim the commands still ``received`` and check the policy for them: the jobs to
        render, and the refusals (suppressed, or held for a pending double opt-in)."""
        now = self._deps.clock()
        rows = await connection.fetch(
            "UPDATE messages SET state = 'claimed', claim = $2, updated_at = $3 "
            "WHERE command_id = ANY($1::uuid[]) AND state = 'received' "
            "RETURNING command_id::text AS command_id, command, attempts, message_id",
            command_ids, claim, now)
        jobs = [_Job(r["command_id"], command, r["attempts"], r["message_id"],
                     split_address(to)[1] if isinstance(to := command.get("to"), str) else "")
                for r in rows for command in [orjson.loads(r["command"])]]
        if not jobs:
            return [], []
        addresses = [j.recipient.lower() if j.recipient else None for j in jobs]
        verdicts = await connection.fetch(
            "SELECT (SELECT reason FROM suppressions s WHERE s.workspace = q.workspace "
            "AND s.address IN (q.address, q.digest) ORDER BY s.reason = 'unsubscribed' "
            "LIMIT 1) AS suppression, (SELECT action FROM consent_log c "
            "WHERE c.workspace = q.workspace AND c.contact_id = q.contact_id "
            "AND c.purpose = 'marketing' ORDER BY c.id DESC LIMIT 1) AS consent "
            "FROM unnest($1::text[], $2::text[], $3::text[], $4::uuid[]) WITH ORDINALITY "
            "AS q(workspace, address, digest, contact_id, n) ORDER BY q.n",
            [j.command["workspace"] for j in jobs], addresses,
            [address_digest(a) if a is not None else None for a in addresses],
            [j.command["contact_id"] for j in jobs])
        allowed: list[_Job] = []
        refused: list[tuple[_Job, Finish]] = []
        for job, verdict in zip(jobs, verdicts, strict=True):
            reason = refusal(job.command, now, require_consent=self._deps.settings.require_consent,
                             suppression=verdict["suppression"], consent=verdict["consent"])
            hold_until = _hold_until(job.command, reason, verdict["consent"], self._grace)
            if reason is not None and hold_until is not None and now < hold_until:
                # Double opt-in not confirmed yet (or no consent on record yet): hold the
                # mail; the consent releases it, and at ``not_after`` (or after 7 days; with
                # no consent at all after the grace period) it is checked again.
                held = "consent_unknown" if verdict["consent"] is None else reason
                refused.append((job, Finish(
                    job.command_id, "held", reason=held, event="deferred",
                    next_attempt_at=hold_until,
                    extra={"next_attempt_at": format_timestamp(hold_until)})))
            elif reason is not None:
                refused.append((job, Finish(job.command_id, "suppressed", reason=reason)))
            else:
                allowed.append(job)
        return allowed, refused

    async def _prepare(self, run: _Run, job: _Job) -> None:
        """Render and sign one claimed message (a template bug or an unusable address: it
        is recorded as ``failed`` in the next wave)."""
        try:
            job.raw, job.sender, job.template_version = await self._compose(job)
        except (RenderError, ValueError) as error:
            reason = f"template {job.command['template']}: {error}" \
                if isinstance(error, RenderError) else f"not sendable: {error}"
            run.decided.append((job, Finish(job.command_id, "failed", reason=reason)))
        else:
            run.composed.append(job)

    async def _send(self, job: _Job) -> Outcome:
        relay = self._deps.relays["marketing" if job.command["class"] == "marketing"
                                  else "transactional"]
        return await relay.send(job.sender, job.recipient, job.raw)

    def _outcome(self, job: _Job, outcome: Outcome) -> Finish:
        """What an SMTP answer means for the message: sent, bounced (a 5xx: the address is
        suppressed), deferred for a retry with exponential back-off, or failed at last."""
        settings = self._deps.settings
        if outcome.kind == "sent":
            return Finish(job.command_id, "sent", outcome=outcome)
        if outcome.kind == "permanent":
            return Finish(job.command_id, "bounced", reason=outcome.response, outcome=outcome,
                          extra={"hard": (outcome.status or "5").startswith("5")})
        attempt = job.attempts  # this one included: it was sent
        if attempt > settings.retry_attempts:
            return Finish(job.command_id, "failed", outcome=outcome, reason=(
                f"gave up after {attempt} attempts: {outcome.response}"))
        due = self._deps.clock() + timedelta(
            seconds=settings.retry_base_seconds * 2 ** (attempt - 1))
        return Finish(job.command_id, "deferred", reason=outcome.response, outcome=outcome,
                      next_attempt_at=due, extra={"next_attempt_at": format_timestamp(due),
                                                  "attempt": attempt})

    async def _compose(self, job: _Job) -> tuple[bytes, str, int]:
        """The signed message bytes, the envelope sender and the template version."""
        deps, command, command_id = self._deps, job.command, job.command_id
        workspace = command["workspace"]
        # The pool, not a connection: the store asks the database only when its cache is
        # stale, and the wave loop's connection may be busy.
        template = await deps.templates.latest(deps.pool, workspace, command["template"])
        if template is None or template.kind != "email":
            raise RenderError(f"no template {command['template']!r}")
        layout = await deps.templates.latest(deps.pool, workspace, template.layout) \
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
        await asyncio.sleep(0)
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
        raw = build(Envelope(message_id=self._message_id(command_id), sender=sender,
                             to=str(command["to"]), subject=rendered.subject,
                             date=deps.clock(), unsubscribe_url=unsubscribe),
                    html, rendered.text)
        if self._dkim is not None:
            await asyncio.sleep(0)  # SMTP answers that came in meanwhile first
            raw = self._dkim.sign(raw)
        return raw, split_address(sender)[1], template.version

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

    async def _finish_many(self, connection: Connection, finishes: Sequence[Finish]) -> None:
        """Record the states and put their email events into the outbox (the caller's
        transaction). A message erased meanwhile has no row any more and no event."""
        if not finishes:
            return
        now = self._deps.clock()
        rows = await connection.fetch(
            "UPDATE messages m SET state = u.state, reason = u.reason, smtp_code = u.code, "
            "status = u.status, updated_at = $7, "
            "sent_at = CASE WHEN u.state = 'sent' THEN $7 ELSE m.sent_at END, "
            "next_attempt_at = CASE WHEN u.state IN ('deferred', 'held') "
            "THEN u.next_attempt_at END FROM unnest($1::uuid[], $2::text[], $3::text[], "
            "$4::int[], $5::text[], $6::timestamptz[]) "
            "AS u(id, state, reason, code, status, next_attempt_at) WHERE m.command_id = u.id "
            "RETURNING m.command_id::text AS command_id, m.workspace, "
            "m.contact_id::text AS contact_id, m.template_id, m.class, m.to_address, "
            "m.message_id, m.attempts, m.command->'origin' AS origin",
            [f.command_id for f in finishes], [f.state for f in finishes],
            [f.reason for f in finishes],
            [f.outcome.code if f.outcome is not None else None for f in finishes],
            [f.outcome.status if f.outcome is not None else None for f in finishes],
            [f.next_attempt_at for f in finishes], now)
        found = {r["command_id"]: r for r in rows}
        events = [self._outgoing(_event(finish, {**row, "origin": orjson.loads(row["origin"])
                                                 if row["origin"] else None}, now))
                  for finish in finishes if (row := found.get(finish.command_id)) is not None]
        await add_to_outbox(connection, OUTBOX_STREAM, events)

    def _outgoing(self, event: Message) -> OutgoingMessage:
        """An email event for the outbox, keyed by its contact like every contact stream."""
        return OutgoingMessage(self._deps.settings.topic("email-events"),
                               f"{event.workspace}:{event.data['contact_id']}".encode(),
                               encode(event))

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
                    await self._finish_many(connection, [Finish(
                        row["command_id"], "bounced", reason=reason,
                        outcome=Outcome("permanent", None, bounce.status, bounce.diagnostic or ""),
                        extra={"hard": bounce.hard, "complaint": complaint})])
                    self._deps.metrics.outcomes.labels("bounced").inc()
                results.append({"recipient": bounce.recipient, "action": bounce.kind,
                                "suppressed": complaint or bounce.hard,
                                "command_id": row["command_id"] if row else None})
        self._deps.outbox.request()
        return results


def _event(finish: Finish, row: Mapping[str, Any], now: datetime) -> Message:
    """The email event about a recorded state, from the message's row (or the same facts
    known to the run: :meth:`_Job.facts`). Its id: command, kind and attempt, so a repeated
    recording deduplicates downstream."""
    outcome, kind = finish.outcome, finish.event or finish.state
    data = {"contact_id": row["contact_id"], "command_id": finish.command_id,
            "template": row["template_id"], "class": row["class"], "to": row["to_address"],
            "origin": row["origin"] or {},
            "reason": finish.reason,
            "smtp_code": outcome.code if outcome is not None else None,
            "status": outcome.status if outcome is not None else None,
            "message_id": row["message_id"],
            "smtp_response": outcome.response if outcome is not None and finish.state == "sent"
            else None, **finish.extra}
    return Message(
        id=str(uuid.uuid5(_NAMESPACE, f"{finish.command_id}\x1f{kind}\x1f{row['attempts']}")),
        type=f"email.{kind}.v1", workspace=row["workspace"], occurred_at=now,
        received_at=now, producer="mailer", data=data, correlation_id=finish.command_id)


def address_digest(address: str) -> str:
    """How an erased person's address stays on the suppression list without being kept."""
    return "sha256:" + hashlib.sha256(split_address(address)[1].strip().lower().encode()
                                      ).hexdigest()


def _hold_until(command: dict[str, Any], reason: str | None, consent: str | None,
                grace: timedelta) -> datetime | None:
    """Until when a refused command is held for a consent that may still come (``None``:
    it is not): a pending double opt-in until ``not_after`` or 7 days, a contact with no
    consent on record for the grace period."""
    received = datetime.fromisoformat(str(command["received_at"]))
    not_after = command.get("not_after")
    until = datetime.fromisoformat(not_after) if isinstance(not_after, str) else None
    if reason == "consent_pending":
        return until or received + HOLD_FOR
    if reason == "no_consent" and consent is None and grace:
        return min(until, received + grace) if until else received + grace
    return None


async def release_held(connection: Connection, workspace: str, contact_id: str) -> list[str]:
    """Mail held for a consent: back to ``received`` (to be checked again) once the contact's
    consent changes."""
    rows = await connection.fetch(
        "UPDATE messages SET state = 'received', next_attempt_at = NULL WHERE workspace = $1 "
        "AND contact_id = $2 AND state = 'held' RETURNING command_id::text AS command_id",
        workspace, contact_id)
    return [r["command_id"] for r in rows]


async def release_changed(connection: Connection, command_ids: list[str]) -> list[str]:
    """Of the messages just recorded ``held``, those whose contact's marketing consent has
    changed since the check: back to ``received``, to be checked again. With
    :func:`release_held` (which runs after each consent is logged) every held message is
    released by one of the two, however the consent and the check interleave."""
    rows = await connection.fetch(
        "UPDATE messages m SET state = 'received', next_attempt_at = NULL "
        "WHERE m.command_id = ANY($1::uuid[]) AND m.state = 'held' AND (SELECT c.action "
        "FROM consent_log c WHERE c.workspace = m.workspace AND c.contact_id = m.contact_id "
        "AND c.purpose = 'marketing' ORDER BY c.id DESC LIMIT 1) IS DISTINCT FROM "
        "CASE WHEN m.reason = 'consent_pending' THEN 'pending' END "
        "RETURNING m.command_id::text AS command_id", command_ids)
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
        workspace, address if address.startswith("sha256:") else split_address(address)[1].lower(),
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
        await self._delivery.deliver_many([r["command_id"] for r in rows])
        return len(rows)
