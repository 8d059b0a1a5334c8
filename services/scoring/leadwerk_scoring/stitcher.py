"""The stitcher: tracking events → contact events (identity graph, timeline, profile).

One transaction per batch holds the "processed" records, every identity and timeline write
and the outgoing contact events (outbox); the outbox is flushed before the batch is
acknowledged. A redelivered event finds its "processed" record and only the flush repeats.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from leadwerk_platform.envelope import Envelope
from leadwerk_platform.kafka.producer import OutgoingMessage
from leadwerk_platform.kafka.streams import Rejected, StreamMessage
from leadwerk_platform.outbox import OutboxRelay, add_to_outbox
from leadwerk_scoring.adapters import identities as store
from leadwerk_scoring.adapters.messages import CONTACT_EVENTS, contact_message
from leadwerk_scoring.domain.identity import (
    Claims,
    ContactView,
    Identifier,
    claims_from,
    device_contact_id,
    resolve,
)
from leadwerk_scoring.domain.profile import (
    Session,
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
        elif isinstance(value, list) and name == "consents":
            view["consents"] = value  # the mailer's consent log reads them as given
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


@dataclass
class _Profile:
    traits: dict[str, Any]
    first_touch: dict[str, Any] | None
    last_touch: dict[str, Any] | None
    last_seen: datetime | None
    dirty: bool = False


@dataclass
class _Item:
    message: StreamMessage
    kind: str
    claims: Claims
    digests: list[str]


class _BatchState:
    """What one batch reads once and writes once.

    Identity links, each contact's latest session and the profiles of known contacts are loaded
    for the whole batch up front; timeline rows and profile updates are written at the end.
    Events that change the graph (new contacts, links, merges) are rare: before one, pending
    writes are flushed, and afterwards the identity links are read again.
    """

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.known: dict[str, dict[Identifier, ContactView]] = {}
        self.sessions: dict[tuple[str, str], tuple[str, datetime]] = {}
        self.profiles: dict[tuple[str, str], _Profile] = {}
        self.timeline: list[tuple[Any, ...]] = []
        self.stale = False

    async def load_identities(self, items: Sequence[_Item]) -> None:
        by_workspace: dict[str, set[Identifier]] = {}
        for item in items:
            by_workspace.setdefault(item.message.envelope.workspace, set()).update(
                item.claims.lookups)
        self.known = {workspace: await store.lookup(self.connection, workspace, identifiers)
                      for workspace, identifiers in by_workspace.items()}
        self.stale = False

    def view(self, workspace: str) -> dict[Identifier, ContactView]:
        return self.known.get(workspace, {})

    async def load_sessions(self, keys: set[tuple[str, str]]) -> None:
        wanted = [k for k in keys if k not in self.sessions]
        if not wanted:
            return
        rows = await self.connection.fetch(
            "SELECT k.w AS workspace, k.id::text AS contact_id, t.session_id::text AS session_id, "
            "t.occurred_at FROM unnest($1::text[], $2::uuid[]) AS k(w, id) CROSS JOIN LATERAL "
            "(SELECT session_id, occurred_at FROM timeline WHERE workspace = k.w AND "
            "contact_id = k.id AND session_id IS NOT NULL ORDER BY occurred_at DESC LIMIT 1) t",
            [w for w, _ in wanted], [i for _, i in wanted])
        for row in rows:
            self.sessions[(row["workspace"], row["contact_id"])] = (row["session_id"],
                                                                   row["occurred_at"])

    async def load_profiles(self, keys: set[tuple[str, str]]) -> None:
        wanted = sorted(k for k in keys if k not in self.profiles)
        if not wanted:
            return
        rows = await self.connection.fetch(
            "SELECT c.workspace, c.contact_id::text AS contact_id, traits, first_touch, "
            "last_touch, last_seen_at FROM contacts c JOIN unnest($1::text[], $2::uuid[]) "
            "AS k(w, id) ON c.workspace = k.w AND c.contact_id = k.id "
            "ORDER BY c.workspace, c.contact_id FOR UPDATE OF c",
            [w for w, _ in wanted], [i for _, i in wanted])
        for row in rows:
            self.profiles[(row["workspace"], row["contact_id"])] = _Profile(
                store.load_json(row["traits"]), store.load_json(row["first_touch"]),
                store.load_json(row["last_touch"]), row["last_seen_at"])

    async def flush(self) -> None:
        """Write pending timeline rows and profile changes; forget what a graph change may
        have made stale."""
        if self.timeline:
            await self.connection.executemany(
                "INSERT INTO timeline (workspace, event_id, contact_id, type, name, "
                "occurred_at, received_at, session_id, known, data) VALUES ($1, $2, $3, $4, "
                "$5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING", self.timeline)
            self.timeline = []
        dirty = [(k, p) for k, p in self.profiles.items() if p.dirty]
        if dirty:
            await self.connection.executemany(
                "UPDATE contacts SET traits = $3, first_touch = $4, last_touch = $5, "
                "last_seen_at = $6, updated_at = now() WHERE workspace = $1 AND contact_id = $2",
                [(w, c, store.jsonb(p.traits),
                  store.jsonb(p.first_touch) if p.first_touch else None,
                  store.jsonb(p.last_touch) if p.last_touch else None, p.last_seen)
                 for (w, c), p in dirty])
        self.profiles = {}
        self.sessions = {}


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
        with self._metrics.batch_seconds.labels(CONSUMER).time():
            return await self._handle(batch)

    async def _handle(self, batch: Sequence[StreamMessage]) -> list[Rejected]:
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
            items: list[_Item] = []
            for message in valid:
                envelope = message.envelope
                if envelope.id not in fresh:
                    self._metrics.duplicates.labels(CONSUMER).inc()
                    continue
                fresh.discard(envelope.id)  # the same id twice in one batch counts once
                item = self._item(message)
                if item is not None:
                    items.append(item)
            items = await self._unblocked(connection, items)
            state = _BatchState(connection)
            await state.load_identities(items)
            await self._prefetch(state, items)
            outgoing: list[OutgoingMessage] = []
            for index, item in enumerate(items):
                if state.stale:
                    await state.load_identities(items[index:])
                outgoing += await self._stitch(state, item)
            await state.flush()
            await add_to_outbox(connection, OUTBOX_STREAM, outgoing)
        await self._relay.flush()
        self._metrics.events.labels(CONSUMER).inc(len(batch))
        return rejected

    def _item(self, message: StreamMessage) -> _Item | None:
        envelope = message.envelope
        workspace = envelope.workspace
        claims = claims_from(envelope.type, envelope.data, self._declared.get(workspace, ()))
        client = envelope.data.get("client")
        if isinstance(client, dict) and client.get("bot") and not claims.strong \
                and not claims.token_contact:
            # An anonymous crawler. A flagged request that names a user is a server-side
            # integration (curl and HTTP libraries are on the crawler lists), not a bot.
            self._metrics.skipped.labels("bot").inc()
            return None
        candidates = [*claims.lookups]
        if claims.token_contact:
            candidates.append(Identifier("contact", claims.token_contact))
        return _Item(message, event_kind(envelope.type), claims,
                     [store.identifier_digest(workspace, i) for i in candidates])

    async def _unblocked(self, connection: Any, items: list[_Item]) -> list[_Item]:
        """Drop events naming an erased person (one query per workspace in the batch)."""
        blocked: set[tuple[str, str]] = set()
        for workspace in {i.message.envelope.workspace for i in items}:
            digests = [d for i in items if i.message.envelope.workspace == workspace
                       for d in i.digests]
            blocked |= {(workspace, d) for d in await store.blocked_digests(
                connection, workspace, digests)}
        kept = [i for i in items
                if not any((i.message.envelope.workspace, d) in blocked for d in i.digests)]
        self._metrics.skipped.labels("erased").inc(len(items) - len(kept))
        return kept

    async def _prefetch(self, state: _BatchState, items: Sequence[_Item]) -> None:
        """Latest sessions and known profiles of the contacts the batch most likely touches."""
        sessions: set[tuple[str, str]] = set()
        profiles: set[tuple[str, str]] = set()
        for item in items:
            workspace = item.message.envelope.workspace
            known = state.view(workspace)
            named = [known.get(i) for i in item.claims.lookups]
            contact = next((c for c in named if c is not None), None)
            if contact is not None:
                profiles.add((workspace, contact.contact_id))
                sessions.add((workspace, contact.contact_id))
            elif item.claims.device:
                sessions.add((workspace, device_contact_id(workspace, item.claims.device)))
        await state.load_sessions(sessions)
        await state.load_profiles(profiles)

    async def _stitch(self, state: _BatchState, item: _Item) -> list[OutgoingMessage]:
        envelope, claims, kind = item.message.envelope, item.claims, item.kind
        data, workspace = envelope.data, envelope.workspace
        connection = state.connection
        now = self._clock()
        token_contact = None
        if claims.token_contact:
            contact_id = await store.current_id(connection, workspace, claims.token_contact)
            token_contact = (await store.contact_views(connection, workspace,
                                                       [contact_id])).get(contact_id)
            if token_contact is None:
                self._metrics.skipped.labels("unknown_contact").inc()
                return []
        resolution = resolve(workspace, claims, state.view(workspace),
                             token_contact=token_contact, now=now, new_id=str(uuid.uuid4()))
        if resolution is None:
            self._metrics.skipped.labels("no_identity").inc()
            return []
        for conflict in resolution.conflicts:
            logger.info("identity conflict", extra={"workspace": workspace,
                                                    "event_id": envelope.id,
                                                    "conflict": conflict})
        messages: list[OutgoingMessage] = []
        contact_id = resolution.contact_id
        if resolution.create or resolution.merges or resolution.link:
            await state.flush()  # the graph changes: pending writes first
            state.stale = True
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
        key = (workspace, contact_id)
        session = None
        if on_website(kind, data):
            session = await self._session(state, key, envelope)
        name = data.get("event") if kind == "track" else data.get("name")
        state.timeline.append((workspace, envelope.id, contact_id, kind, name,
                               envelope.occurred_at, envelope.received_at,
                               session.id if session else None, resolution.known,
                               store.jsonb(data)))
        if resolution.known:
            messages += await self._update_profile(state, key, envelope, kind)
        messages.append(contact_message(
            self._settings, CONTACT_EVENTS, "contact.activity.v1", event_id=envelope.id,
            workspace=workspace, contact_id=contact_id, occurred_at=envelope.occurred_at,
            correlation_id=envelope.correlation_id,
            data={"contact_id": contact_id, "known": resolution.known, "kind": kind,
                  "name": name if isinstance(name, str) else None,
                  "session": {"id": session.id, "started": session.started} if session else None,
                  "properties": activity_properties(kind, data),
                  "source_key": item.message.key.decode(errors="replace")
                  if item.message.key else ""}))
        return messages

    async def _session(self, state: _BatchState, key: tuple[str, str],
                       envelope: Envelope) -> Session:
        at = envelope.occurred_at
        await state.load_sessions({key})
        latest = state.sessions.get(key)
        if latest is not None and at < latest[1]:
            # Out of order: find the visit this moment belongs to in the stored timeline.
            await state.flush()
            previous = await state.connection.fetchrow(
                "SELECT session_id::text AS session_id, occurred_at FROM timeline "
                "WHERE workspace = $1 AND contact_id = $2 AND occurred_at <= $3 "
                "AND session_id IS NOT NULL ORDER BY occurred_at DESC LIMIT 1",
                key[0], key[1], at)
            latest = (previous["session_id"], previous["occurred_at"]) if previous else None
            return session_for(latest[0] if latest else None, latest[1] if latest else None,
                               envelope.id, at, self._session_timeout)
        session = session_for(latest[0] if latest else None, latest[1] if latest else None,
                              envelope.id, at, self._session_timeout)
        state.sessions[key] = (session.id, at)
        return session

    async def _update_profile(self, state: _BatchState, key: tuple[str, str],
                              envelope: Envelope, kind: str) -> list[OutgoingMessage]:
        await state.load_profiles({key})
        profile = state.profiles.get(key)
        if profile is None:
            return []
        traits, changed = merge_traits(profile.traits, traits_of(kind, envelope.data),
                                       envelope.occurred_at)
        first, last = combine_touches(profile.first_touch, profile.last_touch,
                                      touch_of(envelope.data, envelope.occurred_at))
        last_seen = profile.last_seen
        at = envelope.occurred_at
        if on_website(kind, envelope.data) and (last_seen is None or at > last_seen):
            last_seen = at
        if (traits, first, last, last_seen) != (profile.traits, profile.first_touch,
                                                profile.last_touch, profile.last_seen):
            state.profiles[key] = _Profile(traits, first, last, last_seen, dirty=True)
        if not changed:
            return []
        values = store.trait_values(traits)
        return [contact_message(
            self._settings, CONTACT_EVENTS, "contact.profile_changed.v1",
            event_id=store.derived_profile_id(envelope.id), workspace=envelope.workspace,
            contact_id=key[1], occurred_at=envelope.occurred_at,
            correlation_id=envelope.correlation_id,
            data={"contact_id": key[1], "changed": {n: values[n] for n in changed},
                  "traits": values,
                  "attribution": {"first_touch": first, "last_touch": last}})]


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

