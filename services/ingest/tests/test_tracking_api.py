"""The Segment-spec tracking API over real HTTP, producing to the real (embedded) broker."""

from __future__ import annotations

import base64
import gzip
import json
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from leadwerk_ingest.adapters.config import BotPolicy, IngestConfig, RateLimit, Workspace
from leadwerk_ingest.api import create_app
from leadwerk_ingest.settings import IngestSettings
from leadwerk_platform.embedded import EmbeddedBroker, free_port
from leadwerk_platform.envelope import derive_event_id, parse_timestamp
from leadwerk_platform.testing.helpers import read_topic, serve_app, values

from .conftest import WRITE_KEY, RunningIngest

pytestmark = pytest.mark.integration
AUTH = ("dev-write-key", "")


def deep(levels: int) -> dict[str, object]:
    nested: dict[str, object] = {}
    for _ in range(levels):
        nested = {"x": nested}
    return nested


def track(**overrides: object) -> dict[str, object]:
    return {"anonymousId": "anon-1", "event": "Demo Video Watched",
            "messageId": str(uuid.uuid4()), "properties": {"video": "demo"}, **overrides}


async def test_track_is_acknowledged_and_lands_on_the_topic(ingest: RunningIngest) -> None:
    body = track(userId="u-42", context={
        "ip": "203.0.113.77", "userAgent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0",
        "page": {"url": "https://example.com/pricing?utm_source=newsletter&utm_medium=email"
                        "&utm_campaign=launch", "referrer": "https://www.google.com/search?q=x"}})
    async with httpx.AsyncClient(base_url=ingest.url) as client:
        response = await client.post("/v1/track", json=body, auth=AUTH)
    assert response.status_code == 200
    assert response.json() == {"success": True}
    [record] = await read_topic(ingest.bootstrap, ingest.topic, 1)
    assert record.key == b"dev:u:u-42"
    event = values([record])[0]
    assert event["type"] == "tracking.track.v1"
    assert event["id"] == derive_event_id("dev", str(body["messageId"]))
    assert event["workspace"] == "dev"
    assert event["producer"] == "ingest"
    data = event["data"]
    assert data["event"] == "Demo Video Watched"
    assert data["client"]["ip"] == "203.0.113.0"
    assert "ip" not in data["context"]
    assert data["client"]["bot"] is False
    assert data["campaign"] == {"source": "newsletter", "medium": "email", "name": "launch",
                                "referrer": "https://www.google.com/search?q=x",
                                "referrer_host": "www.google.com"}


async def test_write_key_in_body_and_short_paths(ingest: RunningIngest) -> None:
    async with httpx.AsyncClient(base_url=ingest.url) as client:
        for path, body in (("/v1/page", {"anonymousId": "a", "name": "Home",
                                         "writeKey": WRITE_KEY}),
                           ("/v1/i", {"userId": "u", "traits": {"email": "x@example.com"},
                                      "writeKey": WRITE_KEY}),
                           ("/v1/alias", {"userId": "u", "previousId": "a",
                                          "writeKey": WRITE_KEY}),
                           ("/v1/group", {"userId": "u", "groupId": "acme",
                                          "writeKey": WRITE_KEY}),
                           ("/v1/screen", {"userId": "u", "name": "Home", "writeKey": WRITE_KEY})):
            response = await client.post(path, json=body)
            assert response.status_code == 200, (path, response.text)
    types = sorted(e["type"] for e in values(await read_topic(ingest.bootstrap, ingest.topic, 5)))
    assert types == ["tracking.alias.v1", "tracking.group.v1", "tracking.identify.v1",
                     "tracking.page.v1", "tracking.screen.v1"]


async def test_batch_gzip_and_retry_deduplicates_by_id(ingest: RunningIngest) -> None:
    batch = {"batch": [{"type": "track", **track()}, {"type": "page", "anonymousId": "anon-1",
                                                      "messageId": "m-page-1"}]}
    payload = gzip.compress(httpx.Request("POST", "/", json=batch).content)
    async with httpx.AsyncClient(base_url=ingest.url) as client:
        for _ in range(2):  # a client retry sends the same messageIds again
            response = await client.post("/v1/batch", content=payload, auth=AUTH, headers={
                "Content-Type": "application/json", "Content-Encoding": "gzip"})
            assert response.status_code == 200, response.text
    events = values(await read_topic(ingest.bootstrap, ingest.topic, 4))
    assert len(events) == 4
    assert len({e["id"] for e in events}) == 2  # downstream deduplicates on these ids


