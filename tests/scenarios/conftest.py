"""Ingest and scoring together, each on a real port, over the embedded broker and Postgres.

One stack per test module (the faust consumer groups take seconds to join); tests keep apart by
using their own visitor ids and emails. The scoring clock is a :class:`Clock` tests can move.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller

from leadwerk_crm_bridge.api import create_app as create_bridge
from leadwerk_crm_bridge.settings import BridgeSettings
from leadwerk_ingest.api import create_app as create_ingest
from leadwerk_ingest.settings import IngestSettings
from leadwerk_mailer.api import create_app as create_mailer
from leadwerk_mailer.settings import MailerSettings
from leadwerk_platform.embedded import free_port
from leadwerk_platform.kafka.topics import provision_topics
from leadwerk_platform.registry import ContractRegistry
from leadwerk_platform.settings import DEVELOPMENT_ADMIN_TOKEN, repository_root
from leadwerk_platform.testing.helpers import (
    create_database,
    migrate,
    read_topic,
    serve_app,
    values,
)
from leadwerk_platform.testing.plugin import Infrastructure
from leadwerk_scoring.api import Scoring, create_app
from leadwerk_scoring.settings import ScoringSettings
from leadwerk_workflow.api import Workflow
from leadwerk_workflow.api import create_app as create_workflow
from leadwerk_workflow.settings import WorkflowSettings

WRITE_KEY = "dev-write-key"
#: Ingest flags crawler user agents (httpx's own included) and the stitcher leaves bots out.
BROWSER = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
           "Chrome/130.0 Safari/537.36")


def browser() -> httpx.AsyncClient:
    """An HTTP client that looks like a visitor's browser."""
    return httpx.AsyncClient(timeout=10, headers={"User-Agent": BROWSER})


class Clock:
    """Real time plus an offset tests can move forward."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclass
class Stack:
    ingest: str
    scoring: str
    workflow: str
    clock: Clock
    service: Scoring
    flow: Workflow
    settings: ScoringSettings
    failures: list[BaseException] = field(default_factory=list)
    user_ids: dict[str, str] = field(default_factory=dict)
    mailer: str = ""
    mail: MailSink | None = None
    bridge: str = ""

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {DEVELOPMENT_ADMIN_TOKEN}"}

    async def track(self, client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> None:
        response = await client.post(f"{self.ingest}/v1/{path}", auth=(WRITE_KEY, ""),
                                      json=body)
        assert response.status_code == 200, response.text

    async def api(self, client: httpx.AsyncClient, method: str, path: str,
                  **kwargs: Any) -> httpx.Response:
        return await client.request(method, f"{self.scoring}/api{path}", headers=self.admin,
                                    **kwargs)

    async def eventually(self, probe: Callable[[], Awaitable[Any]], timeout: float = 20.0,
                         ) -> Any:
        """Poll ``probe`` until it returns something truthy (the pipeline is asynchronous)."""
        deadline = time.monotonic() + timeout
        while True:
            result = await probe()
            if result:
                return result
            assert not self.failures, self.failures
            if time.monotonic() > deadline:
                stats = {name: (p.processed, p.dead_lettered, repr(p.failed))
                         for name, p in self.service.processors.items()}
                raise AssertionError(f"not reached within {timeout}s; last: {result!r}; "
                                     f"processed, dead-lettered, failure: {stats}")
            await asyncio.sleep(0.1)


async def submit_form(stack: Stack, client: httpx.AsyncClient, device: str, address: str,
                      **fields: str) -> None:
    response = await client.post(
        f"{stack.ingest}/f/ebook-download", headers={"Cookie": f"lw_aid={device}"},
        data={"email": address, "first_name": "Anna", "company": "Schmidt GmbH",
              "consent_marketing": "on", **fields})
    assert response.status_code == 303, response.text


async def commands(stack: Stack, topic: str, contact_id: str, count: int,
                   timeout: float = 15.0) -> list[dict[str, Any]]:
    """Every command for ``contact_id`` on ``topic``, once ``count`` of them are there."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        records = await read_topic(stack.settings.kafka_bootstrap_servers,
                                   stack.settings.topic(topic), 1, timeout=2, idle=0.3)
        mine = [m for m in values(records) if m["data"]["contact_id"] == contact_id]
        if len(mine) >= count or asyncio.get_running_loop().time() > deadline:
            return mine
        await asyncio.sleep(0.2)


