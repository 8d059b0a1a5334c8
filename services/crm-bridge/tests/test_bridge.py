"""The crm-bridge over real parts: hand-off and webhook commands from the broker, Postgres,
real local HTTP receivers verifying every delivery with the `standardwebhooks` reference
library, and the inbound CRM webhook to crm-events."""

from __future__ import annotations

import shutil
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import yaml
from aiokafka import AIOKafkaProducer
from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from leadwerk_crm_bridge.api import Bridge, create_app
from leadwerk_crm_bridge.domain.outbound import development_secret
from leadwerk_crm_bridge.settings import BridgeSettings
from leadwerk_platform.envelope import Envelope, encode
from leadwerk_platform.kafka.topics import provision_topics
from leadwerk_platform.registry import ContractRegistry
from leadwerk_platform.settings import DEVELOPMENT_ADMIN_TOKEN, repository_root
from leadwerk_platform.testing.helpers import (
    create_database,
    eventually,
    migrate,
    read_topic,
    serve_app,
    values,
)
from leadwerk_platform.testing.plugin import Infrastructure

pytestmark = pytest.mark.integration
ADMIN = {"Authorization": f"Bearer {DEVELOPMENT_ADMIN_TOKEN}"}
OUTBOUND = development_secret("outbound-test", "a")
OLD_OUTBOUND = development_secret("outbound-test", "b")
INBOUND = development_secret("inbound-test", "a")


@dataclass
class Receiver:
    """A CRM stand-in: verifies every delivery; scripted answers per path."""

    secret: str
    script: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    verified: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    ids: Counter[str] = field(default_factory=Counter)
    refused: int = 0

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        try:
            payload = Webhook(self.secret).verify(body, dict(request.headers))
        except Exception:  # noqa: BLE001 - any failure: not a valid delivery
            self.refused += 1
            return JSONResponse({"detail": "bad signature"}, status_code=401)
        path = request.url.path
        planned = self.script.get(path) or []
        if planned:
            status, headers = planned.pop(0)
            return Response(status_code=status, headers=headers)
        self.ids[request.headers["webhook-id"]] += 1
        self.verified[path].append(payload)
        return Response(status_code=204)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self.handle, methods=["POST"])])


@dataclass
class Rig:
    bridge: str
    receiver: Receiver
    receiver_url: str
    service: Bridge
    settings: BridgeSettings

    async def command(self, kind: str, workspace: str = "dev", **data: Any) -> Envelope:
        now = datetime.now(UTC)
        contact_id = data.pop("contact_id", str(uuid.uuid4()))
        command = Envelope(id=str(uuid.uuid4()), type=kind, workspace=workspace,
                           occurred_at=now, received_at=now, producer="workflow",
                           data={"contact_id": contact_id, "snapshot": {"stage": "mql"},
                                 "origin": {"journey_id": "t"}, **data})
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap_servers)
        await producer.start()
        try:
            await producer.send_and_wait(self.settings.topic("crm-commands"), encode(command),
                                         key=f"{workspace}:{contact_id}".encode())
        finally:
            await producer.stop()
        return command

    async def log(self, client: httpx.AsyncClient, contact_id: str, workspace: str = "dev",
                  ) -> list[dict[str, Any]]:
        response = await client.get(f"{self.bridge}/api/contacts/{contact_id}/deliveries",
                                    headers=ADMIN, params={"workspace": workspace})
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        return items



