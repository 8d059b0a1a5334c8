"""The seed documents' main story, walked through Leadwerk's public interfaces only.

A visitor reads the blog, downloads the e-book through a form with consent, confirms the double
opt-in mail, gets the welcome mail from the rep assigned to them, comes back, downloads the
pricing sheet and watches the demo video, becomes an MQL; the owner is notified and sales gets
the hand-off on a signed webhook, accepts the lead and later wins the deal. Each step waits for
its effect (mail in the SMTP sink, a contact in the contacts API, a webhook at the receiver) and
raises :class:`StoryError` with what it last saw when the effect does not come.

``make demo`` narrates it against ``make run``; the end-to-end test walks it against the
services started as separate processes.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from leadwerk_platform.testing.helpers import serve_app

T = TypeVar("T")

#: Ingest leaves crawlers (curl's and httpx's user agents among them) out of scoring.
BROWSER = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
           "Chrome/130.0 Safari/537.36")


class StoryError(AssertionError):
    """A step's effect did not arrive in time."""


@dataclass(frozen=True)
class Platform:
    """Where the running platform is, and the development credentials it runs with."""

    ingest: str
    scoring: str
    workflow: str
    mailer: str
    bridge: str
    mail_folder: Path
    admin_token: str
    write_key: str
    #: signs what the bridge sends (the receiver checks it) and what the CRM sends back
    outbound_secret: str
    inbound_secret: str
    receiver_port: int = 9099
    timeout: float = 60.0

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}


@dataclass
class Receiver:
    """The CRM's end of the hand-off webhook: verifies every delivery's signature."""

    secret: str
    received: list[dict[str, Any]] = field(default_factory=list)
    rejected: int = 0

    async def endpoint(self, request: Request) -> JSONResponse:
        body = (await request.body()).decode()
        try:
            payload = Webhook(self.secret).verify(body, dict(request.headers))
        except Exception:  # noqa: BLE001 - any verification failure is a refusal
            self.rejected += 1
            return JSONResponse({"error": "bad signature"}, status_code=401)
        self.received.append(payload)
        return JSONResponse({"ok": True})


Narrate = Callable[[str], None]


