"""Pytest plugin: the embedded broker and Postgres once per session, isolation per test.

``LEADWERK_TEST_KAFKA`` / ``LEADWERK_TEST_DATABASE_URL`` point the suite at existing ones.
Each test gets its own topic prefix (fresh topics) and, when it asks, its own database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import asyncpg
import pytest

from leadwerk_platform.embedded import EmbeddedBroker, EmbeddedPostgres, free_port
from leadwerk_platform.kafka.topics import provision_topics
from leadwerk_platform.registry import ContractRegistry
from leadwerk_platform.settings import PlatformSettings, repository_root
from leadwerk_platform.testing.helpers import create_database


@dataclass(frozen=True)
class Infrastructure:
    kafka: str
    database_url: str
    idempotence: bool


@pytest.fixture(scope="session")
def infrastructure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Infrastructure]:
    kafka = os.environ.get("LEADWERK_TEST_KAFKA")
    database_url = os.environ.get("LEADWERK_TEST_DATABASE_URL")
    broker = postgres = None
    if not kafka:
        broker = EmbeddedBroker(free_port())
        kafka = broker.start()
    if not database_url:
        postgres = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data")
        database_url = postgres.start()
    try:
        yield Infrastructure(kafka, database_url, idempotence=broker is None)
    finally:
        if broker is not None:
            broker.stop()
        if postgres is not None:
            postgres.stop()


@pytest.fixture(scope="session")
def contract_registry() -> ContractRegistry:
    return ContractRegistry.load(repository_root() / "schemas")


@pytest.fixture
def platform_env(infrastructure: Infrastructure, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for settings classes: this test's topic prefix on the shared broker."""
    env = {
        "LEADWERK_ENV": "test",
        "KAFKA_BOOTSTRAP_SERVERS": infrastructure.kafka,
        "LEADWERK_KAFKA_IDEMPOTENCE": str(infrastructure.idempotence).lower(),
        # Short group sessions: the embedded broker delays joins by about this long.
        "LEADWERK_KAFKA_SESSION_TIMEOUT_MS": "2000" if not infrastructure.idempotence else "10000",
        "LEADWERK_KAFKA_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}.",
        "DATABASE_URL": infrastructure.database_url,
        "LEADWERK_CONFIG_DIR": str(repository_root() / "config"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
async def topics(platform_env: dict[str, str], contract_registry: ContractRegistry) -> str:
    """Create every registry topic under this test's prefix; return the prefix."""
    settings = PlatformSettings()
    await provision_topics(settings, contract_registry, replication_factor=1)
    return settings.kafka_topic_prefix


@pytest.fixture
async def database(infrastructure: Infrastructure) -> AsyncIterator[str]:
    """A fresh, empty database for this test; its URL."""
    url = await create_database(infrastructure.database_url)
    name = url.partition("?")[0].rsplit("/", 1)[1]
    yield url
    admin = await asyncpg.connect(infrastructure.database_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()

