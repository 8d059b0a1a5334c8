"""What sales reads in the CRM (pure): activities in words, the recent-activity summary of a
hand-off, and the flat field view of a contact that connectors map onto CRM fields."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from leadwerk_crm_bridge.config import ActivityRule
from leadwerk_platform.conditions import all_hold

_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


def activity_view(data: Mapping[str, Any]) -> dict[str, Any]:
    """A ``contact.activity.v1`` as rules see it (as in scoring): its dotted properties plus
    ``type`` and ``event``."""
    return {**(data.get("properties") or {}), "type": data.get("kind"),
            "event": data.get("name")}


def label_for(activity: Mapping[str, Any], rules: Sequence[ActivityRule]) -> str | None:
    """The first matching rule's label with the activity's fields filled in, or ``None``:
    the CRM does not see this activity."""
    for rule in rules:
        if activity.get("type") != rule.type:
            continue
        if rule.event is not None and not rule.event.test(activity.get("event")):
            continue
        if all_hold(rule.where, activity):
            text = _PLACEHOLDER.sub(lambda m: str(activity.get(m.group(1).strip()) or ""),
                                    rule.label)
            return " ".join(text.split())
    return None


def summary(labels: Iterable[str]) -> str:
    """``downloaded the pricing sheet twice, watched the demo video``: labels newest first,
    repeats counted."""
    ordered = list(labels)
    counts = Counter(ordered)
    parts: list[str] = []
    for label in dict.fromkeys(ordered):
        times = counts[label]
        parts.append(label if times == 1 else f"{label} twice" if times == 2
                     else f"{label} {times} times")
    return ", ".join(parts)


def contact_fields(contact: Mapping[str, Any]) -> dict[str, Any]:
    """The contact as one flat mapping: every trait by name, plus score, grade, rating,
    stage, owner and summary (what field mappings name)."""
    traits = contact.get("traits") or {}
    fields = {k: v for k, v in traits.items() if v is not None}
    for name in ("score", "grade", "rating", "stage", "owner", "summary"):
        if contact.get(name) is not None:
            fields[name] = contact[name]
    touch = contact.get("attribution") or {}
    for moment in ("first_touch", "last_touch"):
        for key, value in (touch.get(moment) or {}).items():
            if value is not None and not isinstance(value, dict | list):
                fields[f"{moment}.{key}"] = value
    return fields


def merged(defaults: Mapping[str, str | None],
           overrides: Mapping[str, str | None]) -> dict[str, str]:
    """A connector's mapping: the kind's defaults, overridden; ``None`` drops an entry."""
    combined = {**defaults, **overrides}
    return {k: v for k, v in combined.items() if v is not None}


def text(value: Any) -> str:
    """A field value as CRMs take it (strings; numbers without a needless ``.0``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        return ";".join(str(v) for v in value)
    return str(value)
