"""The mailer over real parts: email commands from the embedded broker, Postgres, a real SMTP
server (aiosmtpd) as the sink, and ingest serving the links in the mails."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from functools import partial
from typing import Any

import dkim
import httpx
import pytest
from aiokafka import AIOKafkaProducer
from aiosmtpd.controller import Controller
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from leadwerk_ingest.api import create_app as create_ingest
from leadwerk_ingest.settings import IngestSettings
from leadwerk_mailer.api import Mailer, create_app
from leadwerk_mailer.consumers import ConsentHandler
from leadwerk_mailer.settings import MailerSettings
from leadwerk_mailer.transport import Outcome
from leadwerk_platform.embedded import free_port
from leadwerk_platform.envelope import Envelope, encode
from leadwerk_platform.kafka.consumer import ConsumedMessage
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


class Sink:
    """An SMTP server that keeps what it accepts. Recipients with "bounce" in the address
    are refused permanently (550 5.1.1), those with "grey" once temporarily (451 4.7.1)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], EmailMessage]] = []
        self.raw: list[bytes] = []
        self._greylisted: set[str] = set()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any,  # noqa: N802
                          address: str, options: Any) -> str:
        del server, session, options
        if "bounce" in address:
            return "550 5.1.1 <" + address + ">: Recipient address rejected: User unknown"
        if "grey" in address and address not in self._greylisted:
            self._greylisted.add(address)
            return "451 4.7.1 Greylisted, please try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        del server, session
        parsed = email.message_from_bytes(envelope.original_content,
                                          policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.raw.append(envelope.original_content)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), parsed))
        return "250 2.0.0 Ok: queued"

    def to(self, address: str) -> list[EmailMessage]:
        return [m for _, rcpt, m in self.messages if address in rcpt]


