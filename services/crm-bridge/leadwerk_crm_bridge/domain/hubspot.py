"""HubSpot (pure): contact upserts by email and notes as the CRM v3 API takes them (the
request shapes follow HubSpot's OpenAPI files), and HubSpot's webhooks read back: the v3
request signature and property changes as sales' verdicts, owner and field changes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from leadwerk_crm_bridge.config import Connector
from leadwerk_crm_bridge.domain.sync import contact_fields, merged, text

FIELDS: dict[str, str | None] = {
    "email": "email", "first_name": "firstname", "last_name": "lastname",
    "company": "company", "phone": "phone", "role": "jobtitle", "industry": "industry",
    "country": "country", "city": "city", "website": "website",
    "company.annual_revenue": "annualrevenue", "company.size": "numemployees",
    # Custom contact properties the portal's admin creates once (see the crm-bridge README).
    "score": "leadwerk_score", "grade": "leadwerk_grade", "rating": "leadwerk_rating",
    "first_touch.source": "leadwerk_first_touch_source",
    "first_touch.name": "leadwerk_first_touch_campaign",
}
STAGES: dict[str, str | None] = {
    "lead": "lead", "mql": "marketingqualifiedlead", "sal": "salesqualifiedlead",
    "sql": "salesqualifiedlead", "customer": "customer",
}
LEAD_STATUS: dict[str, str | None] = {
    "mql": "NEW", "sal": "OPEN", "sql": "IN_PROGRESS", "recycled": "BAD_TIMING",
    "disqualified": "UNQUALIFIED",
}
#: HubSpot values sales sets that have no outbound twin.
_INBOUND_STATUS = {"ATTEMPTED_TO_CONTACT": "sal", "CONNECTED": "sal", "OPEN_DEAL": "sql",
                   "opportunity": "sql"}
#: Stages only sales sets → the ``crm.lead_feedback.v1`` status. Other lifecycle values coming
#: back (lead, MQL: our own updates echoed) change nothing.
_SALES_STAGES = {"sal": "accepted", "sql": "qualified", "customer": "won",
                 "recycled": "rejected", "disqualified": "disqualified"}
_COMPUTED = frozenset({"email", "score", "grade", "rating", "summary"})
NOTE_TO_CONTACT = 202  # HubSpot-defined association type: note → contact
SIGNATURE_MAX_AGE_MS = 5 * 60 * 1000


def properties(connector: Connector, contact: Mapping[str, Any]) -> dict[str, str]:
    """A contact's HubSpot properties through the connector's mapping."""
    fields = contact_fields(contact)
    mapping = merged(FIELDS, connector.fields)
    result = {crm: text(fields[ours]) for ours, crm in mapping.items()
              if ours in fields and ours not in {"stage", "owner"}}
    stage = fields.get("stage")
    if isinstance(stage, str):
        lifecycle = merged(STAGES, connector.stages).get(stage)
        status = merged(LEAD_STATUS, connector.lead_status).get(stage)
        if lifecycle:
            result["lifecyclestage"] = lifecycle
        if status:
            result["hs_lead_status"] = status
    owner = fields.get("owner")
    if isinstance(owner, str) and owner in connector.owners:
        result["hubspot_owner_id"] = connector.owners[owner]
    return result


def upsert_input(connector: Connector, contact: Mapping[str, Any],
                 trace_id: str) -> dict[str, Any] | None:
    """One input of ``POST /crm/v3/objects/contacts/batch/upsert`` (matched by email), or
    ``None`` when the contact has no email to match on."""
    props = properties(connector, contact)
    email = (contact.get("traits") or {}).get("email")
    if not isinstance(email, str) or not email:
        return None
    props["email"] = email
    return {"id": email, "idProperty": "email", "properties": props,
            "objectWriteTraceId": trace_id}


def note_input(hubspot_id: str, timestamp: str, body: str,
               trace_id: str) -> dict[str, Any]:
    """One input of ``POST /crm/v3/objects/notes/batch/create``, on the contact's timeline."""
    return {"properties": {"hs_timestamp": timestamp, "hs_note_body": body},
            "associations": [{"to": {"id": hubspot_id}, "types": [
                {"associationCategory": "HUBSPOT_DEFINED",
                 "associationTypeId": NOTE_TO_CONTACT}]}],
            "objectWriteTraceId": trace_id}


