"""Pure enrichment rules and rate limiting."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from leadwerk_ingest.domain.enrich import (
    BadTimestampError,
    anonymize_ip,
    campaign_fields,
    correct_event_time,
)
from leadwerk_ingest.domain.ratelimit import TokenBucket

RECEIVED = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)


def iso(moment: datetime) -> str:
    return moment.isoformat()


def test_skew_correction_follows_segments_rule() -> None:
    # Client clock 1 h behind: sent at 11:00 client time, the event 10 s before that.
    sent = RECEIVED - timedelta(hours=1)
    result = correct_event_time(RECEIVED, None, iso(sent - timedelta(seconds=10)), iso(sent))
    assert result.occurred_at == RECEIVED - timedelta(seconds=10)
    assert result.skew_ms == 3_600_000
    assert not result.clamped


def test_without_sent_at_the_client_time_is_kept_and_future_is_clamped() -> None:
    past = RECEIVED - timedelta(minutes=5)
    assert correct_event_time(RECEIVED, iso(past), None, None).occurred_at == past
    future = correct_event_time(RECEIVED, iso(RECEIVED + timedelta(days=2)), None, None)
    assert future.occurred_at == RECEIVED
    assert future.clamped
    assert correct_event_time(RECEIVED, None, None, None).occurred_at == RECEIVED


def test_unparseable_timestamps_are_client_errors() -> None:
    with pytest.raises(BadTimestampError, match="sentAt"):
        correct_event_time(RECEIVED, iso(RECEIVED), None, "soon")


@pytest.mark.parametrize(("ip", "anonymized"), [
    ("203.0.113.77", "203.0.113.0"),
    ("2001:db8:abcd:12:1:2:3:4", "2001:db8:abcd::"),
    ("::ffff:198.51.100.9", "198.51.100.0"),
    ("not an ip", None),
    (None, None),
])
def test_ip_anonymisation(ip: str | None, anonymized: str | None) -> None:
    assert anonymize_ip(ip) == anonymized


def test_campaign_from_utm_explicit_campaign_and_referrer() -> None:
    context = {"page": {"url": "https://x.de/p?utm_source=google&utm_medium=cpc&utm_term=crm",
                        "referrer": "https://www.bing.com/search?q=crm"},
               "campaign": {"name": "winter", "source": "explicit"}}
    assert campaign_fields(context) == {
        "source": "explicit", "medium": "cpc", "term": "crm", "name": "winter",
        "referrer": "https://www.bing.com/search?q=crm", "referrer_host": "www.bing.com"}
    assert campaign_fields({}) == {}


def test_token_bucket_allows_bursts_then_asks_to_wait() -> None:
    bucket = TokenBucket(rate=10, burst=20)
    assert bucket.take(20, now=0.0) == 0
    assert bucket.take(5, now=0.0) == pytest.approx(0.5)
    assert bucket.take(5, now=0.5) == 0
    assert bucket.take(100, now=10.0) == math.inf  # more than the burst never fits
