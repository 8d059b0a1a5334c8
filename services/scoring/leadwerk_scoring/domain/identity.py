"""Identity resolution: which contact an event belongs to, and what it links or merges (pure).

The identity graph maps identifiers (anonymous device ids, user ids, normalised emails and any
identifier a workspace declares) to contacts. :func:`resolve` takes what an event claims and the
contacts those claims currently point to, and decides; the adapter applies the decision in the
same transaction as the timeline write. The rules (docs/decisions/0008-identity-rules.md):

* an anonymous device without a known identity is its own lightweight contact, whose id is
  derived from the device id (no contact row until it becomes known);
* a strong identifier (user id, email, declared identifier, signed email token) names the
  person; a device that was anonymous joins that person, with all its history;
* two contacts are merged when one event names both, unless both carry an identifier of the
  same unique kind with different values (two user ids, two emails): then nothing is merged,
  and a device that moves between them switches to the person the event names (shared family
  computer, trade-fair kiosk);
* an alias is an explicit statement that two ids are one person and merges without that check;
* placeholder values (``null``, ``anonymous``, ``0`` …) are not identifiers at all.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

ANONYMOUS = "anonymous"
USER = "user"
EMAIL = "email"

#: Namespace of contact ids derived from anonymous device ids; fixed forever.
DEVICE_NAMESPACE = uuid.UUID("0b8f0c6e-8d7e-5d1a-a2f3-6c0b3c1f9e42")

#: Values SDKs and careless integrations send where they have no id. Compared lower-cased.
PLACEHOLDERS = frozenset({
    "", "null", "undefined", "none", "nil", "nan", "0", "-1", "false", "true",
    "anonymous", "anon", "guest", "unknown", "n/a", "na", "user", "visitor", "test",
    "[object object]", "00000000-0000-0000-0000-000000000000", "{}", "[]",
})
_MAX_ID_LENGTH = 256
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]{2,}$")


@dataclass(frozen=True, slots=True, order=True)
class Identifier:
    kind: str
    value: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


def clean_id(value: object) -> str | None:
    """The identifier as text, or ``None`` for placeholders and non-scalar junk."""
    if isinstance(value, bool) or value is None or isinstance(value, dict | list):
        return None
    text = str(value).strip()
    if text.lower() in PLACEHOLDERS or len(text) > _MAX_ID_LENGTH or not text.strip("0-"):
        return None
    return text


def normalise_email(value: object) -> str | None:
    """Lower-cased, trimmed email, or ``None`` when it is not an address."""
    if not isinstance(value, str):
        return None
    email = value.strip().lower()
    if len(email) > _MAX_ID_LENGTH or not _EMAIL.match(email):
        return None
    return email


def device_contact_id(workspace: str, anonymous_id: str) -> str:
    """The contact id of an anonymous device that is not linked to a known contact."""
    return str(uuid.uuid5(DEVICE_NAMESPACE, f"{workspace}\x1f{anonymous_id}"))


@dataclass(frozen=True, slots=True)
class Claims:
    """What one event says about who sent it."""

    device: str | None = None
    strong: tuple[Identifier, ...] = ()
    token_contact: str | None = None
    alias_of: str | None = None  # Segment's previousId: an earlier userId or anonymousId

    @property
    def lookups(self) -> list[Identifier]:
        found = list(self.strong)
        if self.device is not None:
            found.append(Identifier(ANONYMOUS, self.device))
        if self.alias_of is not None:
            found += [Identifier(USER, self.alias_of), Identifier(ANONYMOUS, self.alias_of)]
        return found


def claims_from(event_type: str, data: Mapping[str, Any],
                declared: Sequence[str] = ()) -> Claims:
    """Read the identity claims of a tracking event (``tracking.<kind>.v1``)."""
    kind = event_type.removeprefix("tracking.").rsplit(".v", 1)[0]
    raw_traits = data.get("traits")
    traits: Mapping[str, Any] = raw_traits if isinstance(raw_traits, dict) else {}
    strong: list[Identifier] = []
    user_id = clean_id(data.get("user_id"))
    if user_id is not None:
        strong.append(Identifier(USER, user_id))
    if kind in {"identify", "form_submitted"}:
        email = normalise_email(data.get("email") or traits.get("email"))
        if email is not None:
            strong.append(Identifier(EMAIL, email))
        for name in declared:
            value = clean_id(traits.get(name))
            if value is not None:
                strong.append(Identifier(name, value))
    alias_of = clean_id(data.get("previous_id")) if kind == "alias" else None
    token = clean_id(data.get("contact_id"))
    return Claims(device=clean_id(data.get("anonymous_id")), strong=tuple(strong),
                  token_contact=token, alias_of=alias_of)


@dataclass(frozen=True, slots=True)
class ContactView:
    """A known contact as far as resolution needs it."""

    contact_id: str
    created_at: datetime
    identifiers: frozenset[Identifier] = frozenset()

    def kinds(self) -> set[str]:
        return {i.kind for i in self.identifiers if i.kind != ANONYMOUS}

    def conflicts_with(self, other: ContactView, ignore: Iterable[str] = ()) -> bool:
        """Both carry a unique identifier of the same kind, with different values."""
        skip = set(ignore) | {ANONYMOUS}
        for kind in self.kinds() & other.kinds() - skip:
            mine = {i.value for i in self.identifiers if i.kind == kind}
            theirs = {i.value for i in other.identifiers if i.kind == kind}
            if mine.isdisjoint(theirs):
                return True
        return False

    def carrying(self, identifiers: Iterable[Identifier]) -> ContactView:
        return ContactView(self.contact_id, self.created_at,
                           self.identifiers | frozenset(identifiers))


@dataclass(frozen=True, slots=True)
class Merge:
    survivor: str
    merged: str
    reason: str


@dataclass(slots=True)
class Resolution:
    """The decision for one event."""

    contact_id: str
    known: bool
    create: bool = False  # a contact row must be created for ``contact_id``
    link: list[Identifier] = field(default_factory=list)  # point these at ``contact_id``
    merges: list[Merge] = field(default_factory=list)  # applied in order
    switched_device: bool = False
    conflicts: list[str] = field(default_factory=list)


def _survivor(a: ContactView, b: ContactView) -> tuple[ContactView, ContactView]:
    """The older contact survives (ties: the smaller id), so merges are deterministic."""
    return (a, b) if (a.created_at, a.contact_id) <= (b.created_at, b.contact_id) else (b, a)


def resolve(workspace: str, claims: Claims, known: Mapping[Identifier, ContactView], *,
            token_contact: ContactView | None, now: datetime,
            new_id: str) -> Resolution | None:
    """Decide where an event goes. ``known`` holds the contact of every claimed identifier that
    is linked; ``token_contact`` the (merge-resolved) contact a signed token names; ``new_id``
    is used if a new known contact must be created without a device to promote.

    Returns ``None`` when the event names nobody (no device, no identifier): it cannot be kept.
    """
    device, named = _named(claims, known, token_contact)
    explicit = claims.alias_of is not None
    unlinked = [i for i in claims.strong if i not in known]
    device_contact = known.get(device) if device else None
    if not named and not unlinked:
        # Nobody new is named: the event belongs to the device's contact (known or not).
        if device is None:
            return None
        if device_contact is not None:
            return Resolution(device_contact.contact_id, known=True)
        return Resolution(device_contact_id(workspace, device.value), known=False)

    resolution = Resolution("", known=True)
    person = _merge_named(named, resolution, explicit=explicit)
    candidate = ContactView("", now, frozenset(unlinked))
    if person is None:
        # Only new identifiers. They join the device's known contact unless they conflict
        # with it (a second person on the same device); otherwise a contact is created.
        if device_contact is not None and not device_contact.conflicts_with(candidate):
            person = device_contact
        else:
            fresh = (device_contact_id(workspace, device.value)
                     if device is not None and device_contact is None else new_id)
            person = ContactView(fresh, now, frozenset(unlinked))
            resolution.create = True
    elif person.conflicts_with(candidate):
        # e.g. an identify with a second userId for a contact that has one: keep it apart.
        resolution.conflicts.append(f"{person.contact_id} already has another "
                                    f"{', '.join(sorted(candidate.kinds()))}; not linked")
        unlinked = [i for i in unlinked if i.kind not in person.kinds()]
    resolution.link.extend(unlinked)
    person = person.carrying(unlinked)
    if device is not None:
        person = _attach_device(workspace, device, device_contact, person, resolution,
                                explicit=explicit)
    resolution.contact_id = person.contact_id
    return resolution


def _named(claims: Claims, known: Mapping[Identifier, ContactView],
           token_contact: ContactView | None) -> tuple[Identifier | None, list[ContactView]]:
    """The device, and the distinct known contacts the event's strong claims name."""
    device = Identifier(ANONYMOUS, claims.device) if claims.device else None
    aliased: list[Identifier] = []
    if claims.alias_of is not None:
        as_user = Identifier(USER, claims.alias_of)
        as_device = Identifier(ANONYMOUS, claims.alias_of)
        if as_user in known:
            aliased.append(as_user)
        elif as_device in known:
            aliased.append(as_device)
        elif device is None:
            device = as_device  # alias(previousId=anonymousId): that device's history joins
    named: list[ContactView] = [token_contact] if token_contact is not None else []
    for identifier in (*claims.strong, *aliased):
        contact = known.get(identifier)
        if contact is not None and all(c.contact_id != contact.contact_id for c in named):
            named.append(contact)
    return device, named


