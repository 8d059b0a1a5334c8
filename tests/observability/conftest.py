"""The five services in-process over the embedded broker and Postgres, some traffic through
them, and what each one's ``/metrics`` then says; plus promtool (Debian's ``prometheus``)."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from aiosmtpd.controller import Controller

from leadwerk_platform.embedded import free_port
from leadwerk_platform.kafka.producer import OutgoingMessage, Publisher
from leadwerk_platform.kafka.topics import provision_topics
from leadwerk_platform.registry import ContractRegistry
from leadwerk_platform.settings import DEVELOPMENT_ADMIN_TOKEN, PlatformSettings, repository_root
from leadwerk_platform.testing.helpers import create_database, eventually, migrate, serve_app
from leadwerk_platform.testing.plugin import Infrastructure

from .exposition import Exposition, parse_exposition

SERVICES = ("ingest", "scoring", "workflow", "mailer", "crm-bridge")
#: The consumer groups whose runtimes get the service's ConsumerMetrics (the mailer's two
#: follow once its api.py passes them; see docs/operations.md).
#: The group of each service that consumes contact-events (the garbage is dead-lettered there).
DEAD_LETTERING = {"scoring": "scoring.scorer", "workflow": "workflow.engine",
                  "crm-bridge": "crm-bridge.sync"}
INSTRUMENTED_GROUPS = {"scoring": ("scoring.stitcher", "scoring.scorer"),
                       "workflow": ("workflow.engine",),
                       "mailer": ("mailer.sender", "mailer.consent"),
                       "crm-bridge": ("crm-bridge.deliveries", "crm-bridge.sync")}
BROWSER = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
           "Chrome/130.0 Safari/537.36")
ADMIN = {"Authorization": f"Bearer {DEVELOPMENT_ADMIN_TOKEN}"}


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None and os.environ.get("CI"):
        pytest.fail("promtool is needed for the metrics and alert checks (CI must have it)")
    if path is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus; "
                    "`make test` installs it where it can)")
    return path


@dataclass(frozen=True)
class Scrapes:
    """The raw ``/metrics`` text of every service after the traffic, and its parse."""

    text: dict[str, str]
    prefix: str

    def parsed(self, service: str) -> Exposition:
        return parse_exposition(self.text[service])

    def names(self) -> set[str]:
        """Every series name any service exposes (histograms with _bucket/_sum/_count)."""
        return set().union(*(self.parsed(s).series_names() for s in SERVICES))


class MailSink:
    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server: object, session: object,  # noqa: N802
                          envelope: object) -> str:
        del server, session, envelope
        self.count += 1
        return "250 2.0.0 Ok: queued"


@pytest.fixture(scope="session")
async def scrapes(infrastructure: Infrastructure, contract_registry: ContractRegistry,
                  ) -> AsyncIterator[Scrapes]:
    # Imported here: the tests that need no running service do not depend on all of them.
    from leadwerk_crm_bridge.api import create_app as create_bridge  # noqa: PLC0415
    from leadwerk_crm_bridge.settings import BridgeSettings  # noqa: PLC0415
    from leadwerk_ingest.api import create_app as create_ingest  # noqa: PLC0415
    from leadwerk_ingest.settings import IngestSettings  # noqa: PLC0415
    from leadwerk_mailer.api import create_app as create_mailer  # noqa: PLC0415
    from leadwerk_mailer.settings import MailerSettings  # noqa: PLC0415
    from leadwerk_scoring.api import create_app as create_scoring  # noqa: PLC0415
    from leadwerk_scoring.settings import ScoringSettings  # noqa: PLC0415
    from leadwerk_workflow.api import create_app as create_workflow  # noqa: PLC0415
    from leadwerk_workflow.settings import WorkflowSettings  # noqa: PLC0415

    prefix = f"o{uuid.uuid4().hex[:10]}."
    database = await create_database(infrastructure.database_url, "obs")
    for service in ("scoring", "workflow", "mailer", "crm-bridge"):
        await migrate(database, service)
    sink = MailSink()
    relay = Controller(sink, hostname="127.0.0.1", port=free_port())
    relay.start()
    ingest_port, mailer_port = free_port(), free_port()
    env = {
        "LEADWERK_ENV": "test", "KAFKA_BOOTSTRAP_SERVERS": infrastructure.kafka,
        "LEADWERK_KAFKA_IDEMPOTENCE": str(infrastructure.idempotence).lower(),
        "LEADWERK_KAFKA_SESSION_TIMEOUT_MS": "2000" if not infrastructure.idempotence
        else "10000",
        "LEADWERK_KAFKA_TOPIC_PREFIX": prefix, "DATABASE_URL": database,
        "LEADWERK_CONFIG_DIR": str(repository_root() / "config"),
        "LEADWERK_SCORING_BATCH_WITHIN": "0.02",
        "LEADWERK_SMTP_URL": f"smtp://127.0.0.1:{relay.port}",
        "LEADWERK_INGEST_PUBLIC_URL": f"http://127.0.0.1:{ingest_port}",
        "LEADWERK_MAILER_URL": f"http://127.0.0.1:{mailer_port}",
    }
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            await provision_topics(PlatformSettings(), contract_registry, replication_factor=1)
            scoring = create_scoring(ScoringSettings(), on_fatal=lambda error: None)
            async with serve_app(create_ingest(IngestSettings()), port=ingest_port) as ingest, \
                    serve_app(scoring) as scoring_url, \
                    serve_app(create_workflow(WorkflowSettings())) as workflow, \
                    serve_app(create_mailer(MailerSettings()), port=mailer_port) as mailer, \
                    serve_app(create_bridge(BridgeSettings())) as bridge:
                urls = dict(zip(SERVICES, (ingest, scoring_url, workflow, mailer, bridge),
                                strict=True))
                text = await _traffic_then_scrape(urls, PlatformSettings(), sink)
                yield Scrapes(text, prefix)
    finally:
        relay.stop()


async def _traffic_then_scrape(urls: dict[str, str], settings: PlatformSettings,
                               sink: MailSink) -> dict[str, str]:
    """Requests good and bad on every API, a form through to the mailer, malformed messages
    on consumed topics (dead letters); then wait until every instrumented group has measured
    its lag and every contact-events consumer has dead-lettered, and read every ``/metrics``."""
    async with httpx.AsyncClient(timeout=10, headers={"User-Agent": BROWSER}) as client:
        ingest = urls["ingest"]
        ok = await client.post(f"{ingest}/v1/track", auth=("dev-write-key", ""),
                               json={"anonymousId": str(uuid.uuid4()), "event": "Page Viewed"})
        assert ok.status_code == 200, ok.text
        bad = await client.post(f"{ingest}/v1/track", auth=("dev-write-key", ""), json={})
        assert bad.status_code == 400
        form = await client.post(f"{ingest}/f/ebook-download", data={
            "email": f"obs.{uuid.uuid4().hex[:8]}@example.de", "first_name": "Anna",
            "consent_marketing": "on"})
        assert form.status_code == 303, form.text
        for service in ("scoring", "workflow", "mailer", "crm-bridge"):
            await client.get(f"{urls[service]}/api/nothing-here", headers=ADMIN)
        await client.get(f"{urls['scoring']}/api/contacts", headers=ADMIN,
                         params={"email": "nobody@example.de"})
        await client.get(f"{urls['workflow']}/api/journeys", headers=ADMIN)
        await client.get(f"{urls['crm-bridge']}/api/deliveries", headers=ADMIN,
                         params={"state": "dead"})
        await client.post(f"{urls['crm-bridge']}/webhooks/dev/generic", content=b"{}")
        await _publish_garbage(settings, ("contact-events", "crm-commands", "email-commands"))

        async def settled() -> bool:
            if sink.count < 1:  # the double opt-in mail went through the mailer
                return False
            for service, groups in INSTRUMENTED_GROUPS.items():
                exposition = parse_exposition(
                    (await client.get(f"{urls[service]}/metrics")).text)
                lagging = {s.labels["group"] for s in exposition.samples
                           if s.name == "leadwerk_consumer_lag_records"}
                if not {settings.kafka_topic_prefix + g for g in groups} <= lagging:
                    return False
                dead_letterer = DEAD_LETTERING.get(service)
                if dead_letterer and exposition.value(
                        "leadwerk_consumer_records_dead_lettered_total",
                        group=settings.kafka_topic_prefix + dead_letterer,
                        topic=settings.topic("contact-events")) < 1:
                    return False
            return True

        await eventually(settled, timeout=60)
        responses = await asyncio.gather(*(client.get(f"{urls[s]}/metrics") for s in SERVICES))
    return {service: r.text for service, r in zip(SERVICES, responses, strict=True)}


async def _publish_garbage(settings: PlatformSettings, topics: tuple[str, ...]) -> None:
    publisher = Publisher(settings, "observability-test")
    await publisher.start(wait=5)
    try:
        await publisher.publish([OutgoingMessage(settings.topic(t), b"k", b"{not json")
                                 for t in topics])
    finally:
        await publisher.stop()
