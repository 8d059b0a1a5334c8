"""Signed tokens for email links, shared by the mailer (issues them) and ingest (honours them).

A token is an itsdangerous URL-safe, timestamped, HMAC-SHA256 signature over a compact JSON
payload, keyed by ``LEADWERK_SECRET_KEY`` and salted per purpose, so an open token cannot be
replayed as a click token. Any change to the payload, the purpose or the key gives a token that
does not verify: ingest answers 404 and no redirect happens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer


class TokenKind(StrEnum):
    OPEN = "open"
    CLICK = "click"
    UNSUBSCRIBE = "unsubscribe"
    CONFIRM = "confirm"


#: How long a token stays valid. Opens, clicks and unsubscribes must keep working for mail read
#: months later; an opt-in confirmation must be fresh.
DEFAULT_MAX_AGE: dict[TokenKind, int | None] = {
    TokenKind.OPEN: None,
    TokenKind.CLICK: None,
    TokenKind.UNSUBSCRIBE: None,
    TokenKind.CONFIRM: 7 * 86_400,
}


class InvalidTokenError(ValueError):
    """Forged, altered, expired or malformed."""


@dataclass(frozen=True, slots=True)
class EmailToken:
    kind: TokenKind
    workspace: str
    contact_id: str
    message_id: str | None = None
    url: str | None = None  # click target
    link_id: str | None = None
    purpose: str | None = None  # unsubscribe / confirm: the consent purpose (e.g. "marketing")
    consent_text_version: str | None = None
    issued_at: datetime | None = None  # set when decoded

    def _payload(self) -> dict[str, Any]:
        full = {"w": self.workspace, "c": self.contact_id, "m": self.message_id, "u": self.url,
                "l": self.link_id, "p": self.purpose, "v": self.consent_text_version}
        return {k: v for k, v in full.items() if v is not None}


class TokenSigner:
    def __init__(self, secret_key: str) -> None:
        # Derive a dedicated key, so the raw secret key is never used for two purposes.
        key = hashlib.sha256(b"leadwerk-email-token\x00" + secret_key.encode()).hexdigest()
        self._serializers = {
            kind: URLSafeTimedSerializer(key, salt=f"leadwerk.{kind.value}",
                                         signer_kwargs={"digest_method": hashlib.sha256})
            for kind in TokenKind
        }

    def sign(self, token: EmailToken) -> str:
        return str(self._serializers[token.kind].dumps(token._payload()))

    def verify(self, kind: TokenKind, text: str, max_age: int | None = None) -> EmailToken:
        age = max_age if max_age is not None else DEFAULT_MAX_AGE[kind]
        try:
            payload, signed_at = self._serializers[kind].loads(
                text, max_age=age, return_timestamp=True)
        except SignatureExpired as error:
            raise InvalidTokenError("token expired") from error
        except BadSignature as error:
            raise InvalidTokenError("token signature invalid") from error
        if not isinstance(payload, dict) or not isinstance(payload.get("w"), str) \
                or not isinstance(payload.get("c"), str):
            raise InvalidTokenError("token payload malformed")
        if kind is TokenKind.CLICK and not _is_http_url(payload.get("u")):
            raise InvalidTokenError("click token without an http(s) target")
        return EmailToken(
            kind=kind, workspace=payload["w"], contact_id=payload["c"],
            message_id=payload.get("m"), url=payload.get("u"), link_id=payload.get("l"),
            purpose=payload.get("p"), consent_text_version=payload.get("v"),
            issued_at=signed_at.astimezone(UTC),
        )


def _is_http_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("https://", "http://"))