@pytest.fixture(scope="module")
async def rig(infrastructure: Infrastructure, contract_registry: ContractRegistry,
              tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    receiver = Receiver(OUTBOUND)
    async with serve_app(receiver.app()) as receiver_url:
        config = tmp_path_factory.mktemp("config")
        shutil.copy(repository_root() / "config" / "forms.yaml", config / "forms.yaml")
        (config / "workspaces.yaml").write_text(yaml.safe_dump({"workspaces": [
            {"id": "dev", "write_keys": ["k1"], "allow_private_webhooks": True},
            {"id": "strict", "write_keys": ["k2"]}]}))
        (config / "connectors.yaml").write_text(yaml.safe_dump({"connectors": [
            {"id": "crm", "workspace": "dev", "url": f"{receiver_url}/handoff",
             "events": ["handoff"]},
            {"id": "crm", "workspace": "strict", "url": f"{receiver_url}/strict",
             "events": ["handoff"]}]}))
        database = await create_database(infrastructure.database_url, "crm")
        await migrate(database, "crm-bridge")
        env = {
            "LEADWERK_ENV": "test", "KAFKA_BOOTSTRAP_SERVERS": infrastructure.kafka,
            "LEADWERK_KAFKA_IDEMPOTENCE": str(infrastructure.idempotence).lower(),
            "LEADWERK_KAFKA_SESSION_TIMEOUT_MS": "2000" if not infrastructure.idempotence
            else "10000",
            "LEADWERK_KAFKA_TOPIC_PREFIX": f"c{uuid.uuid4().hex[:10]}.",
            "DATABASE_URL": database, "LEADWERK_CONFIG_DIR": str(config),
            "LEADWERK_WEBHOOK_SECRETS": f"{OUTBOUND} {OLD_OUTBOUND}",
            "LEADWERK_INBOUND_WEBHOOK_SECRETS": INBOUND,
            "LEADWERK_CRM_RETRY_BASE_SECONDS": "0.05", "LEADWERK_CRM_RETRY_ATTEMPTS": "4",
        }
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            settings = BridgeSettings()
            await provision_topics(settings, contract_registry, replication_factor=1)
            app = create_app(settings)
            async with serve_app(app) as bridge_url:
                yield Rig(bridge_url, receiver, receiver_url, app.state.bridge, settings)


async def test_a_handoff_arrives_signed_once_even_when_the_receiver_fails_first(
        rig: Rig) -> None:
    rig.receiver.script["/handoff"] = [(503, {}), (500, {})]
    command = await rig.command("crm.handoff_requested.v1", reason="became MQL",
                                owner="anna.berger@example.de")
    contact_id = command.data["contact_id"]
    async with httpx.AsyncClient(timeout=10) as client:
        [delivery] = await eventually(lambda: _state(rig, client, contact_id, "delivered"))
    assert delivery["attempts"] == 3
    arrived = [p for p in rig.receiver.verified["/handoff"]
               if p["data"]["contact_id"] == contact_id]
    assert [p["type"] for p in arrived] == ["lead.handoff"]
    data = arrived[0]["data"]
    assert {k: data[k] for k in command.data} == command.data
    assert data["contact"]["owner"] == "anna.berger@example.de"
    assert data["contact"]["stage"] == "mql"  # the journey's snapshot fills what is unknown
    assert rig.receiver.ids[delivery["delivery_id"]] == 1  # one effect, stable webhook-id
    assert rig.receiver.refused == 0


async def test_429_with_retry_after_is_honoured(rig: Rig) -> None:
    rig.receiver.script["/slow"] = [(429, {"Retry-After": "1"})]
    start = time.monotonic()
    command = await rig.command("crm.webhook_requested.v1", url=f"{rig.receiver_url}/slow",
                                event="journey.demo_booked")
    async with httpx.AsyncClient(timeout=10) as client:
        await eventually(lambda: _state(rig, client, command.data["contact_id"], "delivered"))
    assert time.monotonic() - start >= 1.0
    [payload] = [p for p in rig.receiver.verified["/slow"]
                 if p["data"]["contact_id"] == command.data["contact_id"]]
    assert payload["type"] == "journey.demo_booked"
    assert "url" not in payload["data"]


async def test_a_dead_letter_is_listed_and_replayed(rig: Rig) -> None:
    rig.receiver.script["/flaky"] = [(500, {})] * 4  # the whole budget of 4 attempts
    command = await rig.command("crm.webhook_requested.v1", url=f"{rig.receiver_url}/flaky",
                                event="journey.step")
    contact_id = command.data["contact_id"]
    async with httpx.AsyncClient(timeout=10) as client:
        [dead] = await eventually(lambda: _state(rig, client, contact_id, "dead"))
        assert dead["last_error"] == "HTTP 500 after 4 attempts"
        listed = (await client.get(f"{rig.bridge}/api/deliveries", headers=ADMIN,
                                   params={"state": "dead"})).json()["items"]
        assert dead["delivery_id"] in {d["delivery_id"] for d in listed}
        assert (await client.post(f"{rig.bridge}/api/deliveries/{dead['delivery_id']}/replay")
                ).status_code == 401
        replayed = await client.post(
            f"{rig.bridge}/api/deliveries/{dead['delivery_id']}/replay", headers=ADMIN)
        assert replayed.status_code == 200, replayed.text
        await eventually(lambda: _state(rig, client, contact_id, "delivered"))
        again = await client.post(
            f"{rig.bridge}/api/deliveries/{dead['delivery_id']}/replay", headers=ADMIN)
        assert again.status_code == 409
    assert rig.receiver.ids[dead["delivery_id"]] == 1


async def test_private_addresses_are_refused_unless_the_workspace_allows_them(
        rig: Rig) -> None:
    command = await rig.command("crm.handoff_requested.v1", workspace="strict",
                                reason="became MQL")
    async with httpx.AsyncClient(timeout=10) as client:
        [dead] = await eventually(lambda: _state(rig, client, command.data["contact_id"],
                                                 "dead", workspace="strict"))
    assert dead["last_error"].startswith("refused (SSRF protection): 127.0.0.1 is a loopback")
    assert dead["attempts"] == 1
    assert rig.receiver.verified["/strict"] == []


async def test_a_signed_deal_won_reaches_crm_events_once(rig: Rig) -> None:
    contact_id = str(uuid.uuid4())
    body = (b'{"type": "deal.won", "data": {"contact_id": "' + contact_id.encode()
            + b'", "crm_id": "D-17", "value": 12000}}')
    event_id = f"crm-{uuid.uuid4().hex}"
    sent_at = datetime.now(UTC)  # the signed timestamp and the header must be the same second
    headers = {"Content-Type": "application/json",
               "webhook-id": event_id, "webhook-timestamp": str(int(sent_at.timestamp())),
               "webhook-signature": Webhook(INBOUND).sign(event_id, sent_at, body.decode())}
    url = f"{rig.bridge}/webhooks/dev/generic"
    async with httpx.AsyncClient(timeout=10) as client:
        first = await client.post(url, content=body, headers=headers)
        assert first.status_code == 200, first.text
        assert first.json()["status"] == "won"
        again = await client.post(url, content=body, headers=headers)
        assert again.json()["duplicate"] is True
        forged = await client.post(url, content=body.replace(b"deal.won", b"deal.lost"),
                                   headers=headers)
        assert forged.status_code == 401
        unknown = await client.post(url, content=b'{"type": "deal.maybe", "data": {}}',
                                    headers={**headers, "webhook-id": "x2",
                                             "webhook-signature": Webhook(INBOUND).sign(
                                                 "x2", sent_at,
                                                 '{"type": "deal.maybe", "data": {}}')})
        assert unknown.status_code == 422
    events = [e for e in values(await read_topic(
        rig.settings.kafka_bootstrap_servers, rig.settings.topic("crm-events"), 1,
        timeout=10, idle=0.5)) if e["data"]["contact_id"] == contact_id]
    assert [(e["type"], e["data"]["status"], e["data"]["crm_id"]) for e in events] == [
        ("crm.lead_feedback.v1", "won", "D-17")]


async def _state(rig: Rig, client: httpx.AsyncClient, contact_id: str, state: str,
                 workspace: str = "dev") -> list[dict[str, Any]] | None:
    items = await rig.log(client, contact_id, workspace)
    return items if items and all(i["state"] == state for i in items) else None
