"""What ingest really puts on the wire validates against the registry (consumer contract)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from leadwerk_ingest.api import create_app
from leadwerk_ingest.settings import IngestSettings
from leadwerk_platform.registry import ContractRegistry
from leadwerk_platform.testing.helpers import read_topic, serve_app, values
from leadwerk_platform.tokens import EmailToken, TokenKind, TokenSigner

pytestmark = pytest.mark.integration


async def test_every_ingest_event_type_matches_its_schema(
        topics: str, platform_env: dict[str, str], contract_registry: ContractRegistry) -> None:
    settings = IngestSettings()
    signer = TokenSigner(settings.secret_key.get_secret_value())

    def sign(kind: TokenKind, **extra: Any) -> str:
        return signer.sign(EmailToken(kind=kind, workspace="dev", contact_id="c-9", **extra))

    batch = [
        {"type": "track", "anonymousId": "a", "event": "Video Watched"},
        {"type": "page", "anonymousId": "a", "context": {"page": {"url": "https://x.de/?utm_source=s"}}},
        {"type": "screen", "userId": "u", "name": "Home"},
        {"type": "identify", "userId": "u", "anonymousId": "a", "traits": {"email": "u@x.de"}},
        {"type": "group", "userId": "u", "groupId": "g"},
        {"type": "alias", "userId": "u", "previousId": "a"},
    ]
    async with serve_app(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.post("/v1/batch", json={"batch": batch},
                                  auth=("dev-write-key", ""))).status_code == 200
        await client.get(f"/t/o/{sign(TokenKind.OPEN, message_id='m')}")
        await client.get(f"/t/c/{sign(TokenKind.CLICK, url='https://x.de/a')}")
        await client.post(f"/t/u/{sign(TokenKind.UNSUBSCRIBE)}")
        await client.post(f"/t/confirm/{sign(TokenKind.CONFIRM, purpose='marketing')}")
        await client.post("/f/ebook-download", data={"email": "f@x.de", "consent_marketing": "on"})
    events = values(await read_topic(platform_env["KAFKA_BOOTSTRAP_SERVERS"],
                                     settings.topic("tracking-events"), 11))
    topic = contract_registry.topics["tracking-events"]
    assert sorted(e["type"] for e in events) == sorted(topic.message_types)
    for event in events:
        assert contract_registry.validate(event) == [], event["type"]
