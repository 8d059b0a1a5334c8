"""The closed loop: CRMs tell us what sales did with a lead. Two endpoints: a generic one
following the Standard Webhooks specification (signed with our inbound secret) and HubSpot's
webhook format (its v3 request signature, the app's client secret). Verdicts become
``crm.lead_feedback.v1``, owner and field changes ``crm.contact_updated.v1`` on crm-events,
once per CRM event id."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from leadwerk_crm_bridge.config import Connector
from leadwerk_crm_bridge.deliveries import Deps
from leadwerk_crm_bridge.domain import hubspot
from leadwerk_platform.envelope import Envelope, encode, parse_timestamp
from leadwerk_platform.kafka.producer import OutgoingMessage
from leadwerk_platform.outbox import add_to_outbox

OUTBOX_STREAM = "inbound"
_NAMESPACE = uuid.UUID("9a8b7c6d-5e4f-5a3b-8c2d-1e0f9a8b7c6d")
#: What a CRM may report → the ``crm.lead_feedback.v1`` status (scoring maps it to a stage).
STATUSES = {"lead.accepted": "accepted", "lead.qualified": "qualified",
            "lead.rejected": "rejected", "lead.disqualified": "disqualified",
            "lead.reopened": "reopened", "deal.won": "won", "deal.lost": "lost"}
UPDATES = ("owner.changed", "contact.updated")
Connection = Any


class InboundError(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def verified(deps: Deps, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """The payload, once one of our secrets verifies the signature (and the timestamp is
    within five minutes); else :class:`InboundError` 401."""
    keys = deps.secrets("inbound")
    if not keys:
        raise InboundError(503, "no inbound webhook secret configured "
                                "(LEADWERK_INBOUND_WEBHOOK_SECRETS)")
    for key in keys:
        try:
            payload = Webhook(key).verify(body, headers)
        except WebhookVerificationError:
            continue
        if not isinstance(payload, dict):
            raise InboundError(422, "the payload is a JSON object")
        return payload
    raise InboundError(401, "signature does not verify (or the timestamp is too old)")


def generic(payload: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(contact id, message type, data) from ``{"type", "data"}``."""
    kind, data = payload.get("type"), payload.get("data")
    if kind not in STATUSES and kind not in UPDATES:
        raise InboundError(422, f"type must be one of {', '.join([*STATUSES, *UPDATES])}")
    if not isinstance(data, dict) or not isinstance(data.get("contact_id"), str):
        raise InboundError(422, "data.contact_id (Leadwerk's id, sent with the hand-off) "
                                "is required")
    try:
        contact_id = str(uuid.UUID(data["contact_id"]))
    except ValueError as error:
        raise InboundError(422, "data.contact_id is not a contact id") from error
    crm_id = None if data.get("crm_id") is None else str(data["crm_id"])
    if kind in STATUSES:
        return contact_id, "crm.lead_feedback.v1", {
            "contact_id": contact_id, "status": STATUSES[kind], "reason": data.get("reason"),
            "connector": "webhook", "crm_id": crm_id, "value": data.get("value")}
    if kind == "owner.changed":
        if not isinstance(data.get("owner"), str | None):
            raise InboundError(422, "data.owner is the new owner (an email) or null")
        traits: Any = {"owner": data.get("owner")}
    else:
        traits = data.get("traits")
        if not isinstance(traits, dict) or not traits:
            raise InboundError(422, "data.traits names the changed fields")
    return contact_id, "crm.contact_updated.v1", {
        "contact_id": contact_id, "traits": traits, "connector": "webhook", "crm_id": crm_id}


async def receive(deps: Deps, workspace: str, body: bytes,
                  headers: dict[str, str]) -> dict[str, Any]:
    payload = verified(deps, body, headers)
    _, kind, data = generic(payload)
    occurred = _stated(payload.get("occurred_at"), deps)
    event_id = headers.get("webhook-id", "")
    async with deps.pool.acquire() as connection, connection.transaction():
        envelope = await _publish(deps, connection, workspace, "webhook", event_id, kind,
                                  data, occurred)
    if envelope is None:
        deps.metrics.inbound.labels("webhook", "duplicate").inc()
        return {"accepted": True, "duplicate": True}
    deps.metrics.inbound.labels("webhook", "accepted").inc()
    return {"accepted": True, "duplicate": False, "event": envelope.id,
            **({"status": data["status"]} if "status" in data else {})}


