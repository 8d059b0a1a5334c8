"""Asynchronous bounces and complaints (pure): RFC 3464 delivery status notifications as
relays send them, and a small JSON form for provider webhooks."""

from __future__ import annotations

import email
import email.policy
from dataclasses import dataclass
from email.message import Message
from email.utils import parseaddr
from typing import Any, Literal


@dataclass(frozen=True)
class Bounce:
    recipient: str
    kind: Literal["failed", "delayed", "delivered", "complaint"]
    status: str | None = None  # RFC 3463, e.g. "5.1.1"
    diagnostic: str | None = None
    message_id: str | None = None  # the original Message-ID, without angle brackets

    @property
    def hard(self) -> bool:
        return self.kind == "failed" and (self.status or "5").startswith("5")


class BounceFormatError(ValueError):
    """Not a delivery status notification or bounce webhook we can read."""


def _address(value: str | None) -> str:
    """``rfc822; user@example.de`` → ``user@example.de``."""
    text = (value or "").partition(";")[2] or (value or "")
    return parseaddr(text.strip())[1].lower()


def parse_dsn(raw: bytes) -> list[Bounce]:
    """The per-recipient reports of a ``multipart/report; report-type=delivery-status``."""
    report = email.message_from_bytes(raw, policy=email.policy.compat32)
    status_part = next((p for p in report.walk()
                        if p.get_content_type() == "message/delivery-status"), None)
    if status_part is None:
        raise BounceFormatError("no message/delivery-status part (RFC 3464)")
    original = next((p for p in report.walk() if p.get_content_type() in
                     {"text/rfc822-headers", "message/rfc822"}), None)
    message_id = _original_message_id(original)
    blocks = status_part.get_payload()
    if not isinstance(blocks, list) or len(blocks) < 2:
        raise BounceFormatError("a delivery-status part holds the message's fields, then "
                                "one block per recipient")
    bounces = []
    for block in blocks[1:]:
        if not isinstance(block, Message):
            continue
        recipient = _address(block.get("Final-Recipient") or block.get("Original-Recipient"))
        action = str(block.get("Action", "")).strip().lower()
        if not recipient or action not in {"failed", "delayed", "delivered"}:
            continue
        bounces.append(Bounce(recipient, action,  # type: ignore[arg-type]
                              str(block.get("Status", "")).strip() or None,
                              " ".join(str(block.get("Diagnostic-Code", "")).split()) or None,
                              message_id))
    if not bounces:
        raise BounceFormatError("no recipient with an Action of failed, delayed or delivered")
    return bounces


def _original_message_id(part: Message | None) -> str | None:
    if part is None:
        return None
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        value = payload[0].get("Message-ID")  # message/rfc822
    else:
        headers = email.message_from_string(str(payload), policy=email.policy.compat32)
        value = headers.get("Message-ID")
    return str(value).strip().strip("<>") if value else None


def parse_webhook(body: Any) -> list[Bounce]:
    """``{"events": [{"type": "bounce" | "complaint" | "delayed", "recipient": …,
    "status": "5.1.1", "reason": …, "message_id": …}]}`` (one event without the list too)."""
    events = body.get("events", [body]) if isinstance(body, dict) else None
    if not isinstance(events, list) or not events:
        raise BounceFormatError('expected {"events": [{"type", "recipient", …}]}')
    kinds = {"bounce": "failed", "hard_bounce": "failed", "soft_bounce": "failed",
             "complaint": "complaint", "delayed": "delayed", "delivered": "delivered"}
    bounces = []
    for index, event in enumerate(events):
        if not isinstance(event, dict) or event.get("type") not in kinds \
                or not _address(str(event.get("recipient") or "")):
            raise BounceFormatError(f"events.{index}: needs a type "
                                    f"({', '.join(kinds)}) and a recipient")
        status = event.get("status")
        if event["type"] == "soft_bounce" and not status:
            status = "4.0.0"
        bounces.append(Bounce(_address(str(event["recipient"])),
                              kinds[event["type"]],  # type: ignore[arg-type]
                              str(status) if status else None,
                              str(event["reason"]) if event.get("reason") else None,
                              str(event["message_id"]).strip("<>")
                              if event.get("message_id") else None))
    return bounces