async def journeys_of(stack: Stack, client: httpx.AsyncClient,
                      contact_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"{stack.workflow}/api/contacts/{contact_id}/journeys",
                                headers=stack.admin)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def journey_steps(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A journey's own history: without the mailer's verdicts (``email_sent`` …), which
    arrive asynchronously from email-events and interleave."""
    return [h for h in history if not str(h["action"]).startswith("email_")]


async def known_contact(stack: Stack, client: httpx.AsyncClient, **traits: Any) -> str:
    user_id = f"crm-{uuid.uuid4().hex[:8]}"
    address = f"lead.{uuid.uuid4().hex[:8]}@example.de"
    await stack.track(client, "identify", {"userId": user_id,
                                           "traits": {"email": address, **traits}})

    async def found() -> str | None:
        response = await stack.api(client, "GET", "/contacts", params={"user_id": user_id})
        items = response.json()["items"]
        return items[0]["id"] if items else None

    contact_id: str = await stack.eventually(found)
    stack.user_ids[contact_id] = user_id
    return contact_id


async def scoring_database(infrastructure: Infrastructure) -> str:
    """A fresh database with the scoring, workflow, mailer and crm-bridge schemas."""
    url = await create_database(infrastructure.database_url, "scn")
    for service in ("scoring", "workflow", "mailer", "crm-bridge"):
        await migrate(url, service)
    return url


class MailSink:
    """The SMTP relay of the scenarios (aiosmtpd): keeps every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        del server, session
        message = email.message_from_bytes(envelope.original_content,
                                           policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append(message)
        return "250 2.0.0 Ok: queued"

    def to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.messages if address in str(m["To"])]


@pytest.fixture(scope="module")
async def stack(infrastructure: Infrastructure,
                contract_registry: ContractRegistry) -> AsyncIterator[Stack]:
    env = {
        "LEADWERK_ENV": "test",
        "KAFKA_BOOTSTRAP_SERVERS": infrastructure.kafka,
        "LEADWERK_KAFKA_IDEMPOTENCE": str(infrastructure.idempotence).lower(),
        "LEADWERK_KAFKA_SESSION_TIMEOUT_MS": "2000" if not infrastructure.idempotence
        else "10000",
        "LEADWERK_KAFKA_TOPIC_PREFIX": f"s{uuid.uuid4().hex[:10]}.",
        "DATABASE_URL": await scoring_database(infrastructure),
        "LEADWERK_CONFIG_DIR": str(repository_root() / "config"),
        "LEADWERK_SCORING_BATCH_WITHIN": "0.02",
    }
    sink = MailSink()
    relay = Controller(sink, hostname="127.0.0.1", port=free_port())
    relay.start()
    ingest_port, mailer_port = free_port(), free_port()
    env.update({"LEADWERK_SMTP_URL": f"smtp://127.0.0.1:{relay.port}",
                "LEADWERK_INGEST_PUBLIC_URL": f"http://127.0.0.1:{ingest_port}",
                "LEADWERK_MAILER_URL": f"http://127.0.0.1:{mailer_port}"})
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        settings = ScoringSettings()
        await provision_topics(settings, contract_registry, replication_factor=1)
        clock = Clock()
        failures: list[BaseException] = []
        app = create_app(settings, clock=clock, on_fatal=failures.append)
        journeys = create_workflow(WorkflowSettings(), clock=clock)
        mailer = create_mailer(MailerSettings(), clock=clock)
        try:
            async with serve_app(create_ingest(IngestSettings()), port=ingest_port) \
                    as ingest_url, serve_app(app) as scoring_url, \
                    serve_app(mailer, port=mailer_port) as mailer_url, \
                    serve_app(journeys) as workflow_url, \
                    serve_app(create_bridge(BridgeSettings(), clock=clock)) as bridge_url:
                yield Stack(ingest_url, scoring_url, workflow_url, clock, app.state.scoring,
                            journeys.state.workflow, settings, failures, mailer=mailer_url,
                            mail=sink, bridge=bridge_url)
        finally:
            relay.stop()
    os.environ.pop("LEADWERK_SCORING_BATCH_WITHIN", None)
