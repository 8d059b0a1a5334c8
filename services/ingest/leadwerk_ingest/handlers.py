"""Turn validated requests into tracking-event envelopes (pure; no I/O)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, NamedTuple

import orjson

from leadwerk_ingest.domain.enrich import anonymize_ip, campaign_fields, correct_event_time
from leadwerk_ingest.domain.messages import Call
from leadwerk_platform.envelope import derive_event_id, format_timestamp

PRODUCER = "ingest"
_EVENT_TYPES = {kind: f"tracking.{kind}.v1"
                for kind in ("track", "page", "screen", "identify", "group", "alias")}


class RequestFacts(NamedTuple):
    """What the HTTP layer knows about the request, independent of its body."""

    received_at: datetime
    ip: str | None
    user_agent: str | None
    correlation_id: str

    @property
    def received_at_text(self) -> str:
        return format_timestamp(self.received_at)


class Outgoing(NamedTuple):
    """An encoded tracking event, ready for the producer (a tuple: built for every event)."""

    key: bytes
    type: str
    value: bytes



def identity_key(workspace: str, user_id: str | None, anonymous_id: str | None) -> bytes:
    """Partition key: the raw identity whose order matters (userId, else anonymousId)."""
    if user_id is not None:
        return f"{workspace}:u:{user_id}".encode()
    return f"{workspace}:a:{anonymous_id}".encode()


def contact_key(workspace: str, contact_id: str) -> bytes:
    return f"{workspace}:c:{contact_id}".encode()


def client_facts(facts: RequestFacts, context: dict[str, Any], *, anonymize: bool,
                 bot: bool) -> dict[str, Any]:
    ip = context.get("ip") if isinstance(context.get("ip"), str) else facts.ip
    user_agent = context.get("userAgent")
    library = context.get("library")
    return {
        "ip": anonymize_ip(ip) if anonymize else ip,
        "user_agent": user_agent if isinstance(user_agent, str) else facts.user_agent,
        "bot": bot,
        "library": library.get("name") if isinstance(library, dict) else None,
    }


def segment_event(call: Call, workspace: str, facts: RequestFacts, *, batch_sent_at: str | None,
                  anonymize: bool, bot: bool, received_at_text: str | None = None) -> Outgoing:
    """One Segment call → one envelope. Raises ``BadTimestampError`` for unparseable times.

    ``received_at_text`` saves formatting the same request time for every event of a batch.
    """
    time = correct_event_time(facts.received_at, call.timestamp, call.originalTimestamp,
                              call.sentAt or batch_sent_at)
    message_id = call.messageId or str(uuid.uuid4())
    context = call.context
    if "ip" in context:  # the raw IP never goes on the wire; client.ip carries the anonymised one
        context = {k: v for k, v in context.items() if k != "ip"}
    client = client_facts(facts, call.context, anonymize=anonymize, bot=bot)
    client["clock_skew_ms"] = time.skew_ms
    client["timestamp_clamped"] = time.clamped
    data: dict[str, Any] = {
        "message_id": message_id,
        "user_id": call.userId,
        "anonymous_id": call.anonymousId,
        "context": context,
        "client": client,
        "original_timestamp": call.timestamp or call.originalTimestamp,
    }
    properties: dict[str, Any] | None = None
    match call.type:
        case "track":
            data["event"] = call.event
            data["properties"] = properties = call.properties
        case "page" | "screen":
            data["name"] = call.name
            data["category"] = call.category
            data["properties"] = properties = call.properties
        case "identify":
            data["traits"] = call.traits
        case "group":
            data["group_id"] = call.groupId
            data["traits"] = call.traits
        case "alias":
            data["previous_id"] = call.previousId
    data["campaign"] = campaign_fields(call.context, properties)
    event_type = _EVENT_TYPES[call.type]
    message = {
        "id": derive_event_id(workspace, message_id),
        "type": event_type,
        "workspace": workspace,
        "occurred_at": (received_at_text or facts.received_at_text) if time.occurred_at
        is facts.received_at else format_timestamp(time.occurred_at),
        "received_at": received_at_text or facts.received_at_text,
        "producer": PRODUCER,
        "correlation_id": facts.correlation_id,
        "data": data,
    }
    key = identity_key(workspace, call.userId, call.anonymousId)
    return Outgoing(key, event_type, orjson.dumps(message))


def request_event(event_type: str, workspace: str, key: bytes, facts: RequestFacts,
                  data: dict[str, Any], *, event_id: str) -> Outgoing:
    """An event that happened when the request arrived (form posts, email links)."""
    full_type = f"tracking.{event_type}.v1"
    message = {
        "id": event_id,
        "type": full_type,
        "workspace": workspace,
        "occurred_at": facts.received_at_text,
        "received_at": facts.received_at_text,
        "producer": PRODUCER,
        "correlation_id": facts.correlation_id,
        "data": data,
    }
    return Outgoing(key, full_type, orjson.dumps(message))


def token_event(event_type: str, workspace: str, contact_id: str, facts: RequestFacts,
                data: dict[str, Any], *, event_id: str | None = None) -> Outgoing:
    """An event caused by a signed email token (open, click, unsubscribe, confirm)."""
    return request_event(event_type, workspace, contact_key(workspace, contact_id), facts,
                         {"contact_id": contact_id, **data},
                         event_id=event_id or str(uuid.uuid4()))
