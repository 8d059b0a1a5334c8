"""Outbound rules (pure): SSRF, retry verdicts, Retry-After, Standard Webhooks signatures."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from leadwerk_crm_bridge.domain.outbound import (
    development_secret,
    forbidden,
    judge,
    retry_after,
    sign,
)

NOW = datetime(2026, 11, 21, 10, tzinfo=UTC)


@pytest.mark.parametrize(("address", "why"), [
    ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.10", "private"),
    ("172.16.5.4", "private"), ("169.254.169.254", "link-local"), ("::1", "loopback"),
    ("fe80::1", "link-local"), ("::ffff:10.0.0.1", "private"), ("0.0.0.0", "unspecified"),  # noqa: S104
    ("100.64.1.2", "non-global"), ("2002:a00:1::", "private"), ("64:ff9b::a00:1", "private"),
    ("93.184.215.14", None), ("2606:4700:4700::1111", None),
])
def test_private_loopback_and_link_local_addresses_are_refused(address: str,
                                                               why: str | None) -> None:
    reason = forbidden(address)
    assert (reason is None) == (why is None)
    if why is not None:
        assert reason is not None
        assert why in reason


def test_answers_decide_between_delivered_retry_and_dead() -> None:
    rules = {"now": NOW, "retry_after_header": None, "attempts": 5, "base": 1.0,
             "ceiling": 60.0, "rng": random.Random(7)}
    assert judge(204, None, attempt=1, **rules).kind == "delivered"  # type: ignore[arg-type]
    assert judge(400, None, attempt=1, **rules).kind == "dead"  # type: ignore[arg-type]
    assert judge(404, None, attempt=1, **rules).reason.startswith("HTTP 404")  # type: ignore[arg-type]
    for status in (408, 429, 500, 502, 503, None):
        verdict = judge(status, "timeout" if status is None else None, attempt=3,
                        **rules)  # type: ignore[arg-type]
        assert verdict.kind == "retry"
        assert verdict.at is not None
        assert NOW <= verdict.at <= NOW + timedelta(seconds=4)  # full jitter up to 1·2²
    assert judge(500, None, attempt=5, **rules).kind == "dead"  # type: ignore[arg-type]
    honoured = judge(429, None, attempt=1, **{**rules, "retry_after_header": "30"})  # type: ignore[arg-type]
    assert honoured.at == NOW + timedelta(seconds=30)
    capped = judge(503, None, attempt=1, **{**rules, "retry_after_header": "86400"})  # type: ignore[arg-type]
    assert capped.at == NOW + timedelta(seconds=60)


def test_retry_after_is_seconds_or_an_http_date() -> None:
    assert retry_after("120", NOW) == timedelta(seconds=120)
    assert retry_after("Sat, 21 Nov 2026 10:01:00 GMT", NOW) == timedelta(minutes=1)
    assert retry_after("soon", NOW) is None
    assert retry_after(None, NOW) is None


def test_signatures_verify_with_the_reference_library_during_a_rotation() -> None:
    old, new = development_secret("k", "old"), development_secret("k", "new")
    body = b'{"type":"lead.handoff","data":{"contact_id":"c"}}'
    now = datetime.now(UTC)
    headers = sign([new, old], "d-1", now, body)
    assert headers["webhook-id"] == "d-1"
    assert len(headers["webhook-signature"].split()) == 2
    for secret in (old, new):  # a receiver on either secret accepts it
        assert Webhook(secret).verify(body, headers) == {
            "type": "lead.handoff", "data": {"contact_id": "c"}}
    with pytest.raises(WebhookVerificationError):
        Webhook(development_secret("k", "other")).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new).verify(body.replace(b'"c"', b'"x"'), headers)