def handoff_note(data: Mapping[str, Any]) -> str:
    """What sales reads first: why, how good, what the lead did recently."""
    contact = data.get("contact") or {}
    parts = [f"<p><strong>Handed to sales by Leadwerk</strong>: "
             f"{html.escape(str(data.get('reason') or 'sales-ready'))}</p>"]
    facts = [f"{name} {html.escape(text(contact[name]))}"
             for name in ("rating", "score", "stage") if contact.get(name) is not None]
    if facts:
        parts.append(f"<p>{', '.join(facts)}</p>")
    if data.get("summary"):
        parts.append(f"<p>Recent activity: {html.escape(str(data['summary']))}</p>")
    return "".join(parts)


def ids_by_email(response: Mapping[str, Any]) -> dict[str, str]:
    """HubSpot contact ids from a batch upsert answer, by lowercased email."""
    found: dict[str, str] = {}
    for result in response.get("results") or []:
        email = (result.get("properties") or {}).get("email")
        if isinstance(email, str) and result.get("id") is not None:
            found[email.lower()] = str(result["id"])
    return found


def errors(response: Mapping[str, Any]) -> str:
    """The messages of a 207 (multi-status) answer."""
    return "; ".join(str(e.get("message")) for e in response.get("errors") or [])[:500]


def signature_valid(secret: str, *, method: str, uri: str, body: bytes, timestamp: str,
                    signature: str, now_ms: int) -> bool:
    """HubSpot's v3 request signature: base64 HMAC-SHA256 over method, URI, body and
    timestamp, with the app's client secret; at most five minutes old."""
    if not timestamp.isdigit() or abs(now_ms - int(timestamp)) > SIGNATURE_MAX_AGE_MS:
        return False
    message = method.encode() + uri.encode() + body + timestamp.encode()
    expected = base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest())
    return hmac.compare_digest(expected, signature.encode())


@dataclass(frozen=True)
class Change:
    """One HubSpot webhook event in Leadwerk's terms: a verdict (``status``) or trait and
    owner changes (``traits``)."""

    event_id: str
    hubspot_id: str
    occurred_ms: int | None
    status: str | None = None
    reason: str | None = None
    traits: dict[str, Any] | None = None


def change(connector: Connector, event: Mapping[str, Any]) -> Change | None:
    """A ``contact.propertyChange`` event read through the connector's mapping, or ``None``
    for what Leadwerk does not follow."""
    if event.get("subscriptionType") != "contact.propertyChange" \
            or event.get("eventId") is None or event.get("objectId") is None:
        return None
    name, value = event.get("propertyName"), event.get("propertyValue")
    occurred = event.get("occurredAt")
    base = Change(str(event["eventId"]), str(event["objectId"]),
                  occurred if isinstance(occurred, int) else None)
    if name in {"lifecyclestage", "hs_lead_status"}:
        table = merged(STAGES if name == "lifecyclestage" else LEAD_STATUS,
                       connector.stages if name == "lifecyclestage" else connector.lead_status)
        stage = _INBOUND_STATUS.get(str(value)) or next(
            (ours for ours, theirs in table.items()
             if theirs == value and ours in _SALES_STAGES), None)
        if stage is None:
            return None
        reason = str(value) if stage in {"recycled", "disqualified"} else None
        return replace(base, status=_SALES_STAGES[stage], reason=reason)
    if name == "hubspot_owner_id":
        owner = next((o for o, i in connector.owners.items() if i == str(value)),
                     f"hubspot:{value}" if value else None)
        return replace(base, traits={"owner": owner})
    trait = next((ours for ours, theirs in merged(FIELDS, connector.fields).items()
                  if theirs == name), None)
    # Identity (email) and what Leadwerk computes itself do not come back from the CRM.
    if trait is None or trait in _COMPUTED or trait.startswith(("first_touch.", "last_touch.")):
        return None
    return replace(base, traits={trait: value if value != "" else None})