def hubspot_connector(deps: Deps, workspace: str, connector_id: str | None) -> Connector:
    candidates = [c for c in deps.config.connectors if c.workspace == workspace
                  and c.kind == "hubspot" and connector_id in {None, c.id}]
    if not candidates:
        raise InboundError(404, "no HubSpot connector in this workspace")
    return candidates[0]


async def receive_hubspot(deps: Deps, connector: Connector, *, uri: str,
                          body: bytes, headers: Mapping[str, str]) -> dict[str, Any]:
    """HubSpot's webhook batch: every event checked against our records of which HubSpot
    contact is which Leadwerk contact; unknown contacts and unfollowed properties are
    ignored (counted)."""
    secret = deps.secret(connector, "client_secret")
    if not secret:
        raise InboundError(503, f"no HubSpot client secret configured for {connector.id}")
    now_ms = int(deps.clock().timestamp() * 1000)
    if not hubspot.signature_valid(
            secret, method="POST", uri=uri, body=body,
            timestamp=headers.get("x-hubspot-request-timestamp", ""),
            signature=headers.get("x-hubspot-signature-v3", ""), now_ms=now_ms):
        raise InboundError(401, "X-HubSpot-Signature-v3 does not verify (or is too old)")
    try:
        events = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise InboundError(422, "the body is not JSON") from error
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise InboundError(422, "HubSpot sends a JSON array of events")
    counts = {"accepted": 0, "duplicate": 0, "ignored": 0}
    source = f"hubspot:{connector.id}"
    async with deps.pool.acquire() as connection, connection.transaction():
        for event in events:
            change = hubspot.change(connector, event)
            contact_id = None if change is None else await connection.fetchval(
                "SELECT contact_id::text FROM crm_records WHERE workspace = $1 "
                "AND connector = $2 AND crm_id = $3", connector.workspace, connector.id,
                change.hubspot_id)
            if change is None or contact_id is None:
                counts["ignored"] += 1
                continue
            common = {"contact_id": contact_id, "connector": connector.id,
                      "crm_id": change.hubspot_id}
            kind, data = ("crm.lead_feedback.v1", {
                **common, "status": change.status, "reason": change.reason, "value": None,
            }) if change.status else ("crm.contact_updated.v1",
                                      {**common, "traits": change.traits})
            occurred = datetime.fromtimestamp(change.occurred_ms / 1000, UTC) \
                if change.occurred_ms else deps.clock()
            published = await _publish(deps, connection, connector.workspace, source,
                                       change.event_id, kind, data, occurred)
            counts["accepted" if published else "duplicate"] += 1
    for result, count in counts.items():
        deps.metrics.inbound.labels("hubspot", result).inc(count)
    return counts


async def _publish(deps: Deps, connection: Connection, workspace: str,  # noqa: PLR0917
                   source: str, event_id: str, kind: str, data: dict[str, Any],
                   occurred: datetime) -> Envelope | None:
    """The event onto crm-events through the outbox, unless this CRM event id was taken."""
    fresh = await connection.fetchval(
        "INSERT INTO inbound_events (workspace, source, event_id) VALUES ($1, $2, $3) "
        "ON CONFLICT DO NOTHING RETURNING true", workspace, source, event_id)
    if not fresh:
        return None
    now = deps.clock()
    envelope = Envelope(
        id=str(uuid.uuid5(_NAMESPACE, f"{workspace}\x1f{source}\x1f{event_id}")),
        type=kind, workspace=workspace, occurred_at=min(occurred, now), received_at=now,
        producer="crm-bridge", data=data, correlation_id=event_id)
    await add_to_outbox(connection, OUTBOX_STREAM, [OutgoingMessage(
        deps.settings.topic("crm-events"), f"{workspace}:{data['contact_id']}".encode(),
        encode(envelope))])
    return envelope


def _stated(stamp: Any, deps: Deps) -> datetime:
    """When the CRM says it happened (``occurred_at``, ISO 8601), else when it arrived. Not
    the ``webhook-timestamp``: that is the delivery attempt's, in whole seconds, and would
    put a verdict before the activity it follows."""
    if stamp is None:
        return deps.clock()
    try:
        return parse_timestamp(str(stamp))
    except ValueError as error:
        raise InboundError(422, "occurred_at is an ISO 8601 timestamp") from error