async def test_clock_skew_corrected_from_sent_at(ingest: RunningIngest) -> None:
    now = datetime.now(UTC)
    # The client's clock is two hours fast; the event happened 30 s before it was sent.
    sent_at = now + timedelta(hours=2)
    happened = sent_at - timedelta(seconds=30)
    future = track(originalTimestamp=(now + timedelta(days=1)).isoformat())
    async with httpx.AsyncClient(base_url=ingest.url) as client:
        response = await client.post("/v1/batch", auth=AUTH, json={
            "sentAt": sent_at.isoformat(),
            "batch": [{"type": "track", **track(originalTimestamp=happened.isoformat())}]})
        assert response.status_code == 200
        response = await client.post("/v1/track", auth=AUTH, json=future)
        assert response.status_code == 200
    skewed, clamped = values(await read_topic(ingest.bootstrap, ingest.topic, 2))
    if skewed["data"]["client"]["timestamp_clamped"]:
        skewed, clamped = clamped, skewed
    occurred = parse_timestamp(skewed["occurred_at"])
    received = parse_timestamp(skewed["received_at"])
    assert abs((received - occurred) - timedelta(seconds=30)) < timedelta(seconds=1)
    assert skewed["data"]["client"]["clock_skew_ms"] < -7_000_000
    assert clamped["data"]["client"]["timestamp_clamped"] is True
    assert clamped["occurred_at"] == clamped["received_at"]


@pytest.mark.parametrize(("headers", "body", "status", "code"), [
    ({}, b"{not json", 400, "invalid_json"),
    ({}, b"[1, 2]", 400, "invalid_json"),
    ({"Authorization": "Basic " + base64.b64encode(b"wrong-key:").decode()},
     b'{"anonymousId": "a", "event": "x"}', 401, "invalid_write_key"),
    ({}, b'{"anonymousId": "a", "event": "x"}', 401, "missing_write_key"),
    ({"Authorization": "Basic !!!"}, b'{"anonymousId": "a", "event": "x"}', 401,
     "invalid_write_key"),
    ({"Authorization": "Basic " + base64.b64encode(b"dev-write-key:").decode()},
     b'{"anonymousId": "a"}', 400, "invalid_event"),
    ({"Authorization": "Basic " + base64.b64encode(b"dev-write-key:").decode()},
     b'{"event": "x"}', 400, "invalid_event"),
    ({"Authorization": "Basic " + base64.b64encode(b"dev-write-key:").decode()},
     b'{"anonymousId": "a", "event": "x", "timestamp": "yesterday"}', 400, "invalid_event"),
    ({"Authorization": "Basic " + base64.b64encode(b"dev-write-key:").decode(),
      "Content-Encoding": "br"}, b'{}', 415, "unsupported_encoding"),
])
async def test_client_mistakes_get_a_4xx_naming_the_problem(
        ingest: RunningIngest, headers: dict[str, str], body: bytes, status: int,
        code: str) -> None:
    async with httpx.AsyncClient(base_url=ingest.url) as client:
        response = await client.post("/v1/track", content=body,
                                     headers={"Content-Type": "application/json", **headers})
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]


async def test_batch_errors_name_each_bad_event(ingest: RunningIngest) -> None:
    batch = {"batch": [{"type": "track", **track()},
                       {"type": "track", "anonymousId": "a"},
                       {"type": "teleport", "anonymousId": "a"},
                       {"type": "identify", "traits": {}}]}
    async with httpx.AsyncClient(base_url=ingest.url) as client:
        response = await client.post("/v1/batch", json=batch, auth=AUTH)
    assert response.status_code == 400
    details = response.json()["error"]["details"]
    assert {d["index"] for d in details} == {1, 2, 3}
    assert any(d["index"] == 1 and "event" in d["field"] for d in details)
    assert await read_topic(ingest.bootstrap, ingest.topic, 1, timeout=1.0) == []


