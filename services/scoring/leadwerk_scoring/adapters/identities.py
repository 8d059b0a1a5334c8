"""The identity graph, contacts and timeline in Postgres (the stitcher's tables).

Functions take an asyncpg connection inside the caller's transaction.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import orjson

from leadwerk_platform.envelope import format_timestamp
from leadwerk_platform.kafka.producer import OutgoingMessage
from leadwerk_platform.settings import PlatformSettings
from leadwerk_scoring.adapters.messages import CONTACT_EVENTS, contact_message, derived_id
from leadwerk_scoring.domain.identity import ANONYMOUS, ContactView, Identifier, Merge
from leadwerk_scoring.domain.profile import combine_touches, combine_traits, touch_of

Connection = Any  # asyncpg.Connection (asyncpg ships no type information)
#: Merges are path-compressed (one hop); this only bounds a corrupted chain.
MAX_MERGE_HOPS = 16
_ANONYMOUS_TOUCH_ROWS = 1000


def identifier_digest(workspace: str, identifier: Identifier) -> str:
    """What is kept of an erased identifier: enough to recognise it, nothing to read."""
    return hashlib.sha256(f"{workspace}\x1f{identifier}".encode()).hexdigest()


def jsonb(value: Any) -> str:
    return orjson.dumps(value).decode()


async def blocked_digests(connection: Connection, workspace: str,
                          digests: Sequence[str]) -> set[str]:
    if not digests:
        return set()
    rows = await connection.fetch(
        "SELECT digest FROM blocked_identities WHERE workspace = $1 AND digest = ANY($2)",
        workspace, list(digests))
    return {r["digest"] for r in rows}


async def lookup(connection: Connection, workspace: str,
                 identifiers: Iterable[Identifier]) -> dict[Identifier, ContactView]:
    """The known contact of each identifier that is linked (with its strong identifiers)."""
    wanted = list(dict.fromkeys(identifiers))
    if not wanted:
        return {}
    rows = await connection.fetch(
        "SELECT i.kind, i.value, i.contact_id::text AS contact_id FROM identities i "
        "JOIN unnest($2::text[], $3::text[]) AS w(kind, value) "
        "ON i.kind = w.kind AND i.value = w.value WHERE i.workspace = $1",
        workspace, [i.kind for i in wanted], [i.value for i in wanted])
    views = await contact_views(connection, workspace, {r["contact_id"] for r in rows})
    return {Identifier(r["kind"], r["value"]): views[r["contact_id"]] for r in rows
            if r["contact_id"] in views}


async def contact_views(connection: Connection, workspace: str,
                        contact_ids: Iterable[str]) -> dict[str, ContactView]:
    ids = list(contact_ids)
    if not ids:
        return {}
    contacts = await connection.fetch(
        "SELECT contact_id::text AS contact_id, created_at FROM contacts "
        "WHERE workspace = $1 AND contact_id = ANY($2::uuid[])", workspace, ids)
    identities = await connection.fetch(
        "SELECT contact_id::text AS contact_id, kind, value FROM identities "
        "WHERE workspace = $1 AND contact_id = ANY($2::uuid[]) AND kind <> $3",
        workspace, ids, ANONYMOUS)
    owned: dict[str, set[Identifier]] = defaultdict(set)
    for row in identities:
        owned[row["contact_id"]].add(Identifier(row["kind"], row["value"]))
    return {r["contact_id"]: ContactView(r["contact_id"], r["created_at"],
                                         frozenset(owned[r["contact_id"]])) for r in contacts}


async def current_id(connection: Connection, workspace: str, contact_id: str) -> str:
    """Follow merges: the contact that ``contact_id`` now is."""
    return (await current_ids(connection, {(workspace, contact_id)}))[(workspace, contact_id)]


async def current_ids(connection: Connection,
                      keys: set[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Follow merges for many contacts at once: (workspace, id) → the id it is now."""
    result = {key: key[1] for key in keys}
    pending = set(keys)
    for _ in range(MAX_MERGE_HOPS):
        if not pending:
            break
        current = {(w, result[(w, i)]) for w, i in pending}
        rows = await connection.fetch(
            "SELECT m.workspace, m.merged_id::text AS merged, m.survivor_id::text AS survivor "
            "FROM merges m JOIN unnest($1::text[], $2::uuid[]) AS k(w, id) "
            "ON m.workspace = k.w AND m.merged_id = k.id",
            [w for w, _ in current], [i for _, i in current])
        moved = {(r["workspace"], r["merged"]): r["survivor"] for r in rows}
        pending = {key for key in pending if (key[0], result[key]) in moved}
        for key in pending:
            result[key] = moved[(key[0], result[key])]
    return result


async def create_contact(connection: Connection, workspace: str, contact_id: str,
                         now: datetime) -> None:
    """The contact row of a new contact, or of an anonymous device being identified: its
    attribution (the campaign that first brought the visitor) comes from its history."""
    first, last, last_seen = await anonymous_attribution(connection, workspace, contact_id)
    await connection.execute(
        "INSERT INTO contacts (workspace, contact_id, created_at, updated_at, first_touch, "
        "last_touch, last_seen_at) VALUES ($1, $2, $3, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        workspace, contact_id, now, jsonb(first) if first else None,
        jsonb(last) if last else None, last_seen)


