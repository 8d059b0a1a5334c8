"""Profile traits, attribution and sessions (pure)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from leadwerk_platform.envelope import format_timestamp, parse_timestamp

#: Event kinds that can happen on the website and so make up a visit (a session).
WEB_KINDS = frozenset({"page", "screen", "track", "form_submitted"})


def on_website(kind: str, data: Mapping[str, Any]) -> bool:
    """Page and screen views, and tracked actions or forms that came from a page (server-side
    ``track`` calls without a page context are not visits)."""
    if kind in {"page", "screen"}:
        return True
    context = data.get("context")
    return kind in WEB_KINDS and isinstance(context, dict) and isinstance(context.get("page"),
                                                                          dict)
_MAX_DEPTH = 3


def event_kind(event_type: str) -> str:
    """``tracking.page.v1`` → ``page``."""
    return event_type.split(".", 1)[-1].rsplit(".v", 1)[0]


def flatten(values: Mapping[str, Any], prefix: str = "", depth: int = 0) -> dict[str, Any]:
    """Nested objects become dotted names: ``{"company": {"name": "X"}}`` → ``company.name``."""
    flat: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and depth < _MAX_DEPTH:
            flat.update(flatten(value, f"{key}.", depth + 1))
        else:
            flat[key] = value
    return flat


def traits_of(kind: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """The profile traits an event states (identify and form traits, group → ``company.*``)."""
    raw = data.get("traits")
    traits: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
    if kind in {"identify", "form_submitted"}:
        flat = flatten(traits)
        if kind == "form_submitted" and isinstance(data.get("email"), str):
            flat["email"] = data["email"]
        if isinstance(flat.get("email"), str):
            flat["email"] = flat["email"].strip().lower()
        return flat
    if kind == "group":
        flat = flatten(traits, "company.")
        if data.get("group_id") is not None:
            flat["company.id"] = data["group_id"]
        return flat
    return {}


def merge_traits(current: Mapping[str, Any], updates: Mapping[str, Any],
                 at: datetime) -> tuple[dict[str, Any], list[str]]:
    """Apply ``updates`` stated at ``at``; per trait, the more recent statement wins.

    ``current`` maps a trait name to ``{"value": …, "at": "<timestamp>"}``. Returns the new
    mapping and the names whose value changed.
    """
    merged = dict(current)
    changed: list[str] = []
    stamp = format_timestamp(at)
    for name, value in updates.items():
        previous = merged.get(name)
        if previous is not None and parse_timestamp(previous["at"]) > at:
            continue
        if previous is None or previous.get("value") != value:
            changed.append(name)
        merged[name] = {"value": value, "at": stamp}
    return merged, changed


def combine_traits(survivor: Mapping[str, Any], merged: Mapping[str, Any]) -> dict[str, Any]:
    """Traits of two merged contacts: per trait, the more recent one."""
    combined = dict(survivor)
    for name, entry in merged.items():
        mine = combined.get(name)
        if mine is None or parse_timestamp(entry["at"]) > parse_timestamp(mine["at"]):
            combined[name] = entry
    return combined


def touch_of(data: Mapping[str, Any], at: datetime) -> dict[str, Any] | None:
    """A marketing touch: the event came with campaign parameters or from another site."""
    raw = data.get("campaign")
    campaign: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
    page = (data.get("context") or {}).get("page") if isinstance(data.get("context"),
                                                                   dict) else None
    page_url = page.get("url") if isinstance(page, dict) else None
    tagged = any(campaign.get(k) for k in ("source", "medium", "name"))
    referrer_host = campaign.get("referrer_host")
    external = bool(referrer_host) and (not isinstance(page_url, str)
                                        or f"//{referrer_host}" not in page_url)
    if not tagged and not external:
        return None
    touch = {k: campaign.get(k) for k in ("source", "medium", "name", "term", "content",
                                          "referrer") if campaign.get(k)}
    touch["at"] = format_timestamp(at)
    if isinstance(page_url, str):
        touch["landing_page"] = page_url
    return touch


def combine_touches(first: dict[str, Any] | None, last: dict[str, Any] | None,
                    touch: dict[str, Any] | None) -> tuple[dict[str, Any] | None,
                                                           dict[str, Any] | None]:
    """First-touch keeps the earliest, last-touch the latest."""
    if touch is None:
        return first, last
    at = parse_timestamp(touch["at"])
    if first is None or at < parse_timestamp(first["at"]):
        first = touch
    if last is None or at >= parse_timestamp(last["at"]):
        last = touch
    return first, last


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    started: bool


def session_for(previous_id: str | None, previous_at: datetime | None, event_id: str,
                occurred_at: datetime, timeout: timedelta) -> Session:
    """A visit continues while activity comes within ``timeout`` of the previous activity."""
    if previous_id is not None and previous_at is not None and \
            timedelta(0) <= occurred_at - previous_at <= timeout:
        return Session(previous_id, started=False)
    return Session(str(uuid.uuid5(uuid.NAMESPACE_OID, f"session:{event_id}")), started=True)
