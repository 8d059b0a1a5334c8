from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from leadwerk_ingest.api import create_app
from leadwerk_ingest.settings import IngestSettings
from leadwerk_platform.testing.helpers import serve_app
from leadwerk_platform.tokens import TokenSigner

WRITE_KEY = "dev-write-key"


@dataclass
class RunningIngest:
    url: str
    settings: IngestSettings
    bootstrap: str

    @property
    def topic(self) -> str:
        return self.settings.topic("tracking-events")

    @property
    def signer(self) -> TokenSigner:
        return TokenSigner(self.settings.secret_key.get_secret_value())


@pytest.fixture
async def ingest(topics: str, platform_env: dict[str, str]) -> AsyncIterator[RunningIngest]:
    """Ingest on a real port, producing to this test's fresh topics on the embedded broker."""
    settings = IngestSettings()
    async with serve_app(create_app(settings)) as url:
        yield RunningIngest(url, settings, platform_env["KAFKA_BOOTSTRAP_SERVERS"])
