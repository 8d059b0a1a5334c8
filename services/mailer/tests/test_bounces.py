"""Reading asynchronous bounces: RFC 3464 delivery status notifications and webhooks (pure)."""

from __future__ import annotations

import pytest

from leadwerk_mailer.domain.bounces import Bounce, BounceFormatError, parse_dsn, parse_webhook


def dsn(action: str = "failed", status: str = "5.1.1", original: str = "text/rfc822-headers",
        ) -> bytes:
    headers = "Message-ID: <cmd-1@leadwerk.localhost>\r\nSubject: Willkommen\r\n"
    body = headers if original == "text/rfc822-headers" else headers + "\r\nHallo\r\n"
    return (
        "From: MAILER-DAEMON@relay.example\r\nTo: bounces@leadwerk.localhost\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; relay.example\r\n\r\n"
        f"Final-Recipient: rfc822; Gone@Example.de\r\nAction: {action}\r\nStatus: {status}\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 <gone@example.de>:\r\n User unknown\r\n\r\n"
        f"--B\r\nContent-Type: {original}\r\n\r\n{body}--B--\r\n").encode()


@pytest.mark.parametrize("original", ["text/rfc822-headers", "message/rfc822"])
def test_a_dsn_names_the_recipient_the_status_and_our_message(original: str) -> None:
    [bounce] = parse_dsn(dsn(original=original))
    assert bounce == Bounce("gone@example.de", "failed", "5.1.1",
                            "smtp; 550 5.1.1 <gone@example.de>: User unknown",
                            "cmd-1@leadwerk.localhost")
    assert bounce.hard


def test_soft_failures_and_delays_are_not_hard() -> None:
    assert not parse_dsn(dsn(status="4.2.2"))[0].hard
    assert parse_dsn(dsn(action="delayed", status="4.4.1"))[0].kind == "delayed"


def test_what_is_not_a_report_is_refused_with_a_reason() -> None:
    with pytest.raises(BounceFormatError, match="message/delivery-status"):
        parse_dsn(b"Subject: hello\r\n\r\nnot a report")
    with pytest.raises(BounceFormatError, match=r"events\.0"):
        parse_webhook({"events": [{"type": "opened", "recipient": "a@x.de"}]})
    with pytest.raises(BounceFormatError):
        parse_webhook(["nope"])


def test_webhooks_report_bounces_and_complaints() -> None:
    bounces = parse_webhook({"events": [
        {"type": "bounce", "recipient": "A@x.de", "status": "5.7.1", "message_id": "<m@x>"},
        {"type": "soft_bounce", "recipient": "b@x.de"},
        {"type": "complaint", "recipient": "c@x.de", "reason": "abuse report"}]})
    assert [(b.recipient, b.kind, b.hard) for b in bounces] == [
        ("a@x.de", "failed", True), ("b@x.de", "failed", False),
        ("c@x.de", "complaint", False)]
    assert bounces[0].message_id == "m@x"
    assert parse_webhook({"type": "complaint", "recipient": "d@x.de"})[0].kind == "complaint"