@dataclass
class Rig:
    mailer: str
    ingest: str
    service: Mailer
    sink: Sink
    settings: MailerSettings
    dns_record: bytes
    clock_offset: list[timedelta] = field(default_factory=lambda: [timedelta(0)])

    async def command(self, *, to: str, template: str = "welcome", kind: str = "marketing",
                      contact_id: str | None = None, command_id: str | None = None,
                      **data: Any) -> Envelope:
        now = datetime.now(UTC)
        envelope = Envelope(
            id=command_id or str(uuid.uuid4()), type="email.send_requested.v1",
            workspace="dev", occurred_at=now, received_at=now, producer="workflow",
            data={"contact_id": contact_id or str(uuid.uuid4()), "template": template,
                  "class": kind, "to": to, "sender": {"kind": "default"},
                  "personalization": {"first_name": "Anna"},
                  "origin": {"journey_id": "test"}, **data})
        await self.publish("email-commands", envelope)
        return envelope

    async def publish(self, topic: str, envelope: Envelope) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap_servers)
        await producer.start()
        try:
            await producer.send_and_wait(self.settings.topic(topic), encode(envelope),
                                         key=f"dev:{envelope.data['contact_id']}".encode())
        finally:
            await producer.stop()

    async def consent(self, client: httpx.AsyncClient, contact_id: str) -> None:
        answer = await client.post(f"{self.mailer}/api/contacts/{contact_id}/consents",
                                   headers=ADMIN, json={"action": "granted", "source": "crm"})
        assert answer.status_code == 201, answer.text

    async def state(self, client: httpx.AsyncClient, contact_id: str,
                    wanted: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
        async def probe() -> list[dict[str, Any]] | None:
            items: list[dict[str, Any]] = (await client.get(
                f"{self.mailer}/api/contacts/{contact_id}/messages", headers=ADMIN)
            ).json()["items"]
            return items if wanted(items) else None

        result: list[dict[str, Any]] = await eventually(probe)
        return result

    async def events(self, count: int) -> list[dict[str, Any]]:
        return values(await read_topic(self.settings.kafka_bootstrap_servers,
                                       self.settings.topic("email-events"), count, timeout=15))



def dkim_keypair() -> tuple[str, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


@pytest.fixture(scope="module")
async def rig(infrastructure: Infrastructure,
              contract_registry: ContractRegistry) -> AsyncIterator[Rig]:
    sink = Sink()
    controller = Controller(sink, hostname="127.0.0.1", port=free_port())
    controller.start()
    private, record = dkim_keypair()
    database = await create_database(infrastructure.database_url, "mail")
    await migrate(database, "mailer")
    ingest_port = free_port()
    env = {
        "LEADWERK_ENV": "test", "KAFKA_BOOTSTRAP_SERVERS": infrastructure.kafka,
        "LEADWERK_KAFKA_IDEMPOTENCE": str(infrastructure.idempotence).lower(),
        "LEADWERK_KAFKA_SESSION_TIMEOUT_MS": "2000" if not infrastructure.idempotence
        else "10000",
        "LEADWERK_KAFKA_TOPIC_PREFIX": f"m{uuid.uuid4().hex[:10]}.",
        "DATABASE_URL": database, "LEADWERK_CONFIG_DIR": str(repository_root() / "config"),
        "LEADWERK_SMTP_URL": f"smtp://127.0.0.1:{controller.port}",
        "LEADWERK_INGEST_PUBLIC_URL": f"http://127.0.0.1:{ingest_port}",
        "LEADWERK_INGEST_PORT": str(ingest_port),
        "LEADWERK_DKIM_DOMAIN": "leadwerk.test", "LEADWERK_DKIM_SELECTOR": "lw1",
        "LEADWERK_DKIM_PRIVATE_KEY": private,
        "LEADWERK_MAILER_RETRY_BASE_SECONDS": "0.3",
        # No consent on record: suppressed at once (the tests of the grace period set it).
        "LEADWERK_MAILER_CONSENT_GRACE_SECONDS": "0",
    }
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            settings = MailerSettings()
            await provision_topics(settings, contract_registry, replication_factor=1)
            offset = [timedelta(0)]
            app = create_app(settings, clock=lambda: datetime.now(UTC) + offset[0])
            ingest = create_ingest(IngestSettings())
            async with serve_app(app) as mailer_url, serve_app(ingest, port=ingest_port) \
                    as ingest_url:
                yield Rig(mailer_url, ingest_url, app.state.mailer, sink, settings, record,
                          offset)
    finally:
        controller.stop()


async def test_a_marketing_mail_is_personalised_tracked_signed_and_sent_once(rig: Rig) -> None:
    contact_id, address = str(uuid.uuid4()), f"anna.{uuid.uuid4().hex[:6]}@example.de"
    async with httpx.AsyncClient(timeout=10) as client:
        await rig.consent(client, contact_id)
        command = await rig.command(to=address, contact_id=contact_id,
                                    sender={"kind": "owner"},
                                    personalization={"first_name": "Anna", "grade": "A",
                                                     "owner": "jonas.weber@example.de"})
        await rig.publish("email-commands", command)  # redelivered: still one mail
        [log] = await rig.state(client, contact_id, lambda i: bool(i) and i[0]["state"] == "sent")
        assert log["command_id"] == command.id
        await asyncio.sleep(0.5)
        [mail] = rig.sink.to(address)
        assert mail["From"] == "jonas.weber@example.de"  # the owner sends (seed documents)
        assert mail["Subject"] == "Willkommen, Anna!"
        assert mail["Message-ID"] == f"<{command.id}@leadwerk.localhost>"
        unsubscribe = mail["List-Unsubscribe"].strip("<>")
        assert unsubscribe.startswith(f"{rig.ingest}/t/u/")
        assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        raw = next(r for r in rig.sink.raw if command.id.encode() in r)
        assert dkim.verify(raw, dnsfunc=lambda name, timeout=5: rig.dns_record)
        html_part = mail.get_body(("html",))
        assert html_part is not None
        html = html_part.get_content()
        assert "persönliche Demo" in html  # the grade-A block
        assert "https://www.example.com/ebook" not in html  # every link goes through ingest
        assert f"{rig.ingest}/t/c/" in html
        assert f'src="{rig.ingest}/t/o/' in html
        assert unsubscribe in html  # the visible link, not tracked
        text_part = mail.get_body(("plain",))
        assert text_part is not None
        assert "Hallo Anna" in text_part.get_content()
        # A click redirects through ingest to the target and records the click.
        tracked = html.split(f'href="{rig.ingest}/t/c/')[1].split('"')[0]
        click = await client.get(f"{rig.ingest}/t/c/{tracked}")
        assert click.status_code == 302
        assert click.headers["location"] == "https://www.example.com/ebook"
        clicks = [e for e in values(await read_topic(
            rig.settings.kafka_bootstrap_servers, rig.settings.topic("tracking-events"), 1,
            timeout=10)) if e["type"] == "tracking.email_clicked.v1"]
        assert clicks[0]["data"]["contact_id"] == contact_id
        assert clicks[0]["data"]["email_message_id"] == command.id
        # The one-click unsubscribe of RFC 8058 is a POST to the header's URL.
        one_click = await client.post(unsubscribe, content=b"List-Unsubscribe=One-Click",
                                      headers={"Content-Type":
                                               "application/x-www-form-urlencoded"})
        assert one_click.status_code == 200
    sent = [e for e in await rig.events(1) if e["data"]["command_id"] == command.id]
    assert [e["type"] for e in sent] == ["email.sent.v1"]
    assert "Ok: queued" in sent[0]["data"]["smtp_response"]


async def test_no_consent_no_marketing_mail_but_transactional_goes(rig: Rig) -> None:
    contact_id, address = str(uuid.uuid4()), f"nobody.{uuid.uuid4().hex[:6]}@example.de"
    async with httpx.AsyncClient(timeout=10) as client:
        marketing = await rig.command(to=address, contact_id=contact_id)
        await rig.command(to=address, contact_id=contact_id, kind="transactional",
                          template="optin-confirmation",
                          personalization={"confirm_url": "https://x.example/c"})
        items = await rig.state(client, contact_id, lambda i: len(i) == 2 and all(
            m["state"] in {"sent", "suppressed"} for m in i))
    states = {m["command_id"]: (m["state"], m["reason"]) for m in items}
    assert states[marketing.id] == ("suppressed", "no_consent")
    assert [m["Subject"] for m in rig.sink.to(address)] == [
        "Bitte bestätigen Sie Ihre Anmeldung"]
    [first] = rig.sink.to(address)
    assert first["List-Unsubscribe"] is None  # transactional mail has no unsubscribe


async def test_a_5xx_bounces_and_suppresses_a_4xx_is_retried(rig: Rig) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        bounced_contact, grey_contact = str(uuid.uuid4()), str(uuid.uuid4())
        bounce = f"bounce.{uuid.uuid4().hex[:6]}@example.de"
        grey = f"grey.{uuid.uuid4().hex[:6]}@example.de"
        for contact_id in (bounced_contact, grey_contact):
            await rig.consent(client, contact_id)
        await rig.command(to=bounce, contact_id=bounced_contact)
        [log] = await rig.state(client, bounced_contact,
                                lambda i: bool(i) and i[0]["state"] == "bounced")
        assert (log["smtp_code"], log["status"]) == (550, "5.1.1")
        suppressed = (await client.get(f"{rig.mailer}/api/suppressions", headers=ADMIN)
                      ).json()["items"]
        assert {"address": bounce, "reason": "hard_bounce"}.items() <= next(
            s for s in suppressed if s["address"] == bounce).items()
        again = await rig.command(to=bounce, contact_id=bounced_contact)
        items = await rig.state(client, bounced_contact, lambda i: len(i) == 2 and i[1][
            "state"] == "suppressed")
        assert (items[1]["command_id"], items[1]["reason"]) == (again.id, "hard_bounce"), items
        # Greylisted: deferred, then sent by the retry worker after the back-off.
        await rig.command(to=grey, contact_id=grey_contact)
        [log] = await rig.state(client, grey_contact,
                                lambda i: bool(i) and i[0]["state"] == "sent")
        assert log["attempts"] == 2
    assert len(rig.sink.to(grey)) == 1
    types = [e["type"] for e in await rig.events(4)
             if e["data"]["contact_id"] in {bounced_contact, grey_contact}]
    assert types.count("email.bounced.v1") == 1
    assert types.count("email.deferred.v1") == 1
    assert "email.sent.v1" in types


async def test_double_opt_in_holds_marketing_until_confirmed(rig: Rig) -> None:
    """Consent from a form (as scoring publishes it on contact-events): the confirmation mail
    goes out at once, marketing waits until the confirmation arrives, then it is sent."""
    contact_id, address = str(uuid.uuid4()), f"doi.{uuid.uuid4().hex[:6]}@example.de"

    def activity(kind: str, properties: dict[str, Any]) -> Envelope:
        return consent_activity(contact_id, kind, properties).envelope

    async with httpx.AsyncClient(timeout=10) as client:
        await rig.publish("contact-events", activity("form_submitted", {
            "form_id": "ebook-download", "email": address, "traits.first_name": "Dora",
            "consents": [{"purpose": "marketing", "given": True,
                          "text_version": "2026-11-de-1", "double_opt_in": True}]}))
        await eventually(lambda: asyncio.sleep(0, rig.sink.to(address)))
        [confirmation] = rig.sink.to(address)
        assert confirmation["Subject"] == "Bitte bestätigen Sie Ihre Anmeldung"
        assert "Hallo Dora" in str(confirmation.get_body(("plain",)))
        body = confirmation.get_body(("html",))
        assert body is not None
        confirm_url = body.get_content().split(f'href="{rig.ingest}/t/confirm/')[1].split('"')[0]
        welcome = await rig.command(to=address, contact_id=contact_id)
        await rig.state(client, contact_id, lambda i: any(
            m["command_id"] == welcome.id and m["state"] == "held" for m in i))
        consents = (await client.get(f"{rig.mailer}/api/contacts/{contact_id}/consents",
                                     headers=ADMIN)).json()
        assert consents["state"] == {"marketing": "pending"}
        assert consents["log"][0]["source"] == "form:ebook-download"
        assert consents["log"][0]["text_version"] == "2026-11-de-1"
        # The link works through ingest (a POST: link scanners only GET) …
        confirmed = await client.post(f"{rig.ingest}/t/confirm/{confirm_url}")
        assert confirmed.status_code in {200, 303}
        # … and scoring turns it into this activity:
        await rig.publish("contact-events", activity("optin_confirmed", {
            "purpose": "marketing", "consent_text_version": "2026-11-de-1"}))
        await rig.state(client, contact_id, lambda i: any(
            m["command_id"] == welcome.id and m["state"] == "sent" for m in i))
    assert [m["Subject"] for m in rig.sink.to(address)] == [
        "Bitte bestätigen Sie Ihre Anmeldung", "Willkommen, Anna!"]


def consent_activity(contact_id: str, kind: str, properties: dict[str, Any]) -> ConsumedMessage:
    """A contact activity as the consent consumer receives it from contact-events."""
    now = datetime.now(UTC)
    envelope = Envelope(id=str(uuid.uuid4()), type="contact.activity.v1", workspace="dev",
                        occurred_at=now, received_at=now, producer="scoring",
                        data={"contact_id": contact_id, "known": True, "kind": kind,
                              "name": None, "session": None, "properties": properties})
    return ConsumedMessage("contact-events", 0, 0, None, encode(envelope), [], envelope)


async def test_a_confirmation_during_the_consent_check_still_releases_the_mail(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The double opt-in is confirmed after the command's claim read "pending" but before
    that claim recorded the mail as held: the consent consumer finds nothing held to
    release, so the run that holds it must see the confirmation itself."""
    contact_id, address = str(uuid.uuid4()), f"race.{uuid.uuid4().hex[:6]}@example.de"
    service = rig.service
    assert service.deps is not None
    assert service.delivery is not None
    consent = ConsentHandler(service.deps, service.delivery)
    await consent(consent_activity(contact_id, "form_submitted", {
        "form_id": "ebook-download", "email": address,
        "consents": [{"purpose": "marketing", "given": True, "double_opt_in": True}]}))
    record = service.delivery._record
    confirmed: list[str] = []

    async def confirmed_meanwhile(connection: Any, claim: Any, records: Any,
                                  launch: Any) -> Any:
        if not confirmed and any(f.state == "held" for _, f in records):
            confirmed.append("now")
            await consent(consent_activity(contact_id, "optin_confirmed",
                                           {"purpose": "marketing"}))
        return await record(connection, claim, records, launch)

    monkeypatch.setattr(service.delivery, "_record", confirmed_meanwhile)
    welcome = await rig.command(to=address, contact_id=contact_id)
    async with httpx.AsyncClient(timeout=10) as client:
        items = await rig.state(client, contact_id, lambda i: any(
            m["command_id"] == welcome.id and m["state"] in {"sent", "suppressed"} for m in i))
    assert confirmed == ["now"]
    assert [(m["state"], m["reason"]) for m in items if m["command_id"] == welcome.id] == [
        ("sent", None)]
    assert [m["Subject"] for m in rig.sink.to(address)] == [
        "Bitte bestätigen Sie Ihre Anmeldung", "Willkommen, Anna!"]


async def test_a_journey_mail_that_overtakes_the_consent_waits_for_it(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The form that gives consent also starts the welcome journey; its mail can reach the
    mailer before the consent does. It waits (grace period) instead of being suppressed,
    then for the double opt-in, and goes once that is confirmed."""
    contact_id, address = str(uuid.uuid4()), f"early.{uuid.uuid4().hex[:6]}@example.de"
    service = rig.service
    assert service.deps is not None
    assert service.delivery is not None
    monkeypatch.setattr(service.delivery, "_grace", timedelta(minutes=5))
    consent = ConsentHandler(service.deps, service.delivery)
    async with httpx.AsyncClient(timeout=10) as client:
        welcome = await rig.command(to=address, contact_id=contact_id)
        [held] = await rig.state(client, contact_id, lambda i: bool(i) and i[0]["state"] == "held")
        assert held["reason"] == "consent_unknown"
        await consent(consent_activity(contact_id, "form_submitted", {
            "form_id": "ebook-download", "email": address,
            "consents": [{"purpose": "marketing", "given": True}]}))
        items = await rig.state(client, contact_id, lambda i: any(
            m["command_id"] == welcome.id and m["reason"] == "consent_pending" for m in i))
        assert [m["state"] for m in items if m["command_id"] == welcome.id] == ["held"]
        await consent(consent_activity(contact_id, "optin_confirmed", {"purpose": "marketing"}))
        await rig.state(client, contact_id, lambda i: any(
            m["command_id"] == welcome.id and m["state"] == "sent" for m in i))
    assert [m["Subject"] for m in rig.sink.to(address)] == [
        "Bitte bestätigen Sie Ihre Anmeldung", "Willkommen, Anna!"]


async def test_with_no_consent_by_the_end_of_the_grace_period_the_mail_is_suppressed(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    contact_id, address = str(uuid.uuid4()), f"never.{uuid.uuid4().hex[:6]}@example.de"
    assert rig.service.delivery is not None
    monkeypatch.setattr(rig.service.delivery, "_grace", timedelta(seconds=1))
    async with httpx.AsyncClient(timeout=10) as client:
        await rig.command(to=address, contact_id=contact_id)
        await rig.state(client, contact_id, lambda i: bool(i) and i[0]["state"] == "held")
        [log] = await rig.state(client, contact_id,
                                lambda i: bool(i) and i[0]["state"] == "suppressed")
    assert log["reason"] == "no_consent"
    assert rig.sink.to(address) == []


async def test_consent_granted_by_the_crm_releases_held_mail(rig: Rig) -> None:
    contact_id, address = str(uuid.uuid4()), f"crm.{uuid.uuid4().hex[:6]}@example.de"
    service = rig.service
    assert service.deps is not None
    assert service.delivery is not None
    await ConsentHandler(service.deps, service.delivery)(consent_activity(
        contact_id, "form_submitted", {"form_id": "ebook-download", "email": address,
                                       "consents": [{"purpose": "marketing", "given": True}]}))
    async with httpx.AsyncClient(timeout=10) as client:
        welcome = await rig.command(to=address, contact_id=contact_id)
        await rig.state(client, contact_id, lambda i: any(
            m["command_id"] == welcome.id and m["state"] == "held" for m in i))
        await rig.consent(client, contact_id)  # confirmed by phone, recorded from the CRM
        await rig.state(client, contact_id, lambda i: any(
            m["command_id"] == welcome.id and m["state"] == "sent" for m in i))
    assert [m["Subject"] for m in rig.sink.to(address)] == [
        "Bitte bestätigen Sie Ihre Anmeldung", "Willkommen, Anna!"]


async def test_an_unsubscribe_stops_marketing_mail(rig: Rig) -> None:
    contact_id, address = str(uuid.uuid4()), f"bye.{uuid.uuid4().hex[:6]}@example.de"
    now = datetime.now(UTC)
    async with httpx.AsyncClient(timeout=10) as client:
        await rig.consent(client, contact_id)
        first = await rig.command(to=address, contact_id=contact_id)
        await rig.state(client, contact_id, lambda i: bool(i) and i[0]["state"] == "sent")
        await rig.publish("contact-events", Envelope(
            id=str(uuid.uuid4()), type="contact.activity.v1", workspace="dev",
            occurred_at=now, received_at=now, producer="scoring",
            data={"contact_id": contact_id, "known": True, "kind": "unsubscribed",
                  "name": None, "session": None,
                  "properties": {"purpose": "marketing", "method": "one-click",
                                 "email_message_id": first.id}}))

        async def withdrawn() -> bool:
            body = (await client.get(f"{rig.mailer}/api/contacts/{contact_id}/consents",
                                     headers=ADMIN)).json()
            return bool(body["state"].get("marketing") == "withdrawn")

        await eventually(withdrawn)
        second = await rig.command(to=address, contact_id=contact_id)
        items = await rig.state(client, contact_id, lambda i: len(i) == 2 and i[1][
            "state"] == "suppressed")
    assert (items[1]["command_id"], items[1]["reason"]) == (second.id, "unsubscribed")
    assert len(rig.sink.to(address)) == 1


async def test_a_dsn_after_sending_bounces_the_mail_and_a_complaint_suppresses(
        rig: Rig) -> None:
    contact_id, address = str(uuid.uuid4()), f"late.{uuid.uuid4().hex[:6]}@example.de"
    async with httpx.AsyncClient(timeout=10) as client:
        await rig.consent(client, contact_id)
        command = await rig.command(to=address, contact_id=contact_id)
        await rig.state(client, contact_id, lambda i: bool(i) and i[0]["state"] == "sent")
        [mail] = rig.sink.to(address)
        assert mail["From"] == "Leadwerk Demo <hallo@example.com>"  # the workspace's sender
        report = (
            "From: MAILER-DAEMON@relay.example\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
            "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
            "Reporting-MTA: dns; relay.example\r\n\r\n"
            f"Final-Recipient: rfc822; {address}\r\nAction: failed\r\nStatus: 5.2.1\r\n"
            "Diagnostic-Code: smtp; 550 5.2.1 mailbox disabled\r\n\r\n"
            f"--B\r\nContent-Type: text/rfc822-headers\r\n\r\nMessage-ID: {mail['Message-ID']}"
            "\r\n--B--\r\n").encode()
        assert (await client.post(f"{rig.mailer}/api/bounces", content=report)
                ).status_code == 401
        answer = await client.post(f"{rig.mailer}/api/bounces", content=report, headers={
            **ADMIN, "Content-Type": "multipart/report"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["items"] == [{"recipient": address, "action": "failed",
                                           "suppressed": True, "command_id": command.id}]
        [log] = await rig.state(client, contact_id,
                                lambda i: bool(i) and i[0]["state"] == "bounced")
        assert log["status"] == "5.2.1"
        again = await rig.command(to=address, contact_id=contact_id)
        items = await rig.state(client, contact_id, lambda i: len(i) == 2 and i[1][
            "state"] not in {"received", "claimed"})  # decided, not just recorded
        assert (items[1]["command_id"], items[1]["reason"]) == (again.id, "hard_bounce")
        # A provider's complaint webhook.
        other = f"spam.{uuid.uuid4().hex[:6]}@example.de"
        complaint = await client.post(f"{rig.mailer}/api/bounces", headers=ADMIN, json={
            "events": [{"type": "complaint", "recipient": other}]})
        assert complaint.json()["items"][0]["suppressed"] is True
        listed = (await client.get(f"{rig.mailer}/api/suppressions", headers=ADMIN)).json()
        assert {"address": other, "reason": "complaint"}.items() <= next(
            s for s in listed["items"] if s["address"] == other).items()
        garbage = await client.post(f"{rig.mailer}/api/bounces", headers=ADMIN,
                                    content=b"hello")
        assert garbage.status_code == 422
    bounced = [e for e in await rig.events(1) if e["type"] == "email.bounced.v1"
               and e["data"]["command_id"] == command.id]
    assert bounced[0]["data"]["hard"] is True


async def test_a_burst_is_sent_once_each_with_refusals_and_template_bugs_recorded(
        rig: Rig) -> None:
    """Commands fetched together go through one delivery run: consent checked per command,
    a broken template fails its own command only, every other one is sent exactly once."""
    now = datetime.now(UTC)
    commands = []
    async with httpx.AsyncClient(timeout=10) as client:
        for n in range(24):
            contact_id = str(uuid.uuid4())
            if n % 8 != 1:  # every eighth contact (n = 1, 9, 17) never consented
                await rig.consent(client, contact_id)
            commands.append(Envelope(
                id=str(uuid.uuid4()), type="email.send_requested.v1", workspace="dev",
                occurred_at=now, received_at=now, producer="workflow",
                data={"contact_id": contact_id,
                      "template": "no-such-template" if n % 8 == 2 else "welcome",
                      "class": "marketing", "to": f"burst.{n}.{uuid.uuid4().hex[:6]}@example.de",
                      "sender": {"kind": "default"}, "personalization": {"first_name": f"B{n}"},
                      "origin": {"journey_id": "burst"}}))
        producer = AIOKafkaProducer(bootstrap_servers=rig.settings.kafka_bootstrap_servers)
        await producer.start()
        try:
            for command in [*commands, commands[0], commands[5]]:  # two redelivered
                await producer.send(rig.settings.topic("email-commands"), encode(command),
                                    key=f"dev:{command.data['contact_id']}".encode())
            await producer.flush()
        finally:
            await producer.stop()

        async def final(command: Envelope) -> dict[str, Any] | None:
            items = (await client.get(
                f"{rig.mailer}/api/contacts/{command.data['contact_id']}/messages",
                headers=ADMIN)).json()["items"]
            done = [i for i in items if i["state"] in {"sent", "failed", "suppressed"}]
            return done[0] if done else None

        logs: list[dict[str, Any]] = [await eventually(partial(final, c)) for c in commands]
    states = {(n % 8, log["state"]) for n, log in enumerate(logs)}
    assert states == {(n, "sent") for n in range(8) if n not in {1, 2}} | {
        (1, "suppressed"), (2, "failed")}
    assert {log["reason"] for n, log in enumerate(logs) if n % 8 == 1} == {"no_consent"}
    assert all(log["reason"].startswith("template no-such-template: ")
               for n, log in enumerate(logs) if n % 8 == 2)
    await asyncio.sleep(0.5)
    for n, command in enumerate(commands):
        assert len(rig.sink.to(command.data["to"])) == (0 if n % 8 in {1, 2} else 1)
    # One event per command, saying what its message log says.
    ours = {c.id: (c, log) for c, log in zip(commands, logs, strict=True)}
    events = [e for e in await rig.events(len(commands)) if e["data"]["command_id"] in ours]
    assert sorted(e["data"]["command_id"] for e in events) == sorted(ours)
    for event in events:
        command, log = ours[event["data"]["command_id"]]
        assert event["type"] == f"email.{log['state']}.v1"
        assert {k: event["data"][k] for k in ("contact_id", "template", "class", "to",
                                               "message_id", "origin", "reason")} == {
            "contact_id": command.data["contact_id"], "template": log["template_id"],
            "class": log["class"], "to": log["to_address"], "message_id": log["message_id"],
            "origin": log["origin"], "reason": log["reason"]}


class HeldRelay:
    """A relay that keeps each message until released, then accepts it."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def send(self, sender: str, recipient: str, raw: bytes) -> Outcome:
        del sender, recipient, raw
        self.arrived.set()
        await self.release.wait()
        return Outcome("sent", 250, "2.0.0", "250 2.0.0 Ok: held")


async def test_events_name_the_contact_the_message_belongs_to_when_it_is_recorded(
        rig: Rig) -> None:
    """A contact merged while its mail is in the SMTP transaction: the sent event names the
    survivor, as the message log does (the run's own copy of the facts is not trusted)."""
    merged, survivor = str(uuid.uuid4()), str(uuid.uuid4())
    address = f"merge.{uuid.uuid4().hex[:6]}@example.de"
    relays = dict(rig.service.deps.relays) if rig.service.deps else {}
    held = HeldRelay()
    assert rig.service.deps is not None
    rig.service.deps.relays.update({"marketing": held, "transactional": held})  # type: ignore[dict-item]
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            await rig.consent(client, merged)
            command = await rig.command(to=address, contact_id=merged)
            await asyncio.wait_for(held.arrived.wait(), 20)
            now = datetime.now(UTC)
            await rig.publish("contact-events", Envelope(
                id=str(uuid.uuid4()), type="contact.merged.v1", workspace="dev",
                occurred_at=now, received_at=now, producer="scoring",
                data={"contact_id": survivor, "merged_id": merged, "survivor_id": survivor}))
            await rig.state(client, survivor, bool)  # the log moved over
            held.release.set()
            [log] = await rig.state(client, survivor,
                                    lambda i: bool(i) and i[0]["state"] == "sent")
    finally:
        rig.service.deps.relays.update(relays)
    assert log["command_id"] == command.id
    sent = [e for e in await rig.events(1) if e["data"]["command_id"] == command.id
            and e["type"] == "email.sent.v1"]
    assert [e["data"]["contact_id"] for e in sent] == [survivor]
    assert sent[0]["data"]["message_id"] == log["message_id"]
    assert sent[0]["data"]["origin"] == {"journey_id": "test"}
