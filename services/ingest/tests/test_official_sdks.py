"""The official Segment and RudderStack Python SDKs, unmodified, pointed at ingest."""

from __future__ import annotations

import asyncio

import pytest
from rudderstack.analytics.client import Client as RudderClient
from segment.analytics.client import Client as SegmentClient

from leadwerk_platform.testing.helpers import read_topic, values

from .conftest import WRITE_KEY, RunningIngest

pytestmark = pytest.mark.integration


def _send(client: SegmentClient | RudderClient) -> None:
    client.identify("user-7", {"email": "sdk@example.com", "company": "ACME"})
    client.track("user-7", "Document Downloaded", {"document": "pricing.pdf"})
    client.page("user-7", "Docs", "Pricing", {"url": "https://example.com/pricing"})
    client.flush()


@pytest.mark.parametrize("sdk", ["segment", "rudderstack"])
async def test_official_sdk_events_reach_the_topic(ingest: RunningIngest, sdk: str) -> None:
    errors: list[Exception] = []
    factory = SegmentClient if sdk == "segment" else RudderClient
    client = factory(WRITE_KEY, host=ingest.url, on_error=lambda e, _: errors.append(e))
    await asyncio.to_thread(_send, client)
    assert errors == []
    events = values(await read_topic(ingest.bootstrap, ingest.topic, 3))
    assert sorted(e["type"] for e in events) == ["tracking.identify.v1", "tracking.page.v1",
                                                 "tracking.track.v1"]
    assert {e["data"]["user_id"] for e in events} == {"user-7"}
    track = next(e for e in events if e["type"] == "tracking.track.v1")
    assert track["data"]["properties"] == {"document": "pricing.pdf"}
