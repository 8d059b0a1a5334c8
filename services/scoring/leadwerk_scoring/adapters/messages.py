"""Outgoing contact messages: envelopes with deterministic ids, keyed by contact."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from leadwerk_platform.envelope import Envelope, encode
from leadwerk_platform.kafka.producer import OutgoingMessage
from leadwerk_platform.settings import PlatformSettings

PRODUCER = "scoring"
_NAMESPACE = uuid.UUID("3f6b1c2d-9a8e-5b7c-a1d2-e3f4a5b6c7d8")

CONTACT_EVENTS = "contact-events"
CONTACT_CHANGES = "contact-changes"


def derived_id(*parts: str) -> str:
    """Deterministic message id: a message re-published after a crash deduplicates."""
    return str(uuid.uuid5(_NAMESPACE, "\x1f".join(parts)))


def contact_message(settings: PlatformSettings, topic: str, event_type: str, *, event_id: str,
                    workspace: str, contact_id: str, occurred_at: datetime,
                    data: dict[str, Any], correlation_id: str | None) -> OutgoingMessage:
    envelope = Envelope(id=event_id, type=event_type, workspace=workspace,
                        occurred_at=occurred_at, received_at=datetime.now(UTC),
                        producer=PRODUCER, data=data, correlation_id=correlation_id)
    return OutgoingMessage(settings.topic(topic), f"{workspace}:{contact_id}".encode(),
                           encode(envelope))