async def test_oversized_event_and_batch_get_413(ingest: RunningIngest) -> None:
    big = "x" * (33 * 1024)
    async with httpx.AsyncClient(base_url=ingest.url) as client:
        single = await client.post("/v1/track", json=track(properties={"blob": big}), auth=AUTH)
        batch = await client.post("/v1/batch", auth=AUTH, json={"batch": [
            {"type": "track", **track(properties={"blob": "y" * 20_000})} for _ in range(30)]})
        one_big_in_batch = await client.post("/v1/batch", auth=AUTH, json={"batch": [
            {"type": "track", **track(properties={"blob": big})}]})
        bomb = await client.post("/v1/track", auth=AUTH, content=gzip.compress(b" " * 10_000_000),
                                 headers={"Content-Encoding": "gzip"})
    assert single.status_code == 413
    assert batch.status_code == 413
    assert one_big_in_batch.status_code == 413
    assert one_big_in_batch.json()["error"]["message"].startswith("batch[0] exceeds")
    assert bomb.status_code == 413


async def test_rate_limit_answers_429_with_retry_after(
        topics: str, platform_env: dict[str, str]) -> None:
    settings = IngestSettings()
    workspace = Workspace(id="dev", write_keys=["k"], rate_limit=RateLimit(
        events_per_second=1, burst=3))
    config = IngestConfig(workspaces={"dev": workspace}, forms={}, keys={"k": workspace})
    async with serve_app(create_app(settings, config)) as url, httpx.AsyncClient(
            base_url=url) as client:
        statuses = [(await client.post("/v1/track", json=track(), auth=("k", ""))).status_code
                    for _ in range(5)]
        limited = await client.post("/v1/track", json=track(), auth=("k", ""))
        never = await client.post("/v1/batch", auth=("k", ""), json={
            "batch": [{"type": "track", **track()} for _ in range(4)]})
    assert statuses[:3] == [200, 200, 200]
    assert 429 in statuses[3:]
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert never.status_code == 413  # more events than the burst: retrying cannot help
    assert never.json()["error"]["code"] == "batch_too_large"


async def test_broker_down_answers_503_with_retry_after(
        platform_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    broker = EmbeddedBroker(free_port())
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", broker.start())
    monkeypatch.setenv("LEADWERK_INGEST_PRODUCE_TIMEOUT", "1.0")
    settings = IngestSettings()
    try:
        async with serve_app(create_app(settings)) as url, httpx.AsyncClient(
                base_url=url) as client:
            broker.kill()
            down = await client.post("/v1/track", json=track(), auth=AUTH)
            ready = await client.get("/readyz")
    finally:
        broker.stop()
    assert down.status_code == 503, down.text
    assert down.headers["Retry-After"] == "5"
    assert down.json()["error"]["code"] == "broker_unavailable"
    assert ready.status_code == 503


async def test_health_metrics_and_cors(ingest: RunningIngest) -> None:
    async with httpx.AsyncClient(base_url=ingest.url) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).status_code == 200
        preflight = await client.options("/v1/track", headers={
            "Origin": "https://www.example.com", "Access-Control-Request-Method": "POST"})
        await client.post("/v1/track", json=track(), auth=AUTH)
        metrics = (await client.get("/metrics")).text
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://www.example.com"
    assert "Access-Control-Allow-Credentials" not in preflight.headers  # "*" workspace
    assert 'leadwerk_ingest_events_accepted_total{type="tracking.track.v1"} 1.0' in metrics
    assert 'leadwerk_ingest_http_requests_total{method="POST",route="/v1/track",status="200"}' \
        in metrics
    assert "leadwerk_ingest_produce_duration_seconds_bucket" in metrics


