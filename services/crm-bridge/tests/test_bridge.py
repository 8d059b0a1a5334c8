"""The crm-bridge over real parts: hand-off and webhook commands from the broker, Postgres,
real local HTTP receivers verifying every delivery with the `standardwebhooks` reference
library, and the inbound CRM webhook to crm-events."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import shutil
import sys
import time
import uuid
import warnings
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import asyncpg
import httpx
import orjson
import pytest
import yaml
from aiokafka import AIOKafkaProducer
from openapi_core import OpenAPI
from openapi_core.contrib.starlette.requests import StarletteOpenAPIRequest
from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from leadwerk_crm_bridge.api import Bridge, create_app
from leadwerk_crm_bridge.domain.outbound import development_secret
from leadwerk_crm_bridge.projection import forget_old_activities, recent_summary
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
HUBSPOT_TOKEN = "pat-eu1-test-token"
HUBSPOT_SECRET = "hubspot-client-secret"
SPECS = repository_root() / "services" / "crm-bridge" / "tests" / "specs" / "hubspot"


class HubSpotStandIn:
    """HubSpot's CRM v3 as far as the bridge uses it. Every request is validated against
    HubSpot's official OpenAPI files; one that does not conform is answered 400 and kept."""

    def __init__(self) -> None:
        self.apis: dict[str, OpenAPI] = {}
        for name, prefix in (("crm-contacts-v3.json", "/crm/v3/objects/contacts"),
                             ("crm-notes-v3.json", "/crm/v3/objects/notes")):
            spec = json.loads((SPECS / name).read_text())
            spec["servers"] = [{"url": "/"}]  # wherever the stand-in listens
            self.apis[prefix] = OpenAPI.from_dict(spec)
        self.ids = (str(n) for n in itertools.count(7001))
        self.contacts: dict[str, str] = {}  # email → id
        self.properties: dict[str, dict[str, str]] = defaultdict(dict)  # id → properties
        self.notes: dict[str, list[dict[str, str]]] = defaultdict(list)  # contact id → notes
        self.erased: list[dict[str, Any]] = []
        self.invalid: list[str] = []
        self.unauthorised = 0

    async def handle(self, request: Request) -> Response:  # noqa: PLR0911
        body = await request.body()
        path = request.url.path
        api = next((a for prefix, a in self.apis.items() if path.startswith(prefix)), None)
        if api is None:
            return JSONResponse({"message": "unknown endpoint"}, status_code=404)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the spec's OAuth scheme is not checked here
                api.validate_request(StarletteOpenAPIRequest(request, body))
        except Exception as error:  # noqa: BLE001 - every failure is a finding
            self.invalid.append(f"{request.method} {path}: {error}")
            return JSONResponse({"message": str(error)}, status_code=400)
        if request.headers.get("authorization") != f"Bearer {HUBSPOT_TOKEN}":
            self.unauthorised += 1
            return JSONResponse({"message": "unauthorised"}, status_code=401)
        document = orjson.loads(body)
        now = datetime.now(UTC).isoformat()
        if path.endswith("/contacts/batch/upsert"):
            results = []
            for item in document["inputs"]:
                email = item["id"].lower()
                new = email not in self.contacts
                hubspot_id = self.contacts.setdefault(email, next(self.ids))
                self.properties[hubspot_id].update(item["properties"])
                results.append({"id": hubspot_id, "properties": self.properties[hubspot_id],
                                "createdAt": now, "updatedAt": now, "archived": False,
                                "new": new})
            return JSONResponse({"status": "COMPLETE", "results": results, "startedAt": now,
                                 "completedAt": now})
        if path.endswith("/notes/batch/create"):
            for item in document["inputs"]:
                for association in item["associations"]:
                    self.notes[association["to"]["id"]].append(item["properties"])
            return JSONResponse({"status": "COMPLETE", "results": [], "startedAt": now,
                                 "completedAt": now}, status_code=201)
        if path.endswith("/contacts/gdpr-delete"):
            self.erased.append(document)
            return Response(status_code=204)
        return JSONResponse({"message": "not in the stand-in"}, status_code=404)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self.handle, methods=["POST"])])


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


