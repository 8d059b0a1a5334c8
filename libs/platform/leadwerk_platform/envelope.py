"""The one envelope every Kafka message carries, and its JSON codec.

The wire form is a JSON object::

    {"id": "<uuid>", "type": "tracking.track.v1", "workspace": "dev",
     "occurred_at": "2026-11-21T10:00:00.000Z", "received_at": "…", "producer": "ingest",
     "correlation_id": "…", "data": {…}}

``schemas/messages/envelope.schema.json`` is the contract; this module is its codec.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

#: Namespace for ids derived from a client's ``messageId`` (UUIDv5), fixed forever.
EVENT_ID_NAMESPACE = uuid.UUID("6c1b3f0e-2f4e-5a8e-9d57-4c6a1f0b2e01")


class InvalidMessageError(ValueError):
    """A message that can never be processed (bad JSON, missing envelope field …)."""


def derive_event_id(workspace: str, message_id: str) -> str:
    """Deterministic event id: a retried client request maps to the same id downstream.

    Exactly ``uuid.uuid5(EVENT_ID_NAMESPACE, f"{workspace}\\x1f{message_id}")``, computed
    without building UUID objects (it runs for every ingested event).
    """
    digest = hashlib.sha1(  # noqa: S324 - UUIDv5 is defined on SHA-1; not used for security
        _NAMESPACE_BYTES + f"{workspace}\x1f{message_id}".encode()).hexdigest()
    # Version nibble 5; variant bits 10 (RFC 9562).
    return (f"{digest[:8]}-{digest[8:12]}-5{digest[13:16]}-"
            f"{_VARIANT[digest[16]]}{digest[17:20]}-{digest[20:32]}")


_NAMESPACE_BYTES = EVENT_ID_NAMESPACE.bytes
_VARIANT = {c: format((int(c, 16) & 0x3) | 0x8, "x") for c in "0123456789abcdef"}


def format_timestamp(moment: datetime) -> str:
    """UTC ISO-8601 with milliseconds and a ``Z`` suffix."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_timestamp(text: str) -> datetime:
    """Parse an ISO-8601 timestamp; naive values are taken as UTC."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


_REQUIRED = ("id", "type", "workspace", "occurred_at", "received_at", "producer", "data")


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded message."""

    id: str
    type: str
    workspace: str
    occurred_at: datetime
    received_at: datetime
    producer: str
    data: dict[str, Any]
    correlation_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def major_version(self) -> int:
        """The ``N`` of a ``….vN`` event type."""
        return int(self.type.rsplit(".v", 1)[1])

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "workspace": self.workspace,
            "occurred_at": format_timestamp(self.occurred_at),
            "received_at": format_timestamp(self.received_at),
            "producer": self.producer,
            "correlation_id": self.correlation_id,
            "data": self.data,
        }


def encode(envelope: Envelope) -> bytes:
    return orjson.dumps(envelope.to_dict())


def decode(payload: bytes | None) -> Envelope:
    """Decode and check the envelope; raise :class:`InvalidMessageError` on anything malformed."""
    if payload is None:
        raise InvalidMessageError("message has no value")
    try:
        raw = orjson.loads(payload)
    except orjson.JSONDecodeError as error:
        raise InvalidMessageError(f"value is not JSON: {error}") from error
    if not isinstance(raw, dict):
        raise InvalidMessageError("value is not a JSON object")
    missing = [name for name in _REQUIRED if name not in raw]
    if missing:
        raise InvalidMessageError(f"envelope is missing {', '.join(missing)}")
    event_type = raw["type"]
    if not isinstance(event_type, str) or ".v" not in event_type:
        raise InvalidMessageError(f"event type {event_type!r} has no major version")
    if not isinstance(raw["data"], dict):
        raise InvalidMessageError("data is not an object")
    try:
        occurred_at = parse_timestamp(str(raw["occurred_at"]))
        received_at = parse_timestamp(str(raw["received_at"]))
        uuid.UUID(str(raw["id"]))
    except ValueError as error:
        raise InvalidMessageError(f"bad envelope field: {error}") from error
    known = {*_REQUIRED, "correlation_id"}
    return Envelope(
        id=str(raw["id"]),
        type=event_type,
        workspace=str(raw["workspace"]),
        occurred_at=occurred_at,
        received_at=received_at,
        producer=str(raw["producer"]),
        data=raw["data"],
        correlation_id=raw.get("correlation_id"),
        extra={k: v for k, v in raw.items() if k not in known},
    )