async def test_bots_are_flagged_or_dropped_per_workspace(
        topics: str, platform_env: dict[str, str]) -> None:
    googlebot = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
    flag = Workspace(id="dev", write_keys=["flag"], bots=BotPolicy.FLAG)
    drop = Workspace(id="shop", write_keys=["drop"], bots=BotPolicy.DROP)
    config = IngestConfig(workspaces={"dev": flag, "shop": drop}, forms={},
                          keys={"flag": flag, "drop": drop})
    settings = IngestSettings()
    async with serve_app(create_app(settings, config)) as url, httpx.AsyncClient(
            base_url=url, headers={"User-Agent": googlebot}) as client:
        flagged = await client.post("/v1/track", json=track(), auth=("flag", ""))
        dropped = await client.post("/v1/track", json=track(), auth=("drop", ""))
        human = await client.post("/v1/track", auth=("drop", ""), json=track(
            context={"userAgent": "Mozilla/5.0 (X11; Linux x86_64; rv:130.0) Firefox/130.0"}))
    assert (flagged.status_code, dropped.status_code, human.status_code) == (200, 200, 200)
    events = values(await read_topic(platform_env["KAFKA_BOOTSTRAP_SERVERS"],
                                     settings.topic("tracking-events"), 2, idle=0.5))
    assert sorted((e["workspace"], e["data"]["client"]["bot"]) for e in events) == [
        ("dev", True), ("shop", False)]


async def test_cors_follows_each_workspaces_allowed_origins(
        topics: str, platform_env: dict[str, str]) -> None:
    shop = Workspace(id="shop", write_keys=["k"], allowed_origins=["https://shop.example"])
    config = IngestConfig(workspaces={"shop": shop}, forms={}, keys={"k": shop})
    async with serve_app(create_app(IngestSettings(), config)) as url, httpx.AsyncClient(
            base_url=url) as client:
        allowed = await client.options("/v1/track", headers={
            "Origin": "https://shop.example", "Access-Control-Request-Method": "POST"})
        refused = await client.options("/v1/track", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        posted = await client.post("/v1/track", json=track(), auth=("k", ""),
                                   headers={"Origin": "https://evil.example"})
    assert allowed.status_code == 204
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert allowed.headers["Access-Control-Allow-Credentials"] == "true"
    assert refused.status_code == 403
    assert "Access-Control-Allow-Origin" not in posted.headers


async def test_extra_write_keys_from_the_environment(
        topics: str, platform_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEADWERK_WRITE_KEYS", "site-a, site-b")
    async with serve_app(create_app(IngestSettings())) as url, httpx.AsyncClient(
            base_url=url) as client:
        accepted = await client.post("/v1/track", json=track(), auth=("site-b", ""))
        refused = await client.post("/v1/track", json=track(), auth=("site-c", ""))
    assert (accepted.status_code, refused.status_code) == (200, 401)


VALID_AUTHORIZATION = b"Basic " + base64.b64encode(b"dev-write-key:")


@pytest.mark.parametrize(("body", "authorization", "status"), [
    (track(timestamp="0001-01-01T00:00:00+01:00"), VALID_AUTHORIZATION, 400),
    (track(timestamp="9999-12-31T00:00:00Z", sentAt="0001-01-01T00:00:00Z"),
     VALID_AUTHORIZATION, 400),
    (track(timestamp="0001-01-01T00:00:00Z", sentAt="9999-12-31T00:00:00Z"),
     VALID_AUTHORIZATION, 400),
    (track(properties={"a": 1}), b"Basic \xe9\xe9", 401),
    (track(properties=deep(300)), VALID_AUTHORIZATION, 400),
])
async def test_edge_inputs_are_client_errors_not_crashes(
        ingest: RunningIngest, body: dict[str, object], authorization: bytes,
        status: int) -> None:
    headers = [(b"authorization", authorization), (b"content-type", b"application/json")]
    async with httpx.AsyncClient(base_url=ingest.url) as client:
        # The standard library writes nesting that orjson would refuse.
        single = await client.post("/v1/track", content=json.dumps(body), headers=headers)
        batch = await client.post("/v1/batch", headers=headers, content=json.dumps(
            {"batch": [{"type": "track", **body}]}))
    assert (single.status_code, batch.status_code) == (status, status), single.text
    assert single.json()["error"]["message"]
