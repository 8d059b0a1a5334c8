"""From a rendered template to the bytes handed to SMTP (pure): tracked links and the open
pixel, the RFC 8058 one-click unsubscribe headers, the MIME structure, the DKIM signature.

The message is written directly as bytes (RFC 5322 headers, RFC 2047 encoded words where a
header is not ASCII, ``multipart/alternative`` with quoted-printable parts) instead of through
the ``email`` package, whose header objects and folding took longer than rendering; and it is
signed here (DKIM, RFC 6376, relaxed/relaxed, rsa-sha256) with the key loaded once, instead of
by dkimpy, which parses the PEM key in Python for every message. dkimpy stays the independent
check in the tests. Why by hand: ADR 0015.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime, formataddr

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from leadwerk_mailer.domain.policy import split_address

_LINK = re.compile(r"""(<a\b[^>]*?\bhref\s*=\s*)(["'])(https?://[^"']+)\2([^>]*>)""",
                   re.IGNORECASE)
_NO_TRACK = "data-lw-notrack"


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
    index = max(html.rfind("</body>"), html.rfind("</BODY>"))
    if index < 0:  # written some other way: look again, case-blind (a copy of the mail)
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


#: Longest header line we write where the value allows folding (RFC 5322 recommends 78).
_LINE = 78
#: UTF-8 bytes per encoded word: ``=?utf-8?b?`` + 52 base64 characters + ``?=`` is 64 long.
_WORD_BYTES = 39


def build(envelope: Envelope, html: str, text: str) -> bytes:
    """The message as CRLF-terminated bytes: a text and an HTML alternative, both UTF-8 in
    quoted-printable (so no line is longer than 76 and the boundary, which contains ``=_``,
    cannot occur in a part). Raises :class:`ValueError` for an address that is not one, a
    non-ASCII address (that would need SMTPUTF8) or a line break in any header."""
    headers = [("From", _address(envelope.sender)), ("To", _address(envelope.to)),
               ("Subject", _unstructured("Subject", envelope.subject)),
               ("Date", format_datetime(envelope.date)),
               ("Message-ID", _ascii(f"<{envelope.message_id}>"))]
    if envelope.reply_to:
        headers.append(("Reply-To", _address(envelope.reply_to)))
    if envelope.unsubscribe_url:
        # A URL in angle brackets, never encoded words (RFC 2369): it may be long, not folded.
        targets = [_ascii(f"<{envelope.unsubscribe_url}>")]
        if envelope.unsubscribe_mailto:
            targets.append(_ascii(f"<mailto:{envelope.unsubscribe_mailto}>"))
        headers += [("List-Unsubscribe", ", ".join(targets)),
                    ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")]
    boundary = f"=_lw{uuid.uuid4().hex}"
    headers += [("MIME-Version", "1.0"),
                ("Content-Type", f'multipart/alternative;\r\n boundary="{boundary}"')]
    head = "".join(f"{name}: {value}\r\n" for name, value in headers).encode("ascii")
    delimiter = b"--" + boundary.encode("ascii")
    return b"".join([head, b"\r\n", delimiter, b"\r\n", _part("plain", text), delimiter,
                     b"\r\n", _part("html", html), delimiter, b"--\r\n"])


def _part(subtype: str, content: str) -> bytes:
    body = content.replace("\r\n", "\n").replace("\r", "\n")
    if not body.endswith("\n"):
        body += "\n"
    encoded = binascii.b2a_qp(body.encode("utf-8"), quotetabs=False, istext=True)
    return (f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
            "Content-Transfer-Encoding: quoted-printable\r\n\r\n").encode("ascii") + \
        encoded.replace(b"\n", b"\r\n") + b"\r\n"


def _ascii(value: str) -> str:
    if not value.isascii() or "\r" in value or "\n" in value:
        raise ValueError(f"not a header value: {value!r}")
    return value


def _address(value: str) -> str:
    name, address = split_address(value)
    if "@" not in address.strip("@") or not address.isascii():
        raise ValueError(f"not an email address: {value!r}")
    if "\r" in name or "\n" in name:
        raise ValueError(f"not a display name: {name!r}")
    if name.isascii():
        return _ascii(formataddr((name, address)))
    return _ascii(f"{_encoded_words(name)} <{address}>")


def _unstructured(name: str, value: str) -> str:
    """A header of free text (the subject): as it is when ASCII and short, else folded at
    spaces; encoded words when not ASCII, and for a literal ``=?`` or spaces at either end,
    which readers would otherwise take for an encoded word or drop."""
    if "\r" in value or "\n" in value:
        raise ValueError(f"a line break in the {name} header")
    if not value.isascii() or "=?" in value or value != value.strip():
        return _encoded_words(value)
    lines: list[str] = []
    line: str | None = None
    for word in value.split(" "):
        if line is None:
            line = word
        elif word and len(line) + 1 + len(word) > _LINE - (len(name) + 2 if not lines else 1):
            lines.append(line)  # the space becomes the fold
            line = word
        else:
            line = f"{line} {word}"
    return "\r\n ".join([*lines, line or ""])


def _encoded_words(value: str) -> str:
    """RFC 2047 ``B`` words of at most ``_WORD_BYTES`` UTF-8 bytes each (a character is
    never split), one per line."""
    data = value.encode("utf-8")
    words, start = [], 0
    while start < len(data):
        end = min(start + _WORD_BYTES, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:  # inside a character: back off
            end -= 1
        words.append(f"=?utf-8?b?{base64.b64encode(data[start:end]).decode()}?=")
        start = end
    return "\r\n ".join(words)


#: Headers the DKIM signature covers (RFC 8058 asks for both List-Unsubscribe headers).
SIGNED_HEADERS = ("from", "to", "subject", "date", "message-id", "mime-version",
                  "content-type", "list-unsubscribe", "list-unsubscribe-post")
_WSP = re.compile(rb"\t[ \t]*| [ \t]+")  # runs that are not already one space
_SPACES = re.compile(rb"  +")
_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", re.MULTILINE)


class DkimSigner:
    """DKIM-signs messages for one domain and selector (relaxed/relaxed, rsa-sha256). The PEM
    key (PKCS#1 or PKCS#8, RSA) is loaded once; signing is OpenSSL's, through ``cryptography``."""

    def __init__(self, domain: str, selector: str, private_key: bytes) -> None:
        key = serialization.load_pem_private_key(private_key, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("the DKIM key must be an RSA key")
        self.domain = _ascii(domain)
        self.selector = _ascii(selector)
        self._key = key

    def sign(self, raw: bytes, *, now: float | None = None) -> bytes:
        """``raw`` (CRLF line ends) with a ``DKIM-Signature`` header prepended, covering those
        of :data:`SIGNED_HEADERS` it has (the last of each, as verifiers pick them)."""
        head, separator, body = raw.partition(b"\r\n\r\n")
        if not separator:
            head, body = raw.removesuffix(b"\r\n"), b""
        fields: dict[str, bytes] = {}
        for match in _FIELD.finditer(head + b"\r\n"):
            fields[match[1].decode("ascii").lower()] = match[2]
        names = [name for name in SIGNED_HEADERS if name in fields]
        body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest()).decode()
        value = (f" v=1; a=rsa-sha256; c=relaxed/relaxed; d={self.domain}; "
                 f"s={self.selector};\r\n\tt={int(time.time() if now is None else now)}; "
                 f"h={':'.join(names)};\r\n\tbh={body_hash};\r\n\tb=")
        signed = b"".join(relaxed_header(name.encode(), fields[name]) + b"\r\n"
                          for name in names)
        signed += relaxed_header(b"dkim-signature", value.encode("ascii"))
        signature = base64.b64encode(self._key.sign(signed, padding.PKCS1v15(),
                                                    hashes.SHA256())).decode()
        folded = "\r\n\t ".join(signature[i:i + 64] for i in range(0, len(signature), 64))
        return f"DKIM-Signature:{value}{folded}\r\n".encode("ascii") + raw


def relaxed_header(name: bytes, value: bytes) -> bytes:
    """RFC 6376 3.4.2: lower-case name, unfolded value, whitespace runs as one space, none at
    either end, none around the colon."""
    return name.strip().lower() + b":" + _WSP.sub(b" ", value.replace(b"\r\n", b"")).strip(b" ")


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4: whitespace runs as one space, none at a line's end, no empty lines at
    the end, and a final CRLF unless the body is empty. (``bytes.replace`` and a
    regular expression that starts with a literal: several times faster.)"""
    body = _SPACES.sub(b" ", body.replace(b"\t", b" "))
    body = body.replace(b" \r\n", b"\r\n").removesuffix(b" ")
    end = len(body)
    while body.endswith(b"\r\n", 0, end):
        end -= 2
    return body[:end] + b"\r\n" if end else b""