async def anonymous_attribution(connection: Connection, workspace: str, contact_id: str,
                                ) -> tuple[dict[str, Any] | None, dict[str, Any] | None,
                                           datetime | None]:
    """First and last touch and last activity of an anonymous device, from its timeline (an
    anonymous device has no contact row to keep them in)."""
    first: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    last_seen: datetime | None = None
    for row in await connection.fetch(
            "SELECT occurred_at, data FROM timeline WHERE workspace = $1 AND contact_id = $2 "
            "ORDER BY occurred_at LIMIT $3", workspace, contact_id, _ANONYMOUS_TOUCH_ROWS):
        first, last = combine_touches(first, last, touch_of(load_json(row["data"]),
                                                            row["occurred_at"]))
        if last_seen is None or row["occurred_at"] > last_seen:
            last_seen = row["occurred_at"]
    return first, last, last_seen


async def link(connection: Connection, workspace: str, identifiers: Sequence[Identifier],
               contact_id: str, now: datetime) -> None:
    """Point ``identifiers`` at ``contact_id`` (new links, or a device switching)."""
    if identifiers:
        await connection.executemany(
            "INSERT INTO identities (workspace, kind, value, contact_id, created_at, updated_at) "
            "VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (workspace, kind, value) "
            "DO UPDATE SET contact_id = EXCLUDED.contact_id, updated_at = EXCLUDED.updated_at",
            [(workspace, i.kind, i.value, contact_id, now) for i in identifiers])


async def apply_merge(connection: Connection, settings: PlatformSettings, workspace: str,
                      merge: Merge, *, actor: str, now: datetime, cause_event_id: str | None,
                      correlation_id: str | None) -> OutgoingMessage:
    """Move everything of ``merge.merged`` to ``merge.survivor`` and record it.

    Identifiers, timeline, traits (the more recent value wins per trait) and attribution
    (first touch: the earlier; last touch: the later) move here; the scorer moves the scores
    when it sees the merge event.
    """
    survivor, merged = merge.survivor, merge.merged
    await connection.execute(
        "INSERT INTO merges (workspace, merged_id, survivor_id, reason, actor, event_id, "
        "merged_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        workspace, merged, survivor, merge.reason, actor, cause_event_id, now)
    # Path compression: whatever was merged into ``merged`` now points at the survivor.
    await connection.execute(
        "UPDATE merges SET survivor_id = $3 WHERE workspace = $1 AND survivor_id = $2",
        workspace, merged, survivor)
    await connection.execute(
        "UPDATE identities SET contact_id = $3, updated_at = $4 "
        "WHERE workspace = $1 AND contact_id = $2", workspace, merged, survivor, now)
    rows = await connection.fetch(
        "SELECT contact_id::text AS contact_id, created_at, traits, first_touch, last_touch, "
        "last_seen_at FROM contacts WHERE workspace = $1 AND contact_id = ANY($2::uuid[]) "
        "FOR UPDATE", workspace, [survivor, merged])
    by_id = {r["contact_id"]: r for r in rows}
    target, source = by_id.get(survivor), by_id.get(merged)
    traits = load_json(target["traits"]) if target else {}
    first = load_json(target["first_touch"]) if target else None
    last = load_json(target["last_touch"]) if target else None
    created_at = target["created_at"] if target else now
    last_seen = target["last_seen_at"] if target else None
    if source is not None:
        traits = combine_traits(traits, load_json(source["traits"]))
        first, last = combine_touches(first, last, load_json(source["first_touch"]))
        first, last = combine_touches(first, last, load_json(source["last_touch"]))
        created_at = min(created_at, source["created_at"])
        if source["last_seen_at"] and (last_seen is None or source["last_seen_at"] > last_seen):
            last_seen = source["last_seen_at"]
        await connection.execute("DELETE FROM contacts WHERE workspace = $1 AND contact_id = $2",
                                 workspace, merged)
    else:  # an anonymous device: its attribution is in its timeline
        device_first, device_last, device_seen = await anonymous_attribution(
            connection, workspace, merged)
        first, last = combine_touches(first, last, device_first)
        first, last = combine_touches(first, last, device_last)
        if device_seen is not None and (last_seen is None or device_seen > last_seen):
            last_seen = device_seen
    await connection.execute(
        "INSERT INTO contacts (workspace, contact_id, created_at, updated_at, traits, "
        "first_touch, last_touch, last_seen_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
        "ON CONFLICT (workspace, contact_id) DO UPDATE SET created_at = EXCLUDED.created_at, "
        "updated_at = EXCLUDED.updated_at, traits = EXCLUDED.traits, "
        "first_touch = EXCLUDED.first_touch, last_touch = EXCLUDED.last_touch, "
        "last_seen_at = EXCLUDED.last_seen_at",
        workspace, survivor, created_at, now, jsonb(traits), jsonb(first) if first else None,
        jsonb(last) if last else None, last_seen)
    await connection.execute(
        "UPDATE timeline SET contact_id = $3, known = true "
        "WHERE workspace = $1 AND contact_id = $2",
        workspace, merged, survivor)
    return contact_message(
        settings, CONTACT_EVENTS, "contact.merged.v1",
        event_id=derived_id("merge", workspace, merged, survivor), workspace=workspace,
        contact_id=survivor, occurred_at=now, correlation_id=correlation_id,
        data={"survivor_id": survivor, "merged_id": merged, "reason": merge.reason,
              "actor": actor, "cause_event_id": cause_event_id})


def load_json(value: Any) -> Any:
    """A jsonb column as asyncpg returns it (text) → Python."""
    if isinstance(value, str):
        return orjson.loads(value)
    return value


def trait_values(traits: dict[str, Any]) -> dict[str, Any]:
    """``{"name": {"value": v, "at": t}}`` → ``{"name": v}``."""
    return {name: entry["value"] for name, entry in traits.items()}


def stamp(moment: datetime | None) -> str | None:
    return format_timestamp(moment) if moment else None


def derived_profile_id(event_id: str) -> str:
    return derived_id("profile", event_id)
