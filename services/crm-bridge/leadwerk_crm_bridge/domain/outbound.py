"""Outbound delivery rules (pure): which addresses may be called, when to try again, how a
Standard Webhooks request is signed."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Literal

from standardwebhooks.webhooks import Webhook


def forbidden(address: str) -> str | None:
    """Why an IP address must not be called from here (SSRF), or ``None`` when it may: only
    globally routable addresses may (IPv4 inside IPv6 — mapped, 6to4, NAT64 — checked too)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            ip = embedded
    for name, test in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                       ("unspecified", ip.is_unspecified), ("multicast", ip.is_multicast),
                       ("reserved", ip.is_reserved), ("private", ip.is_private),
                       ("non-global", not ip.is_global)):
        if test:
            return f"{address} is a {name} address"
    return None


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class Verdict:
    kind: Literal["delivered", "retry", "dead"]
    at: datetime | None = None  # the next attempt (retry)
    reason: str = ""


def retry_after(value: str | None, now: datetime) -> timedelta | None:
    """``Retry-After`` as seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return timedelta(seconds=int(value))
    try:
        return max(parsedate_to_datetime(value) - now, timedelta(0))
    except (TypeError, ValueError):
        return None


def judge(status: int | None, error: str | None, *, attempt: int, now: datetime,
          retry_after_header: str | None, attempts: int, base: float, ceiling: float,
          rng: random.Random | None = None) -> Verdict:
    """What an answer (``status``, or a transport ``error``) means for a delivery after
    ``attempt`` tries: 2xx delivered; 408, 425, 429, 5xx and transport errors retried with
    exponential back-off and full jitter (or ``Retry-After``) until ``attempts``; any other
    4xx is dead at once (the receiver refuses it; replay after fixing)."""
    if status is not None and 200 <= status < 300:
        return Verdict("delivered")
    reason = error or f"HTTP {status}"
    if status is not None and status < 500 and status not in {408, 425, 429}:
        return Verdict("dead", reason=f"{reason}: the receiver refused the delivery")
    if attempt >= attempts:
        return Verdict("dead", reason=f"{reason} after {attempt} attempts")
    wait = retry_after(retry_after_header, now) if status in {429, 503} else None
    if wait is None:
        wait = timedelta(seconds=(rng or random).uniform(0, min(ceiling,
                                                                   base * 2 ** (attempt - 1))))
    return Verdict("retry", now + min(wait, timedelta(seconds=ceiling)), reason)


def sign(secrets: list[str], delivery_id: str, at: datetime, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers: every current secret signs (a rotation keeps two)."""
    text = body.decode()
    signatures = " ".join(Webhook(s).sign(delivery_id, at, text) for s in secrets)
    return {"webhook-id": delivery_id, "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": signatures}


def development_secret(secret_key: str, purpose: str) -> str:
    """A ``whsec_`` secret derived from the platform key (development only)."""
    key = hmac.new(secret_key.encode(), f"leadwerk-webhook:{purpose}".encode(),
                   hashlib.sha256).digest()
    return "whsec_" + base64.b64encode(key).decode()