@dataclass
class Story:
    platform: Platform
    say: Narrate
    receiver: Receiver
    client: httpx.AsyncClient
    device: str = field(default_factory=lambda: str(uuid.uuid4()))
    address: str = field(default_factory=lambda: f"anna.{uuid.uuid4().hex[:6]}@example.de")
    contact_id: str = ""
    #: who signed the welcome mail (the rep assigned at registration), and the owner at MQL
    welcome_sender: str = ""
    owner: str = ""
    #: the contact before she came back, and as an MQL
    before: dict[str, Any] = field(default_factory=dict)
    mql: dict[str, Any] = field(default_factory=dict)

    # -- the platform's public interfaces -------------------------------------------------

    async def track(self, kind: str, body: dict[str, Any]) -> None:
        response = await self.client.post(
            f"{self.platform.ingest}/v1/{kind}", auth=(self.platform.write_key, ""),
            json={"anonymousId": self.device, **body})
        if response.status_code != 200:
            raise StoryError(f"ingest refused a {kind}: {response.status_code} {response.text}")

    async def contact(self) -> dict[str, Any]:
        response = await self.client.get(f"{self.platform.scoring}/api/contacts/"
                                         f"{self.contact_id}", headers=self.platform.admin)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    async def timeline(self) -> list[dict[str, Any]]:
        response = await self.client.get(
            f"{self.platform.scoring}/api/contacts/{self.contact_id}/timeline",
            params={"limit": 200}, headers=self.platform.admin)
        response.raise_for_status()
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    def mails(self, to: str) -> list[EmailMessage]:
        """What the SMTP sink (``make run``'s mail catcher) kept for ``to``, oldest first."""
        found = []
        for path in sorted(self.platform.mail_folder.glob("*.eml")):
            message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            if isinstance(message, EmailMessage) and to in str(message["To"]):
                found.append(message)
        return found

    async def mail(self, to: str, subject: str, about: str = "") -> EmailMessage:
        """The first mail to ``to`` whose subject contains ``subject`` (and whose text
        mentions ``about``), once it is there."""

        def matches(message: EmailMessage) -> bool:
            if subject not in str(message["Subject"]):
                return False
            text = message.get_body(("plain", "html"))
            return not about or (text is not None and about in text.get_content())

        async def arrived() -> EmailMessage | None:
            return next((m for m in self.mails(to) if matches(m)), None)

        try:
            return await self.until(arrived, f"a mail to {to} about {subject!r}",
                                    lambda: [str(m["Subject"]) for m in self.mails(to)])
        except StoryError as error:
            raise StoryError(f"{error}; the mailer's log for the contact: "
                             f"{await self.message_log()}") from None

    async def message_log(self) -> list[tuple[str, str, str | None]] | str:
        """The mailer's message log for the contact: template, state and reason."""
        if not self.contact_id:
            return "no contact yet"
        response = await self.client.get(
            f"{self.platform.mailer}/api/contacts/{self.contact_id}/messages",
            headers=self.platform.admin)
        if response.status_code != 200:
            return f"not readable ({response.status_code})"
        return [(str(m.get("template_id")), str(m.get("state")), m.get("reason"))
                for m in response.json()["items"]]

    async def until(self, probe: Callable[[], Awaitable[T | None]], what: str,
                    last: Callable[[], Any] | None = None) -> T:
        deadline = time.monotonic() + self.platform.timeout
        while True:
            result = await probe()
            if result:
                return result
            if time.monotonic() > deadline:
                seen = last() if last is not None else result
                raise StoryError(f"{what}: not within {self.platform.timeout:.0f}s "
                                 f"(last seen: {seen!r})")
            await asyncio.sleep(0.25)

    async def contact_where(self, what: str,
                            condition: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        seen: list[dict[str, Any]] = []

        async def reached() -> dict[str, Any] | None:
            contact = await self.contact()
            seen[:] = [contact]
            return contact if condition(contact) else None

        return await self.until(reached, what, lambda: {
            k: seen[0].get(k) for k in ("stage", "score", "rating", "owner")} if seen else None)

    async def crm_says(self, kind: str, data: dict[str, Any]) -> None:
        """The CRM calls Leadwerk's signed inbound webhook (Standard Webhooks)."""
        body, headers = signed_crm_event(self.platform.inbound_secret, kind, data)
        response = await self.client.post(f"{self.platform.bridge}/webhooks/dev/generic",
                                          content=body, headers=headers)
        if response.status_code != 200:
            raise StoryError(f"the bridge refused {kind}: {response.status_code} "
                             f"{response.text}")

    # -- the story ---------------------------------------------------------------------------

    async def reads_the_blog(self) -> None:
        for path, title in (("/blog/lead-scoring-basics", "Lead-Scoring: die Grundlagen"),
                            ("/blog/marketing-automation-mittelstand",
                             "Marketing-Automation im Mittelstand")):
            await self.track("page", {"name": title, "properties": {
                "path": path, "url": f"https://www.example.com{path}", "title": title},
                "context": {"campaign": {"source": "newsletter", "medium": "email",
                                         "name": "herbst-2026"},
                            "page": {"referrer": "https://www.google.com/"}}})
        self.say(f"an anonymous visitor (device {self.device[:8]}) reads two blog posts, "
                 "arriving from the autumn newsletter campaign")

    async def downloads_the_ebook(self) -> None:
        response = await self.client.post(
            f"{self.platform.ingest}/f/ebook-download",
            headers={"Cookie": f"lw_aid={self.device}"},
            data={"email": self.address, "first_name": "Anna", "last_name": "Schmidt",
                  "company": "Schmidt Maschinenbau GmbH", "job_title": "Marketing Manager",
                  "consent_marketing": "on"})
        if response.status_code != 303:
            raise StoryError(f"the form was refused: {response.status_code} {response.text}")
        self.say(f"she downloads the e-book through the form as {self.address}, ticking "
                 "the box for marketing email")

        async def known() -> str | None:
            response = await self.client.get(f"{self.platform.scoring}/api/contacts",
                                             params={"email": self.address},
                                             headers=self.platform.admin)
            items = response.json()["items"]
            return str(items[0]["id"]) if items else None

        self.contact_id = await self.until(known, "the contact in the contacts API")
        blog = await self.until(self._blog_in_timeline, "the blog visits in the timeline")
        self.say(f"the stitcher makes her contact {self.contact_id}; her {blog} anonymous "
                 "blog visits are part of her history now")

    async def _blog_in_timeline(self) -> int:
        return sum(1 for e in await self.timeline()
                   if e["type"] == "page" and "/blog/" in str(e["data"]))

    async def confirms_the_double_opt_in(self) -> None:
        confirmation = await self.mail(self.address, "bestätigen")
        link = _link(confirmation, "/t/confirm/")
        self.say(f"double opt-in mail arrives: \"{confirmation['Subject']}\"; no marketing "
                 "mail goes out before she confirms")
        response = await self.client.post(link)
        if response.status_code not in {200, 303}:
            raise StoryError(f"confirmation refused: {response.status_code} {response.text}")
        self.say("she clicks the confirmation link")

    async def gets_the_welcome_mail(self) -> None:
        welcome = await self.mail(self.address, "Willkommen")
        sender = re.search(r"[\w.+-]+@[\w.-]+", str(welcome["From"]))
        self.welcome_sender = sender.group(0) if sender else ""
        self.say(f"the welcome journey's mail arrives: \"{welcome['Subject']}\" from "
                 f"{welcome['From']}, the rep assigned to her at registration")
        click = await self.client.get(_link(welcome, "/t/c/"))
        if click.status_code != 302:
            raise StoryError(f"the tracked link did not redirect: {click.status_code}")
        self.say(f"she clicks a link in it (tracked, redirected to {click.headers['location']})")

    async def comes_back_and_watches_the_demo(self) -> None:
        before = self.before = await self.contact()
        await self.track("page", {"name": "Preise", "properties": {
            "path": "/preise", "url": "https://www.example.com/preise"}})
        for _ in range(2):
            await self.track("track", {"event": "Document Downloaded",
                                       "properties": {"document": "pricing-sheet.pdf"}})
        for title in ("Leadwerk in 5 Minuten", "Kundenstimme: Müller AG"):
            await self.track("track", {"event": "Video Playback Started",
                                       "properties": {"title": title}})
        self.say(f"she comes back (score {before['score']:g}, rating {before['rating']}, "
                 f"stage {before['stage']}): the pricing page, the pricing sheet twice, the "
                 "demo video and a customer story")
        mql = self.mql = await self.contact_where("the contact becoming an MQL",
                                                  lambda c: c["stage"] == "mql")
        self.say(f"score and rating rise to {mql['score']:g} and {mql['rating']}: she is "
                 f"an MQL now, owned by {mql['owner']}")
        self.owner = str(mql["owner"] or "")

    async def sales_is_notified_and_gets_the_handoff(self) -> dict[str, Any]:
        alert = await self.mail(self.owner, "Lead", about=self.address)
        self.say(f"the owner {self.owner} gets \"{alert['Subject']}\"")

        async def handed_off() -> dict[str, Any] | None:
            return next((p for p in self.receiver.received
                         if "handoff" in str(p.get("type"))
                         and p.get("data", {}).get("contact_id") == self.contact_id), None)

        handoff = await self.until(handed_off, "the hand-off at the webhook receiver",
                                   lambda: [p.get("type") for p in self.receiver.received])
        summary = handoff["data"].get("summary") or "no summary"
        self.say(f"the CRM's webhook receives the hand-off, signature valid: \"{summary}\"")
        return handoff

    async def sales_accepts_and_wins(self) -> dict[str, Any]:
        await self.crm_says("lead.accepted", {"contact_id": self.contact_id,
                                              "crm_id": "LEAD-4711"})
        await self.contact_where("the contact accepted by sales (SAL)",
                                 lambda c: c["stage"] == "sal")
        self.say("sales reports \"accepted\" through the signed inbound webhook: stage SAL")
        await self.crm_says("deal.won", {"contact_id": self.contact_id, "crm_id": "DEAL-815",
                                         "value": 24000})
        customer = await self.contact_where("the contact becoming a customer",
                                            lambda c: c["stage"] == "customer")
        self.say("then \"won\" (a 24,000 EUR deal): she is a customer")
        return customer

    async def walk(self) -> dict[str, Any]:
        await self.reads_the_blog()
        await self.downloads_the_ebook()
        await self.confirms_the_double_opt_in()
        await self.gets_the_welcome_mail()
        await self.comes_back_and_watches_the_demo()
        await self.sales_is_notified_and_gets_the_handoff()
        return await self.sales_accepts_and_wins()


def signed_crm_event(secret: str, kind: str, data: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """The body and headers of a CRM event for the bridge's generic inbound webhook, signed
    as Standard Webhooks with ``secret``."""
    event_id = f"crm-{uuid.uuid4().hex}"
    body = orjson.dumps({"type": kind, "data": data}).decode()
    sent = datetime.now(UTC)
    return body, {"Content-Type": "application/json", "webhook-id": event_id,
                  "webhook-timestamp": str(int(sent.timestamp())),
                  "webhook-signature": Webhook(secret).sign(event_id, sent, body)}


def _link(message: EmailMessage, marker: str) -> str:
    html = message.get_body(("html",))
    if html is None:
        raise StoryError(f"{message['Subject']!r} has no HTML part")
    found = re.search(rf'href="([^"]*{re.escape(marker)}[^"]*)"', html.get_content())
    if found is None:
        raise StoryError(f"no {marker} link in {message['Subject']!r}")
    return found.group(1).replace("&amp;", "&")


@asynccontextmanager
async def receiving(platform: Platform) -> AsyncIterator[Receiver]:
    """The webhook receiver the ``sales-webhook`` connector calls, on its port."""
    receiver = Receiver(platform.outbound_secret)
    app = Starlette(routes=[Route("/leadwerk", receiver.endpoint, methods=["POST"])])
    async with serve_app(app, platform.receiver_port):
        yield receiver


@asynccontextmanager
async def story(platform: Platform, say: Narrate) -> AsyncIterator[Story]:
    async with receiving(platform) as receiver, httpx.AsyncClient(
            timeout=15, headers={"User-Agent": BROWSER}) as client:
        yield Story(platform, say, receiver, client)
