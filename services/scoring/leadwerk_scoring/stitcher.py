"""The stitcher: tracking events → contact events (identity graph, timeline, profile).

One transaction per batch holds the "processed" records, every identity and timeline write
and the outgoing contact events (outbox); the outbox is flushed before the batch is
acknowledged. A redelivered event finds its "processed" record and only the flush repeats.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from leadwerk_platform.envelope import Envelope
from leadwerk_platform.kafka.producer import OutgoingMessage
from leadwerk_platform.kafka.streams import Rejected, StreamMessage
from leadwerk_platform.outbox import OutboxRelay, add_to_outbox
from leadwerk_scoring.adapters import identities as store
from leadwerk_scoring.adapters.messages import CONTACT_EVENTS, contact_message
from leadwerk_scoring.domain.identity import Identifier, claims_from, resolve
from leadwerk_scoring.domain.profile import (
    combine_touches,
    event_kind,
    flatten,
    merge_traits,
    on_website,
    session_for,
    touch_of,
    traits_of,
)
from leadwerk_scoring.runtime import Deps

logger = logging.getLogger(__name__)

CONSUMER = "stitcher"
OUTBOX_STREAM = "stitcher"
#: Fields of an event's data that describe what happened (flattened into the activity).
_ACTIVITY_FIELDS = ("properties", "campaign", "traits", "consents")


def activity_properties(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """The flat view of an event that scoring rules and journeys match on."""
    view: dict[str, Any] = {}
    for name in _ACTIVITY_FIELDS:
        value = data.get(name)
        if isinstance(value, dict):
            view.update(flatten(value, f"{name}."))
    context = data.get("context")
    page = context.get("page") if isinstance(context, dict) else None
    if isinstance(page, dict):
        view.update(flatten(page, "page."))
    for name, value in data.items():
        if name not in {*_ACTIVITY_FIELDS, "context", "client", "message_id", "user_id",
                        "anonymous_id", "original_timestamp"} and not isinstance(value, dict):
            view[name] = value
    if kind not in {"identify", "form_submitted"}:
        view.pop("traits.email", None)  # only identity events state who someone is
    return view


class Stitcher:
    """The batch handler of the ``scoring.stitcher`` stream processor."""

    def __init__(self, deps: Deps, relay: OutboxRelay) -> None:
        self._settings = deps.settings
        self._pool = deps.pool
        self._relay = relay
        self._metrics = deps.metrics
        self._declared = deps.declared
        self._clock = deps.clock
        self._session_timeout = timedelta(minutes=deps.settings.session_timeout_minutes)

    async def __call__(self, batch: Sequence[StreamMessage]) -> list[Rejected]:
        rejected: list[Rejected] = []
        valid: list[StreamMessage] = []
        for message in batch:
            problem = _problem(message.envelope)
            if problem:
                rejected.append(Rejected(message, problem))
            else:
                valid.append(message)
        async with self._pool.acquire() as connection, connection.transaction():
            fresh = {r["event_id"] for r in await connection.fetch(
                "INSERT INTO processed (consumer, event_id) "
                "SELECT $1, unnest($2::uuid[]) ON CONFLICT DO NOTHING RETURNING event_id::text",
                CONSUMER, list({m.envelope.id for m in valid}))}
            outgoing: list[OutgoingMessage] = []
            for message in valid:
                envelope = message.envelope
                if envelope.id not in fresh:
                    self._metrics.duplicates.labels(CONSUMER).inc()
                    continue
                fresh.discard(envelope.id)  # the same id twice in one batch counts once
                outgoing += await self._stitch(connection, envelope, message.key)
            await add_to_outbox(connection, OUTBOX_STREAM, outgoing)
        await self._relay.flush()
        self._metrics.events.labels(CONSUMER).inc(len(batch))
        return rejected

    async def _stitch(self, connection: Any, envelope: Envelope,
                      key: bytes | None) -> list[OutgoingMessage]:
        data, workspace = envelope.data, envelope.workspace
        kind = event_kind(envelope.type)
        claims = claims_from(envelope.type, data, self._declared.get(workspace, ()))
        client = data.get("client")
        if isinstance(client, dict) and client.get("bot") and not claims.strong \
                and not claims.token_contact:
            # An anonymous crawler. A flagged request that names a user is a server-side
            # integration (curl and HTTP libraries are on the crawler lists), not a bot.
            self._metrics.skipped.labels("bot").inc()
            return []
        candidates = [*claims.lookups]
        if claims.token_contact:
            candidates.append(Identifier("contact", claims.token_contact))
        if await store.blocked_digests(
                connection, workspace, [store.identifier_digest(workspace, i)
                                        for i in candidates]):
            self._metrics.skipped.labels("erased").inc()
            return []
        now = self._clock()
        token_contact = None
        if claims.token_contact:
            contact_id = await store.current_id(connection, workspace, claims.token_contact)
            token_contact = (await store.contact_views(connection, workspace,
                                                       [contact_id])).get(contact_id)
            if token_contact is None:
                self._metrics.skipped.labels("unknown_contact").inc()
                return []
        known = await store.lookup(connection, workspace, claims.lookups)
        resolution = resolve(workspace, claims, known, token_contact=token_contact, now=now,
                             new_id=str(uuid.uuid4()))
        if resolution is None:
            self._metrics.skipped.labels("no_identity").inc()
            return []
        for conflict in resolution.conflicts:
            logger.info("identity conflict", extra={"workspace": workspace,
                                                    "event_id": envelope.id,
                                                    "conflict": conflict})
        messages: list[OutgoingMessage] = []
        contact_id = resolution.contact_id
        if resolution.create:
            await store.create_contact(connection, workspace, contact_id, now)
        for merge in resolution.merges:
            messages.append(await store.apply_merge(
                connection, self._settings, workspace, merge, actor="stitcher", now=now,
                cause_event_id=envelope.id, correlation_id=envelope.correlation_id))
            self._metrics.merges.labels(merge.reason).inc()
        await store.link(connection, workspace, resolution.link, contact_id, now)
        if resolution.switched_device:
            self._metrics.device_switches.inc()
        session = None
        if on_website(kind, data):
            previous = await connection.fetchrow(
                "SELECT session_id::text AS session_id, occurred_at FROM timeline "
                "WHERE workspace = $1 AND contact_id = $2 AND occurred_at <= $3 "
                "AND session_id IS NOT NULL ORDER BY occurred_at DESC LIMIT 1",
                workspace, contact_id, envelope.occurred_at)
            session = session_for(previous["session_id"] if previous else None,
                                  previous["occurred_at"] if previous else None, envelope.id,
                                  envelope.occurred_at, self._session_timeout)
        name = data.get("event") if kind == "track" else data.get("name")
        await connection.execute(
            "INSERT INTO timeline (workspace, event_id, contact_id, type, name, occurred_at, "
            "received_at, session_id, known, data) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, "
            "$10) ON CONFLICT DO NOTHING",
            workspace, envelope.id, contact_id, kind, name, envelope.occurred_at,
            envelope.received_at, session.id if session else None, resolution.known,
            store.jsonb(data))
        if resolution.known:
            messages += await self._update_profile(connection, envelope, kind, contact_id, now)
        messages.append(contact_message(
            self._settings, CONTACT_EVENTS, "contact.activity.v1", event_id=envelope.id,
            workspace=workspace, contact_id=contact_id, occurred_at=envelope.occurred_at,
            correlation_id=envelope.correlation_id,
            data={"contact_id": contact_id, "known": resolution.known, "kind": kind,
                  "name": name if isinstance(name, str) else None,
                  "session": {"id": session.id, "started": session.started} if session else None,
                  "properties": activity_properties(kind, data),
                  "source_key": key.decode(errors="replace") if key else ""}))
        return messages

    async def _update_profile(self, connection: Any, envelope: Envelope, kind: str,
                              contact_id: str, now: datetime) -> list[OutgoingMessage]:
        row = await connection.fetchrow(
            "SELECT traits, first_touch, last_touch, last_seen_at FROM contacts "
            "WHERE workspace = $1 AND contact_id = $2 FOR UPDATE", envelope.workspace, contact_id)
        if row is None:
            return []
        traits, changed = merge_traits(store.load_json(row["traits"]),
                                       traits_of(kind, envelope.data), envelope.occurred_at)
        first, last = combine_touches(store.load_json(row["first_touch"]),
                                      store.load_json(row["last_touch"]),
                                      touch_of(envelope.data, envelope.occurred_at))
        last_seen = row["last_seen_at"]
        at = envelope.occurred_at
        if on_website(kind, envelope.data) and (last_seen is None or at > last_seen):
            last_seen = at
        await connection.execute(
            "UPDATE contacts SET traits = $3, first_touch = $4, last_touch = $5, "
            "last_seen_at = $6, updated_at = $7 WHERE workspace = $1 AND contact_id = $2",
            envelope.workspace, contact_id, store.jsonb(traits),
            store.jsonb(first) if first else None, store.jsonb(last) if last else None,
            last_seen, now)
        if not changed:
            return []
        values = store.trait_values(traits)
        return [contact_message(
            self._settings, CONTACT_EVENTS, "contact.profile_changed.v1",
            event_id=store.derived_profile_id(envelope.id), workspace=envelope.workspace,
            contact_id=contact_id, occurred_at=envelope.occurred_at,
            correlation_id=envelope.correlation_id,
            data={"contact_id": contact_id, "changed": {n: values[n] for n in changed},
                  "traits": values})]


def _problem(envelope: Envelope) -> str | None:
    """Why an envelope cannot be stitched (it is dead-lettered), or ``None``."""
    if not envelope.type.startswith("tracking."):
        return f"unexpected event type {envelope.type!r} on tracking-events"
    if envelope.major_version != 1:
        return f"unsupported version of {envelope.type}"
    for name in ("anonymous_id", "user_id", "contact_id"):
        value = envelope.data.get(name)
        if value is not None and not isinstance(value, str | int):
            return f"data.{name} must be a string"
    return None

