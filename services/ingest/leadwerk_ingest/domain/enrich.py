"""Pure enrichment rules: clock-skew correction, IP anonymisation, campaign attribution."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit

from leadwerk_platform.caching import short_key_cache
from leadwerk_platform.envelope import parse_timestamp

_UTM = {"utm_source": "source", "utm_medium": "medium", "utm_campaign": "name",
        "utm_term": "term", "utm_content": "content"}
_CAMPAIGN_KEYS = ("source", "medium", "name", "term", "content")


class BadTimestampError(ValueError):
    pass


#: URLs longer than this are cut before parsing (the parsers cache per URL).
_CACHEABLE_URLS = 2048
_MAX_IP = 45  # the longest textual IPv6 address


def _parse(value: str | None, field: str) -> datetime | None:
    if value is None:
        return None
    parsed = _parse_cached(value)
    if parsed is None:
        raise BadTimestampError(f"{field} is not an ISO-8601 timestamp: {value!r}")
    return parsed


@short_key_cache(maxsize=4096, max_key_length=64)
def _parse_cached(value: str) -> datetime | None:
    """Cached: the events of a batch share ``sentAt`` and often their timestamps."""
    try:
        return parse_timestamp(value)
    except ValueError:
        return None


class EventTime(NamedTuple):  # a tuple: built for every event, cheaper than a frozen dataclass
    occurred_at: datetime
    skew_ms: int
    clamped: bool


def correct_event_time(received_at: datetime, timestamp: str | None,
                       original_timestamp: str | None, sent_at: str | None) -> EventTime:
    """Segment's rule: ``timestamp = receivedAt - (sentAt - originalTimestamp)``.

    The client's clock is trusted for the gap between the event and the send, not for the
    absolute time. A result in the future is clamped to ``received_at``.
    """
    client_time = _parse(timestamp, "timestamp") or _parse(original_timestamp, "originalTimestamp")
    sent = _parse(sent_at, "sentAt")
    if client_time is None:
        return EventTime(received_at, 0, clamped=False)
    skew_ms = 0
    try:
        occurred = client_time.astimezone(UTC) if client_time.tzinfo is not UTC else client_time
        if sent is not None:
            skew = received_at - sent
            skew_ms = int(skew.total_seconds() * 1000)
            occurred = occurred + skew
    except OverflowError as error:  # e.g. year 1 with a positive offset, or a huge skew
        raise BadTimestampError("timestamp and sentAt give a time outside the calendar "
                                "(years 1 to 9999)") from error
    if occurred > received_at:
        return EventTime(received_at, skew_ms, clamped=True)
    return EventTime(occurred, skew_ms, clamped=False)


def anonymize_ip(address: str | None) -> str | None:
    """Zero the last IPv4 octet, keep only the /48 of an IPv6 address; junk becomes None."""
    if not address or len(address) > _MAX_IP:
        return None
    return _anonymize(address)


@lru_cache(maxsize=8192)
def _anonymize(address: str) -> str | None:
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).network_address)


@lru_cache(maxsize=4096)
def _host(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


@lru_cache(maxsize=4096)
def _utm(url: str) -> tuple[tuple[str, str], ...]:
    """UTM parameters of a URL as campaign fields (cached: a site has few landing URLs)."""
    try:
        query = parse_qsl(urlsplit(url).query)
    except ValueError:
        return ()
    found = {}
    for key, value in query:
        name = _UTM.get(key.lower())
        if name and value:
            found[name] = value[:500]
    return tuple(found.items())


def campaign_fields(context: dict[str, Any], properties: dict[str, Any] | None = None,
                    page_url: str | None = None, referrer: str | None = None) -> dict[str, str]:
    """Campaign attribution from ``context.campaign``, UTM parameters in the page URL, and the
    referrer. Explicit ``context.campaign`` values win over URL parameters."""
    raw_page = context.get("page")
    page: dict[str, Any] = raw_page if isinstance(raw_page, dict) else {}
    props = properties or {}
    url = page_url or page.get("url") or props.get("url")
    ref: Any = referrer or page.get("referrer") or props.get("referrer")
    raw_referrer = context.get("referrer")
    if not ref and isinstance(raw_referrer, dict):
        ref = raw_referrer.get("url")
    url = url[:_CACHEABLE_URLS] if isinstance(url, str) else None
    ref = ref[:_CACHEABLE_URLS] if isinstance(ref, str) and ref else None
    fields = _from_urls(url, ref)
    explicit = context.get("campaign")
    if not isinstance(explicit, dict) or not explicit:
        return fields  # the shared cached dict: callers only serialise it
    fields = dict(fields)
    for key in _CAMPAIGN_KEYS:
        given = explicit.get(key)
        if isinstance(given, str) and given:
            fields[key] = given[:500]
    return fields


@lru_cache(maxsize=4096)
def _from_urls(url: str | None, referrer: str | None) -> dict[str, str]:
    """UTM fields of the page URL plus the referrer and its host (cached per pair; the result
    is shared and must not be modified)."""
    fields = dict(_utm(url)) if url and "?" in url else {}
    if referrer:
        fields["referrer"] = referrer[:2000]
        host = _host(referrer)
        if host:
            fields["referrer_host"] = host
    return fields
