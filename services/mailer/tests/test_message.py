"""The bytes handed to SMTP (pure): headers (RFC 5322, RFC 2047 where not ASCII), the MIME
structure with quoted-printable parts, the RFC 8058 headers, and the DKIM signature, checked
by an independent implementation (dkimpy) and by the email package's parser."""

from __future__ import annotations

import base64
import email
import email.policy
import re
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formataddr, parseaddr

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from leadwerk_mailer.domain.message import DkimSigner, Envelope, build, relaxed_body
from leadwerk_mailer.domain.policy import split_address

NOW = datetime(2026, 11, 21, 10, tzinfo=UTC)
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RECORD = b"v=DKIM1; k=rsa; p=" + base64.b64encode(KEY.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def pem(key_format: serialization.PrivateFormat) -> bytes:
    return KEY.private_bytes(serialization.Encoding.PEM, key_format,
                             serialization.NoEncryption())


SIGNER = DkimSigner("x.de", "lw1", pem(serialization.PrivateFormat.TraditionalOpenSSL))


def verifies(raw: bytes) -> bool:
    return bool(dkim.verify(raw, dnsfunc=lambda name, timeout=5: RECORD))


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(message: EmailMessage) -> tuple[str, str]:
    text, html = message.get_body(("plain",)), message.get_body(("html",))
    assert text is not None
    assert html is not None
    return (str(text.get_content()).replace("\r\n", "\n"),
            str(html.get_content()).replace("\r\n", "\n"))


def test_headers_parts_and_the_one_click_unsubscribe_as_a_mail_client_reads_them() -> None:
    url = "https://in.example/t/u/" + "eyJ3IjoiZGV2In0" * 12  # a long token, as real ones are
    raw = build(Envelope(message_id="c-1@leadwerk.test",
                         sender="Jürgen Müller-Lüdenscheidt <juergen@x.de>",
                         to='"Berger, Anna" <anna@example.de>',
                         subject="Grüße aus Berlin: ein Betreff, der länger ist als eine "
                                 "Zeile und deshalb in mehrere Wörter kodiert wird",
                         date=NOW, reply_to="rep@x.de", unsubscribe_url=url),
                "<p>Hallo = Welt " + "x" * 120 + "</p>\n.\n<p>zwei</p>  ",
                "Hallo Anna\nzweite Zeile  \n.")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    # RFC 2369: the URL in angle brackets, as it is (never encoded words), on one line.
    assert f"\r\nList-Unsubscribe: <{url}>\r\n".encode() in raw
    message = parse(raw)
    assert message["From"] == "Jürgen Müller-Lüdenscheidt <juergen@x.de>"
    assert message["To"].addresses[0].display_name == "Berger, Anna"
    assert message["Subject"] == ("Grüße aus Berlin: ein Betreff, der länger ist als eine "
                                  "Zeile und deshalb in mehrere Wörter kodiert wird")
    assert message["Date"].datetime == NOW
    assert message["Message-ID"] == "<c-1@leadwerk.test>"
    assert message["Reply-To"] == "rep@x.de"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message.get_content_type() == "multipart/alternative"
    assert parts(message) == ("Hallo Anna\nzweite Zeile  \n.\n",
                              "<p>Hallo = Welt " + "x" * 120 + "</p>\n.\n<p>zwei</p>  \n")


@pytest.mark.parametrize(("subject", "folded"), [
    ("Willkommen, Anna!", False),
    ("An ASCII subject long enough to be folded at a space, because lines should stay short",
     True),
    ("Literally =?utf-8?q?not_an_encoded_word?=", True),  # as encoded words, two lines
    ("  two  spaces  ", False),
])
def test_subjects_come_back_as_they_were(subject: str, folded: bool) -> None:
    raw = build(Envelope("c@x.de", "a@x.de", "b@y.de", subject, NOW), "<p>x</p>", "x")
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert (b"\r\n " in head.split(b"Subject:", 1)[1].split(b"\r\nDate:")[0]) is folded
    assert all(len(line) <= 78 for line in head.split(b"\r\n") if line.startswith(b"Subject"))
    assert parse(raw)["Subject"] == subject


@pytest.mark.parametrize("envelope", [
    Envelope("c@x.de", "no address", "b@y.de", "s", NOW),
    Envelope("c@x.de", "a@x.de", "b@ÿ.de", "s", NOW),  # would need SMTPUTF8
    Envelope("c@x.de", "a@x.de", "b@y.de", "s\r\nBcc: everyone@y.de", NOW),
    Envelope("c@x.de", "a@x.de", "b@y.de", "s", NOW, unsubscribe_url="https://x\r\nBcc: y"),
])
def test_what_cannot_be_a_header_is_refused(envelope: Envelope) -> None:
    with pytest.raises(ValueError, match=r"not|line break"):
        build(envelope, "<p>x</p>", "x")


def test_the_signature_verifies_covers_the_rfc_8058_headers_and_breaks_when_tampered() -> None:
    raw = SIGNER.sign(build(Envelope(
        "c-1@leadwerk.test", "Anna Berger <anna@x.de>", "lead@example.de", "Grüße", NOW,
        unsubscribe_url="https://in.example/t/u/tok"), "<p>Hallo</p>", "Hallo"))
    assert verifies(raw)
    header = parse(raw)["DKIM-Signature"]
    signed = re.search(r"h=([^;]+);", " ".join(header.split()))
    assert signed is not None
    assert [h.strip() for h in signed[1].split(":")] == [
        "from", "to", "subject", "date", "message-id", "mime-version", "content-type",
        "list-unsubscribe", "list-unsubscribe-post"]
    assert not verifies(raw.replace(b"t/u/tok", b"t/u/evil"))
    assert not verifies(raw.replace(b"Hallo", b"Hallo!"))


def test_the_key_may_be_pkcs8_but_must_be_rsa() -> None:
    signer = DkimSigner("x.de", "lw1", pem(serialization.PrivateFormat.PKCS8))
    assert verifies(signer.sign(build(Envelope("c@x.de", "a@x.de", "b@y.de", "s", NOW),
                                      "<p>x</p>", "x")))
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    with pytest.raises(ValueError, match="RSA"):
        DkimSigner("x.de", "lw1", other)


def test_the_body_hash_is_dkimpys() -> None:
    raw = build(Envelope("c@x.de", "a@x.de", "b@y.de", "s", NOW),
                "<p>a \t b</p>   \n\n\n", "tabs\tand  spaces \n\n")
    ours = parse(SIGNER.sign(raw))["DKIM-Signature"]
    theirs = dkim.sign(raw, b"lw1", b"x.de", pem(serialization.PrivateFormat.TraditionalOpenSSL),
                       canonicalize=(b"relaxed", b"relaxed")).decode()

    def body_hash(header: str) -> str:
        found = re.search(r"bh=([^;]+);", "".join(header.split()))
        assert found is not None
        return found[1]

    assert body_hash(ours) == body_hash(theirs)


@pytest.mark.parametrize(("body", "canonical"), [
    (b"", b""),
    (b"\r\n\r\n", b""),
    (b"a  \t b \r\n\r\n\r\n", b"a b\r\n"),
    (b" x\r\n\tlast  ", b" x\r\n last\r\n"),
])
def test_relaxed_body_canonicalisation(body: bytes, canonical: bytes) -> None:
    assert relaxed_body(body) == canonical


TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\r"), max_size=300)
#: One line of text: no control characters (a header cannot hold them).
LINE = st.characters(codec="utf-8", exclude_characters=[chr(c) for c in range(32)] + ["\x7f"])


@settings(max_examples=60, deadline=None)
@given(subject=st.text(LINE, max_size=120), name=st.text(LINE, max_size=40), text=TEXT,
       html=TEXT)
def test_any_message_survives_the_round_trip_and_verifies(subject: str, name: str, text: str,
                                                          html: str) -> None:
    sender = formataddr((name, "anna@x.de"))
    raw = SIGNER.sign(build(Envelope("c@x.de", sender, "b@y.de", subject, NOW), html, text))
    assert verifies(raw)
    message = parse(raw)
    assert message["Subject"] == subject
    assert message["From"].addresses[0].addr_spec == "anna@x.de"
    assert parts(message) == tuple(
        value if value.endswith("\n") else value + "\n" for value in (text, html))


@settings(max_examples=300, deadline=None)
@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._%+-]{0,12}@[A-Za-z0-9-]{1,8}(\.[A-Za-z0-9-]{1,8}){1,3}",
                     fullmatch=True) | st.text(max_size=40))
def test_the_address_shortcut_reads_addresses_as_the_parser_does(value: str) -> None:
    assert split_address(value) == parseaddr(value)
