"""Whether an email may go out now (pure): checked at send time, not at enrollment."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from email.utils import parseaddr
from typing import Any

#: Suppression reasons that stop every class of mail to the customer (not internal alerts):
#: nobody is there, or the person is gone.
BLOCK_ALL = frozenset({"hard_bounce", "complaint", "erased"})
#: Consent log actions that allow marketing email (the last entry per purpose counts).
ALLOWING = frozenset({"granted", "confirmed"})


_BARE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")


def split_address(value: str) -> tuple[str, str]:
    """``email.utils.parseaddr``: (display name, address); a bare address (as most are)
    without the parser, which costs more than the rest of the policy check."""
    if _BARE.fullmatch(value):
        return "", value
    return parseaddr(value)


def valid_address(value: object) -> bool:
    if not isinstance(value, str):
        return False
    _, address = split_address(value)
    local, _, domain = address.rpartition("@")
    return bool(local) and "." in domain and " " not in address


def refusal(command: Mapping[str, Any], now: datetime, *, suppression: str | None,
            consent: str | None, require_consent: bool) -> str | None:
    """Why the command must not be sent (``None``: send it). ``suppression``: the address's
    suppression reason; ``consent``: the last marketing-consent action of the contact."""
    not_after = command.get("not_after")
    if isinstance(not_after, str) and datetime.fromisoformat(not_after) < now:
        return "expired"
    if not valid_address(command.get("to")):
        return "no_address"
    kind = command.get("class")
    if kind == "internal":
        return None
    if suppression is not None and (kind == "marketing" or suppression in BLOCK_ALL):
        return suppression
    if kind == "marketing" and require_consent and consent not in ALLOWING:
        return "consent_pending" if consent == "pending" else "no_consent"
    return None