def _merge_named(named: Sequence[ContactView], resolution: Resolution, *,
                 explicit: bool) -> ContactView | None:
    """Merge the contacts one event names, unless two of them are visibly different people."""
    person: ContactView | None = None
    for contact in named:
        if person is None:
            person = contact
        elif not explicit and person.conflicts_with(contact):
            resolution.conflicts.append(f"{contact.contact_id} carries other identities than "
                                        f"{person.contact_id}; not merged")
        else:
            survivor, merged = _survivor(person, contact)
            resolution.merges.append(Merge(survivor.contact_id, merged.contact_id,
                                           "alias" if explicit else "identifier"))
            person = survivor.carrying(merged.identifiers)
    return person


def _attach_device(workspace: str, device: Identifier, device_contact: ContactView | None,
                   person: ContactView, resolution: Resolution, *,
                   explicit: bool) -> ContactView:
    """Bring the device to ``person``: its anonymous history joins, a device of another known
    contact merges with it, or switches to it when the two are different people."""
    if device_contact is None:
        anonymous = device_contact_id(workspace, device.value)
        if anonymous != person.contact_id:
            resolution.merges.append(Merge(person.contact_id, anonymous, "device"))
        resolution.link.append(device)
    elif device_contact.contact_id != person.contact_id:
        if not explicit and device_contact.conflicts_with(person):
            resolution.switched_device = True
            resolution.link.append(device)
        else:
            survivor, merged = _survivor(person, device_contact)
            resolution.merges.append(Merge(survivor.contact_id, merged.contact_id,
                                           "alias" if explicit else "device"))
            person = survivor.carrying(merged.identifiers)
    return person
