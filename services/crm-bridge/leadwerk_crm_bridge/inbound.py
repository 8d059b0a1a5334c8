"""The closed loop: CRMs tell us what sales did with a lead. A generic endpoint following the
Standard Webhooks specification (signed with our inbound secret); each accepted event becomes
``crm.lead_feedback.v1`` on crm-events, once per CRM event id."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from leadwerk_crm_bridge.deliveries import Deps
from leadwerk_platform.envelope import Envelope, encode
from leadwerk_platform.kafka.producer import OutgoingMessage
from leadwerk_platform.outbox import add_to_outbox

OUTBOX_STREAM = "inbound"
_NAMESPACE = uuid.UUID("9a8b7c6d-5e4f-5a3b-8c2d-1e0f9a8b7c6d")
#: What a CRM may report → the ``crm.lead_feedback.v1`` status (scoring maps it to a stage).
STATUSES = {"lead.accepted": "accepted", "lead.qualified": "qualified",
            "lead.rejected": "rejected", "lead.disqualified": "disqualified",
            "lead.reopened": "reopened", "deal.won": "won", "deal.lost": "lost"}


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


def feedback(payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(contact id, ``crm.lead_feedback.v1`` data) from ``{"type", "data"}``."""
    kind, data = payload.get("type"), payload.get("data")
    if kind not in STATUSES:
        raise InboundError(422, f"type must be one of {', '.join(STATUSES)}")
    if not isinstance(data, dict) or not isinstance(data.get("contact_id"), str):
        raise InboundError(422, "data.contact_id (Leadwerk's id, sent with the hand-off) "
                                "is required")
    try:
        contact_id = str(uuid.UUID(data["contact_id"]))
    except ValueError as error:
        raise InboundError(422, "data.contact_id is not a contact id") from error
    return contact_id, {
        "contact_id": contact_id, "status": STATUSES[kind],
        "reason": data.get("reason"), "connector": "webhook",
        "crm_id": None if data.get("crm_id") is None else str(data["crm_id"]),
        "value": data.get("value")}


async def receive(deps: Deps, workspace: str, body: bytes,
                  headers: dict[str, str]) -> dict[str, Any]:
    payload = verified(deps, body, headers)
    contact_id, data = feedback(payload)
    event_id = headers.get("webhook-id", "")
    now = deps.clock()
    async with deps.pool.acquire() as connection, connection.transaction():
        fresh = await connection.fetchval(
            "INSERT INTO inbound_events (workspace, source, event_id) VALUES ($1, 'webhook', $2) "
            "ON CONFLICT DO NOTHING RETURNING true", workspace, event_id)
        if not fresh:
            deps.metrics.inbound.labels("duplicate").inc()
            return {"accepted": True, "duplicate": True}
        envelope = Envelope(
            id=str(uuid.uuid5(_NAMESPACE, f"{workspace}\x1fwebhook\x1f{event_id}")),
            type="crm.lead_feedback.v1", workspace=workspace, occurred_at=_occurred(headers, now),
            received_at=now, producer="crm-bridge", data=data, correlation_id=event_id)
        await add_to_outbox(connection, OUTBOX_STREAM, [OutgoingMessage(
            deps.settings.topic("crm-events"), f"{workspace}:{contact_id}".encode(),
            encode(envelope))])
    deps.metrics.inbound.labels("accepted").inc()
    return {"accepted": True, "duplicate": False, "event": envelope.id,
            "status": data["status"]}


def _occurred(headers: dict[str, str], now: datetime) -> datetime:
    stamp = headers.get("webhook-timestamp", "")
    return datetime.fromtimestamp(int(stamp), UTC) if stamp.isdigit() else now
