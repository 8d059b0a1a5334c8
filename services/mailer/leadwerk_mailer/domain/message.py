"""From a rendered template to the bytes handed to SMTP (pure): tracked links and the open
pixel, the RFC 8058 one-click unsubscribe headers, the MIME structure, the DKIM signature."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

_LINK = re.compile(r"""(<a\b[^>]*?\bhref\s*=\s*)(["'])(https?://[^"']+)\2([^>]*>)""",
                   re.IGNORECASE)
_NO_TRACK = "data-lw-notrack"

#: Headers the DKIM signature covers (RFC 8058 asks for both List-Unsubscribe headers).
SIGNED_HEADERS = (b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
                  b"content-type", b"list-unsubscribe", b"list-unsubscribe-post")


def track_links(html: str, tracked: Callable[[str, int], str]) -> tuple[str, int]:
    """Every http(s) link through ``tracked(url, index)``, except links marked
    ``data-lw-notrack`` (the unsubscribe link, for one). Returns the HTML and the count."""
    count = 0

    def rewrite(match: re.Match[str]) -> str:
        nonlocal count
        head, quote, url, tail = match.groups()
        if _NO_TRACK in head or _NO_TRACK in tail:
            return match.group(0)
        count += 1
        return f"{head}{quote}{tracked(url.replace('&amp;', '&'), count)}{quote}{tail}"

    return _LINK.sub(rewrite, html), count


def add_pixel(html: str, url: str) -> str:
    pixel = (f'<img src="{url}" width="1" height="1" alt="" '
             'style="display:block;border:0;width:1px;height:1px" />')
    index = html.lower().rfind("</body>")
    return html[:index] + pixel + html[index:] if index >= 0 else html + pixel


@dataclass(frozen=True)
class Envelope:
    """Who, to whom, with which id: what the SMTP transaction and the headers need."""

    message_id: str  # the RFC 5322 Message-ID, without angle brackets
    sender: str  # "Name <address>" or an address
    to: str
    subject: str
    date: datetime
    reply_to: str | None = None
    #: HTTPS one-click unsubscribe URL (RFC 8058) and an optional mailto: fallback.
    unsubscribe_url: str | None = None
    unsubscribe_mailto: str | None = None


def build(envelope: Envelope, html: str, text: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = _address(envelope.sender)
    message["To"] = _address(envelope.to)
    message["Subject"] = envelope.subject
    message["Date"] = format_datetime(envelope.date)
    message["Message-ID"] = f"<{envelope.message_id}>"
    if envelope.reply_to:
        message["Reply-To"] = _address(envelope.reply_to)
    if envelope.unsubscribe_url:
        targets = [f"<{envelope.unsubscribe_url}>"]
        if envelope.unsubscribe_mailto:
            targets.append(f"<mailto:{envelope.unsubscribe_mailto}>")
        message["List-Unsubscribe"] = ", ".join(targets)
        message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    message.set_content(text, cte="quoted-printable")
    message.add_alternative(html, subtype="html", cte="quoted-printable")
    return message


def _address(value: str) -> Address:
    name, address = parseaddr(value)
    if "@" not in address:
        raise ValueError(f"not an email address: {value!r}")
    user, _, domain = address.rpartition("@")
    return Address(display_name=name, username=user, domain=domain)


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    private_key: bytes  # PEM


_PURE_PYTHON_RSA = dkim.RSASSA_PKCS1_v1_5_sign
_OPENSSL_KEYS: dict[int, rsa.RSAPrivateKey] = {}
_SHA256_BYTES = 32


def _openssl_rsa(digest: Any, private: dict[str, int]) -> bytes:
    """dkimpy's RSA step (PKCS#1 v1.5 over the header hash) done by OpenSSL: the same bytes
    as dkimpy's own pure-Python modular arithmetic, about eight times faster."""
    value = digest.digest()
    if len(value) != _SHA256_BYTES:
        return bytes(_PURE_PYTHON_RSA(digest, private))
    key = _OPENSSL_KEYS.get(private["modulus"])
    if key is None:
        key = rsa.RSAPrivateNumbers(
            p=private["prime1"], q=private["prime2"], d=private["privateExponent"],
            dmp1=private["exponent1"], dmq1=private["exponent2"],
            iqmp=private["coefficient"],
            public_numbers=rsa.RSAPublicNumbers(private["publicExponent"],
                                                private["modulus"])).private_key()
        _OPENSSL_KEYS[private["modulus"]] = key
    return key.sign(value, padding.PKCS1v15(), Prehashed(hashes.SHA256()))


def use_openssl_for_dkim() -> None:
    """Let dkimpy sign with OpenSSL (through ``cryptography``). dkimpy keeps canonicalisation,
    header selection and the signature header; only its RSA step is replaced (ADR 0012).
    Called when the mailer starts, never at import."""
    dkim.RSASSA_PKCS1_v1_5_sign = _openssl_rsa


def sign(raw: bytes, key: DkimKey) -> bytes:
    """``raw`` with a DKIM-Signature header prepended (relaxed/relaxed, rsa-sha256)."""
    present = {line.split(b":", 1)[0].strip().lower()
               for line in raw.split(b"\r\n\r\n", 1)[0].replace(b"\r\n", b"\n").split(b"\n")
               if b":" in line and not line.startswith((b" ", b"\t"))}
    headers = [h for h in SIGNED_HEADERS if h in present]
    signature = dkim.sign(raw, key.selector.encode(), key.domain.encode(), key.private_key,
                          canonicalize=(b"relaxed", b"relaxed"), include_headers=headers)
    return bytes(signature) + raw