class SalesforceStandIn:
    """Salesforce's REST API as far as the bridge uses it: the client-credentials token, Lead
    upserts by external id through sObject Collections, Tasks, deletes. ``expire`` makes the
    next API call answer 401 (an expired token)."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.leads: dict[str, dict[str, Any]] = {}  # external id → fields
        self.tasks: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.problems: list[str] = []
        self.expire = False

    async def token(self, request: Request) -> Response:
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        if (form.get("grant_type"), form.get("client_id"), form.get("client_secret")) != (
                "client_credentials", "sf-client", "sf-secret"):
            return JSONResponse({"error": "invalid_client"}, status_code=400)
        self.tokens.append(token := f"00D-{uuid.uuid4().hex}")
        return JSONResponse({"access_token": token, "token_type": "Bearer",
                             "instance_url": str(request.base_url).rstrip("/")})

    async def api(self, request: Request) -> Response:
        if not self.tokens or request.headers.get("authorization") != \
                f"Bearer {self.tokens[-1]}" or self.expire:
            self.expire = False
            return JSONResponse([{"errorCode": "INVALID_SESSION_ID"}], status_code=401)
        path = request.url.path.removeprefix("/services/data/v61.0")
        if request.method == "DELETE":
            self.deleted.append(path.rsplit("/", 1)[-1])
            return Response(status_code=204)
        body = orjson.loads(await request.body())
        results = []
        for record in body["records"]:
            kind = record["attributes"]["type"]
            if path == "/composite/sobjects/Lead/Leadwerk_Id__c" and kind == "Lead":
                if not record.get("LastName") or not record.get("Company"):
                    self.problems.append(f"Lead without LastName or Company: {record}")
                key = record["Leadwerk_Id__c"]
                self.leads.setdefault(key, {"Id": f"00Q{len(self.leads):012d}"}).update(
                    {k: v for k, v in record.items() if k != "attributes"})
                results.append({"id": self.leads[key]["Id"], "success": True, "errors": []})
            elif path == "/composite/sobjects" and kind == "Task":
                if record["WhoId"] not in {lead["Id"] for lead in self.leads.values()}:
                    self.problems.append(f"a Task for an unknown record: {record}")
                self.tasks.append(record)
                results.append({"id": f"00T{len(self.tasks):012d}", "success": True,
                                "errors": []})
            else:
                self.problems.append(f"{request.method} {path} {kind}")
                results.append({"success": False, "errors": [
                    {"statusCode": "NOT_FOUND", "message": "unexpected", "fields": []}]})
        return JSONResponse(results)

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/services/oauth2/token", self.token, methods=["POST"]),
            Route("/services/data/{path:path}", self.api, methods=["PATCH", "POST", "DELETE"])])


@dataclass
class Rig:
    bridge: str
    receiver: Receiver
    receiver_url: str
    service: Bridge
    settings: BridgeSettings
    hubspot: HubSpotStandIn
    salesforce: SalesforceStandIn

    async def publish(self, topic: str, kind: str, data: dict[str, Any],
                      workspace: str = "acme", at: datetime | None = None) -> Envelope:
        at = at or datetime.now(UTC)
        contact_id = data.get("contact_id") or data.get("survivor_id")
        envelope = Envelope(id=str(uuid.uuid4()), type=kind, workspace=workspace,
                            occurred_at=at, received_at=at, producer="scoring", data=data)
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap_servers)
        await producer.start()
        try:
            await producer.send_and_wait(self.settings.topic(topic), encode(envelope),
                                         key=f"{workspace}:{contact_id}".encode())
        finally:
            await producer.stop()
        return envelope

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
    hubspot, salesforce = HubSpotStandIn(), SalesforceStandIn()
    async with serve_app(receiver.app()) as receiver_url, \
            serve_app(hubspot.app()) as hubspot_url, \
            serve_app(salesforce.app()) as salesforce_url:
        config = tmp_path_factory.mktemp("config")
        shutil.copy(repository_root() / "config" / "forms.yaml", config / "forms.yaml")
        (config / "workspaces.yaml").write_text(yaml.safe_dump({"workspaces": [
            {"id": "dev", "write_keys": ["k1"], "allow_private_webhooks": True},
            {"id": "strict", "write_keys": ["k2"]},
            {"id": "acme", "write_keys": ["k3"], "allow_private_webhooks": True},
            {"id": "globex", "write_keys": ["k4"], "allow_private_webhooks": True}]}))
        (config / "connectors.yaml").write_text(yaml.safe_dump({"activities": [
            {"type": "track", "event": "Document Downloaded",
             "label": "downloaded {properties.document}"},
            {"type": "track", "event": "Video Playback Started",
             "label": "watched {properties.title}"},
        ], "connectors": [
            {"id": "hubspot", "workspace": "acme", "kind": "hubspot", "url": hubspot_url,
             "events": ["handoff", "lifecycle", "score", "activity", "profile", "erasure"],
             "secrets": {"token": "LW_TEST_HUBSPOT_TOKEN",
                         "client_secret": "LW_TEST_HUBSPOT_SECRET"},
             "owners": {"anna.berger@example.de": "501"}},
            {"id": "timeline", "workspace": "acme", "url": f"{receiver_url}/timeline",
             "events": ["activity"]},
            {"id": "salesforce", "workspace": "globex", "kind": "salesforce",
             "url": salesforce_url, "events": ["handoff", "lifecycle", "activity", "erasure"],
             "secrets": {"client_id": "LW_TEST_SF_ID", "client_secret": "LW_TEST_SF_SECRET"}},
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
            "LW_TEST_HUBSPOT_TOKEN": HUBSPOT_TOKEN, "LW_TEST_HUBSPOT_SECRET": HUBSPOT_SECRET,
            "LW_TEST_SF_ID": "sf-client", "LW_TEST_SF_SECRET": "sf-secret",
        }
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            settings = BridgeSettings()
            await provision_topics(settings, contract_registry, replication_factor=1)
            app = create_app(settings)
            async with serve_app(app) as bridge_url:
                yield Rig(bridge_url, receiver, receiver_url, app.state.bridge, settings,
                          hubspot, salesforce)


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
    assert data["contact"]["stage"] == "mql"  # the journey's snapshot: what caused the hand-off
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


async def test_dead_letters_are_replayed_by_command(rig: Rig) -> None:
    rig.receiver.script["/flaky-cli"] = [(500, {})] * 4
    command = await rig.command("crm.webhook_requested.v1",
                                url=f"{rig.receiver_url}/flaky-cli", event="journey.step")
    contact_id = command.data["contact_id"]
    async with httpx.AsyncClient(timeout=10) as client:
        [dead] = await eventually(lambda: _state(rig, client, contact_id, "dead"))
        replay = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "leadwerk_crm_bridge", "replay", "--workspace", "dev",
            "--delivery", dead["delivery_id"], stdout=asyncio.subprocess.PIPE)
        output, _ = await replay.communicate()
        assert replay.returncode == 0
        assert output.decode().startswith("1 dead-lettered deliveries wait again")
        if rig.service.worker is not None:  # the running bridge would see it within a minute
            rig.service.worker.wake()
        await eventually(lambda: _state(rig, client, contact_id, "delivered"))
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
        stated = (b'{"type": "owner.changed", "occurred_at": "2026-11-20T09:15:00.250Z", '
                  b'"data": {"contact_id": "' + contact_id.encode() + b'", "owner": "x@y.de"}}')
        bad = stated.replace(b"2026-11-20T09:15:00.250Z", b"yesterday")
        answers = [await client.post(url, content=content, headers={
            **headers, "webhook-id": wid, "webhook-signature": Webhook(INBOUND).sign(
                wid, sent_at, content.decode())}) for wid, content in (("x3", stated),
                                                                       ("x4", bad))]
        assert [a.status_code for a in answers] == [200, 422]
    events = [e for e in values(await read_topic(
        rig.settings.kafka_bootstrap_servers, rig.settings.topic("crm-events"), 2,
        timeout=10, idle=0.5)) if e["data"]["contact_id"] == contact_id]
    assert [(e["type"], e["data"].get("status"), e["data"]["crm_id"]) for e in events] == [
        ("crm.lead_feedback.v1", "won", "D-17"), ("crm.contact_updated.v1", None, None)]
    # When it happened: what the CRM states, else when it arrived (not the signature's
    # whole second, which can put a verdict before the activity it answers).
    assert events[1]["occurred_at"] == "2026-11-20T09:15:00.250Z"
    won_at = datetime.fromisoformat(events[0]["occurred_at"].replace("Z", "+00:00"))
    assert won_at >= sent_at.replace(microsecond=sent_at.microsecond // 1000 * 1000)


async def _state(rig: Rig, client: httpx.AsyncClient, contact_id: str, state: str, *,
                 workspace: str = "dev", at_least: int = 1) -> list[dict[str, Any]] | None:
    items = await rig.log(client, contact_id, workspace)
    return items if len(items) >= at_least and all(i["state"] == state for i in items) \
        else None


async def _known_contact(rig: Rig, email: str) -> str:
    """A contact the bridge knows (its profile), as HubSpot gets it."""
    contact_id = str(uuid.uuid4())
    await rig.publish("contact-events", "contact.profile_changed.v1", {
        "contact_id": contact_id, "changed": {"email": email},
        "traits": {"email": email, "first_name": "Anna", "company": "Schmidt GmbH",
                   "owner": "anna.berger@example.de"}})
    async with httpx.AsyncClient(timeout=10) as client:
        await eventually(lambda: _state(rig, client, contact_id, "delivered",
                                                  workspace="acme"))
    return contact_id


async def test_hubspot_gets_contact_activities_and_handoff_as_its_api_describes(
        rig: Rig) -> None:
    email = f"anna.{uuid.uuid4().hex[:8]}@schmidt.example"
    contact_id = await _known_contact(rig, email)
    start = datetime.now(UTC)
    for minutes, name, properties in (
            (3, "Document Downloaded", {"properties.document": "pricing-sheet.pdf"}),
            (2, "Video Playback Started", {"properties.title": "the demo video"}),
            (1, "Document Downloaded", {"properties.document": "pricing-sheet.pdf"}),
            (1, "Careers Page Read", {})):  # no rule names it: the CRM does not see it
        await rig.publish("contact-events", "contact.activity.v1", {
            "contact_id": contact_id, "known": True, "kind": "track", "name": name,
            "properties": properties}, at=start - timedelta(minutes=minutes))
    await rig.publish("contact-changes", "contact.score_changed.v1", {
        "contact_id": contact_id, "score": 120.0, "previous_score": 60.0, "grade": "B",
        "band": 2, "rating": "B2", "previous_rating": "B1", "model_version": 1, "causes": []})
    await rig.publish("contact-changes", "contact.stage_changed.v1", {
        "contact_id": contact_id, "from_stage": "lead", "to_stage": "mql", "cause": "score",
        "reason": None, "score": 120.0, "rating": "B2", "changed_at": start.isoformat()})
    async with httpx.AsyncClient(timeout=10) as client:
        log = await eventually(lambda: _state(rig, client, contact_id, "delivered",
                                              workspace="acme", at_least=9))  # 6 + 3 webhook
        await rig.command("crm.handoff_requested.v1", workspace="acme",
                          contact_id=contact_id, reason="became MQL",
                          owner="anna.berger@example.de")
        log = await eventually(lambda: _state(rig, client, contact_id, "delivered",
                                              workspace="acme", at_least=10))
    assert rig.hubspot.invalid == []
    assert rig.hubspot.unauthorised == 0
    hubspot_id = rig.hubspot.contacts[email]
    properties = rig.hubspot.properties[hubspot_id]
    assert {k: properties.get(k) for k in (
        "email", "firstname", "company", "leadwerk_score", "leadwerk_grade",
        "leadwerk_rating", "lifecyclestage", "hs_lead_status", "hubspot_owner_id")} == {
        "email": email, "firstname": "Anna", "company": "Schmidt GmbH",
        "leadwerk_score": "120", "leadwerk_grade": "B", "leadwerk_rating": "B2",
        "lifecyclestage": "marketingqualifiedlead", "hs_lead_status": "NEW",
        "hubspot_owner_id": "501"}
    notes = [n["hs_note_body"] for n in rig.hubspot.notes[hubspot_id]]
    assert notes[:3] == ["downloaded pricing-sheet.pdf", "watched the demo video",
                         "downloaded pricing-sheet.pdf"]
    assert "Recent activity: downloaded pricing-sheet.pdf twice, watched the demo video" \
        in notes[3]
    assert len(notes) == 4
    kinds = Counter(d["kind"] for d in log if d["connector"] == "hubspot")
    assert kinds == {"profile": 1, "activity": 3, "score": 1, "lifecycle": 1, "handoff": 1}
    # The webhook connector got the same three activities, signed, each with its own id.
    timeline = [item for p in rig.receiver.verified["/timeline"]
                for item in ([p] if p["type"] == "contact.activity" else p["data"]["items"])
                if item["data"]["contact_id"] == contact_id]
    assert [i["data"]["label"] for i in timeline] == notes[:3]


async def test_hubspot_changes_come_back_signed_and_once(rig: Rig) -> None:
    email = f"ben.{uuid.uuid4().hex[:8]}@schmidt.example"
    contact_id = await _known_contact(rig, email)
    hubspot_id = rig.hubspot.contacts[email]
    url = f"{rig.bridge}/webhooks/acme/hubspot"
    base = int(time.time() * 1000)
    events = [
        {"eventId": base + 1, "subscriptionType": "contact.propertyChange", "portalId": 62515,
         "objectId": int(hubspot_id), "propertyName": "lifecyclestage",
         "propertyValue": "customer", "occurredAt": base, "changeSource": "CRM_UI"},
        {"eventId": base + 2, "subscriptionType": "contact.propertyChange", "portalId": 62515,
         "objectId": int(hubspot_id), "propertyName": "hubspot_owner_id",
         "propertyValue": "501", "occurredAt": base, "changeSource": "CRM_UI"},
        {"eventId": base + 3, "subscriptionType": "contact.propertyChange", "portalId": 62515,
         "objectId": int(hubspot_id), "propertyName": "jobtitle",
         "propertyValue": "Head of Sales", "occurredAt": base, "changeSource": "CRM_UI"},
        {"eventId": base + 4, "subscriptionType": "contact.propertyChange", "portalId": 62515,
         "objectId": 999999, "propertyName": "lifecyclestage",  # not a contact of ours
         "propertyValue": "customer", "occurredAt": base, "changeSource": "CRM_UI"},
    ]
    body = orjson.dumps(events)

    def signed(content: bytes, stamp: int | None = None) -> dict[str, str]:
        timestamp = str(stamp or int(time.time() * 1000))
        digest = hmac.new(HUBSPOT_SECRET.encode(),
                          b"POST" + url.encode() + content + timestamp.encode(),
                          hashlib.sha256).digest()
        return {"Content-Type": "application/json", "X-HubSpot-Request-Timestamp": timestamp,
                "X-HubSpot-Signature-v3": base64.b64encode(digest).decode()}

    async with httpx.AsyncClient(timeout=10) as client:
        first = await client.post(url, content=body, headers=signed(body))
        assert first.status_code == 200, first.text
        assert first.json() == {"accepted": 3, "duplicate": 0, "ignored": 1}
        again = await client.post(url, content=body, headers=signed(body))
        assert again.json() == {"accepted": 0, "duplicate": 3, "ignored": 1}
        stale = await client.post(url, content=body,
                                  headers=signed(body, base - 10 * 60 * 1000))
        assert stale.status_code == 401
        forged = await client.post(url, content=body.replace(b"customer", b"other"),
                                   headers=signed(body))
        assert forged.status_code == 401
    events_out = [e for e in values(await read_topic(
        rig.settings.kafka_bootstrap_servers, rig.settings.topic("crm-events"), 1,
        timeout=10, idle=0.5)) if e["data"]["contact_id"] == contact_id]
    assert sorted((e["type"], json.dumps(e["data"].get("status") or e["data"]["traits"]))
                  for e in events_out) == [
        ("crm.contact_updated.v1", '{"owner": "anna.berger@example.de"}'),
        ("crm.contact_updated.v1", '{"role": "Head of Sales"}'),
        ("crm.lead_feedback.v1", '"won"')]


async def test_an_erasure_reaches_hubspot_and_leaves_nothing_behind(rig: Rig) -> None:
    email = f"carla.{uuid.uuid4().hex[:8]}@schmidt.example"
    contact_id = await _known_contact(rig, email)
    hubspot_id = rig.hubspot.contacts[email]
    await rig.publish("contact-changes", "contact.erased.v1", {
        "contact_id": contact_id, "merged_ids": [], "identifier_digests": [],
        "requested_by": "api"})
    async with httpx.AsyncClient(timeout=10) as client:
        log = await eventually(lambda: _state(rig, client, contact_id, "delivered",
                                              workspace="acme", at_least=2))
    assert [d["kind"] for d in log] == ["profile", "erasure"]
    assert {"objectId": hubspot_id} in rig.hubspot.erased
    connection = await asyncpg.connect(rig.settings.database_url.get_secret_value()
                                       if rig.settings.database_url else "",
                                       server_settings={"search_path": "crm_bridge"})
    try:
        bodies = await connection.fetch(
            "SELECT body FROM deliveries WHERE contact_id = $1", contact_id)
        left = [await connection.fetchval(
            f"SELECT count(*) FROM {table} WHERE contact_id = $1", contact_id)  # noqa: S608
            for table in ("contacts", "recent_activities", "crm_records")]
    finally:
        await connection.close()
    assert {bytes(b["body"]) for b in bodies} == {b"{}"}
    assert left == [0, 0, 0]


async def test_salesforce_gets_a_lead_tasks_and_the_erasure(rig: Rig) -> None:
    contact_id = str(uuid.uuid4())
    await rig.publish("contact-events", "contact.profile_changed.v1", workspace="globex", data={
        "contact_id": contact_id, "changed": {"email": "d@globex.example"},
        "traits": {"email": "d@globex.example", "first_name": "Dana", "company": "Globex"}})
    await rig.publish("contact-events", "contact.activity.v1", workspace="globex", data={
        "contact_id": contact_id, "known": True, "kind": "track",
        "name": "Document Downloaded", "properties": {"properties.document": "pricing.pdf"}})
    rig.salesforce.expire = True  # the first call meets an expired token
    await rig.publish("contact-changes", "contact.stage_changed.v1", workspace="globex", data={
        "contact_id": contact_id, "from_stage": "lead", "to_stage": "mql", "cause": "score",
        "reason": None, "score": 130.0, "rating": "A2", "changed_at": "2026-11-21T10:00:00Z"})
    async with httpx.AsyncClient(timeout=10) as client:
        await eventually(lambda: _state(rig, client, contact_id, "delivered",
                                        workspace="globex", at_least=2))
        await rig.command("crm.handoff_requested.v1", workspace="globex",
                          contact_id=contact_id, reason="became MQL")
        await eventually(lambda: _state(rig, client, contact_id, "delivered",
                                        workspace="globex", at_least=3))
        await rig.publish("contact-changes", "contact.erased.v1", workspace="globex", data={
            "contact_id": contact_id, "merged_ids": [], "identifier_digests": [],
            "requested_by": "api"})
        log = await eventually(lambda: _state(rig, client, contact_id, "delivered",
                                              workspace="globex", at_least=4))
    kinds = [d["kind"] for d in log]  # two topics: the first two in either order
    assert (sorted(kinds[:2]), kinds[2:]) == (["activity", "lifecycle"], ["handoff", "erasure"])
    assert rig.salesforce.problems == []
    assert len(rig.salesforce.tokens) >= 2  # fetched again after the 401
    lead = rig.salesforce.leads[contact_id]
    assert {k: lead.get(k) for k in ("Email", "FirstName", "LastName", "Company", "Status",
                                     "Leadwerk_Stage__c", "Leadwerk_Rating__c")} == {
        "Email": "d@globex.example", "FirstName": "Dana", "LastName": "[not provided]",
        "Company": "Globex", "Status": "Open - Not Contacted", "Leadwerk_Stage__c": "mql",
        "Leadwerk_Rating__c": "A2"}
    tasks = [t for t in rig.salesforce.tasks if t["WhoId"] == lead["Id"]]
    assert [t["Subject"] for t in tasks] == ["downloaded pricing.pdf",
                                             "Leadwerk hand-off: became MQL"]
    assert "Recent activity: downloaded pricing.pdf" in tasks[1]["Description"]
    assert rig.salesforce.deleted == [contact_id]


async def test_a_malformed_contact_event_is_dead_lettered_and_the_rest_goes_on(
        rig: Rig) -> None:
    broken = await rig.publish("contact-events", "contact.merged.v1", {
        "survivor_id": str(uuid.uuid4()), "merged_id": "not-a-contact", "reason": "device",
        "actor": "stitcher"})
    email = f"erik.{uuid.uuid4().hex[:8]}@schmidt.example"
    await _known_contact(rig, email)  # the consumer went on
    dead = [e for e in values(await read_topic(
        rig.settings.kafka_bootstrap_servers, rig.settings.topic("contact-events-dlq"), 1,
        timeout=10)) if e["id"] == broken.id]
    assert len(dead) == 1


async def test_the_summary_reaches_back_90_days_and_older_activities_are_pruned(
        rig: Rig) -> None:
    contact_id, now = str(uuid.uuid4()), datetime.now(UTC)
    connection = await asyncpg.connect(rig.settings.database_url.get_secret_value()
                                       if rig.settings.database_url else "",
                                       server_settings={"search_path": "crm_bridge"})
    try:
        await connection.executemany(
            "INSERT INTO recent_activities (workspace, contact_id, event_id, occurred_at, "
            "label) VALUES ('dev', $1, $2, $3, $4)",
            [(contact_id, uuid.uuid4(), now - timedelta(days=days), label)
             for days, label in ((1, "watched the demo video"), (100, "read an old post"))])
        _, summary = await recent_summary(connection, "dev", contact_id, now)
        assert summary == "watched the demo video"
        assert await forget_old_activities(connection, now) >= 1
        left = await connection.fetchval(
            "SELECT count(*) FROM recent_activities WHERE contact_id = $1", contact_id)
    finally:
        await connection.close()
    assert left == 1
