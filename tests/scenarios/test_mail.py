"""Email end to end: a form with double opt-in through ingest and scoring to the mailer, the
confirmation link, the held welcome mail from the assigned rep, a tracked click, the one-click
unsubscribe, and the marketing mail that no longer goes out. Real SMTP (aiosmtpd) as the sink."""

from __future__ import annotations

import uuid
from datetime import timedelta
from email.message import EmailMessage
from typing import Any

import httpx

from .conftest import Stack, browser, journeys_of, known_contact, submit_form

INSIDE_SALES = {"anna.berger@example.de", "jonas.weber@example.de", "mia.schulz@example.de"}


def html_of(message: EmailMessage) -> str:
    part = message.get_body(("html",))
    assert part is not None
    return str(part.get_content())


async def mails_to(stack: Stack, address: str, count: int) -> list[EmailMessage]:
    assert stack.mail is not None
    sink = stack.mail

    async def arrived() -> list[EmailMessage] | None:
        found = sink.to(address)
        return found if len(found) >= count else None

    result: list[EmailMessage] = await stack.eventually(arrived)
    return result


async def messages(stack: Stack, client: httpx.AsyncClient,
                   contact_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"{stack.mailer}/api/contacts/{contact_id}/messages",
                                headers=stack.admin)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def the_follow_up_comes_from(stack: Stack, address: str, sender: str) -> None:
    """The welcome journey's follow-up, two days on (the third mail to ``address``)."""
    try:
        stack.clock.offset = timedelta(days=2, minutes=1)
        assert stack.flow.timers is not None
        stack.flow.timers.wake()
        *_, follow_up = await mails_to(stack, address, 3)
    finally:
        stack.clock.offset = timedelta(0)
    assert follow_up["Subject"] == "Noch Fragen zum E-Book, Anna?"
    assert str(follow_up["From"]) == sender


async def test_double_opt_in_welcome_click_and_one_click_unsubscribe(stack: Stack) -> None:
    device, address = str(uuid.uuid4()), f"doi.{uuid.uuid4().hex[:8]}@example.de"
    async with browser() as client:
        await submit_form(stack, client, device, address)
        [confirmation] = await mails_to(stack, address, 1)
        assert confirmation["Subject"] == "Bitte bestätigen Sie Ihre Anmeldung"
        assert confirmation["List-Unsubscribe"] is None  # transactional
        token = html_of(confirmation).split(f'href="{stack.ingest}/t/confirm/')[1]
        confirm_url = f"{stack.ingest}/t/confirm/" + token.split('"')[0]

        async def contact() -> str | None:
            response = await stack.api(client, "GET", "/contacts", params={"email": address})
            items = response.json()["items"]
            return items[0]["id"] if items else None

        contact_id: str = await stack.eventually(contact)

        async def held() -> list[dict[str, Any]] | None:
            items = [m for m in await messages(stack, client, contact_id)
                     if m["template_id"] == "welcome" and m["state"] == "held"]
            return items or None

        await stack.eventually(held)  # the journey's welcome waits for the confirmation
        confirmed = await client.post(confirm_url)
        assert confirmed.status_code in {200, 303}
        _, welcome = await mails_to(stack, address, 2)
        assert welcome["Subject"] == "Willkommen, Anna!"
        assert str(welcome["From"]) in INSIDE_SALES  # from the rep assigned at registration
        consents = (await client.get(f"{stack.mailer}/api/contacts/{contact_id}/consents",
                                     headers=stack.admin)).json()
        assert consents["state"] == {"marketing": "confirmed"}
        assert [e["action"] for e in consents["log"]] == ["pending", "confirmed"]
        # A tracked click reaches the contact's timeline through ingest and scoring.
        tracked = html_of(welcome).split(f'href="{stack.ingest}/t/c/')[1].split('"')[0]
        redirect = await client.get(f"{stack.ingest}/t/c/{tracked}")
        assert redirect.status_code == 302

        async def clicked() -> bool:
            timeline = (await stack.api(client, "GET", f"/contacts/{contact_id}/timeline")
                        ).json()["items"]
            return any("email_clicked" in str(e["type"]) for e in timeline)

        await stack.eventually(clicked)
        # Two days later the follow-up comes from the same rep: every automated mail does
        # (seed documents), not only the one whose step names the owner.
        await the_follow_up_comes_from(stack, address, str(welcome["From"]))
        # RFC 8058: the mail client POSTs to the List-Unsubscribe URL.
        unsubscribe = str(welcome["List-Unsubscribe"]).strip("<>")
        answer = await client.post(unsubscribe, content=b"List-Unsubscribe=One-Click",
                                   headers={"Content-Type":
                                            "application/x-www-form-urlencoded"})
        assert answer.status_code == 200

        async def withdrawn() -> bool:
            body = (await client.get(f"{stack.mailer}/api/contacts/{contact_id}/consents",
                                     headers=stack.admin)).json()
            return bool(body["state"]["marketing"] == "withdrawn")

        await stack.eventually(withdrawn)
        # The white-paper journey still decides to write: the mailer refuses at send time.
        await stack.track(client, "track", {"anonymousId": device,
                                            "event": "Document Downloaded",
                                            "properties": {"document": "whitepaper.pdf"}})

        async def refused() -> dict[str, Any] | None:
            items = [m for m in await messages(stack, client, contact_id)
                     if m["template_id"] == "whitepaper-info"]
            return items[0] if items and items[0]["state"] == "suppressed" else None

        refusal = await stack.eventually(refused)
        assert refusal["reason"] == "unsubscribed"

        async def told() -> dict[str, list[tuple[str, str, str]]] | None:
            """The mailer's verdicts reached each journey step's history."""
            items = await journeys_of(stack, client, contact_id)
            steps = {e["journey_id"]: [(h["step"], h["action"], h["reason"])
                                       for h in e["history"]] for e in items}
            done = any(a == "email_suppressed" for _, a, _ in steps.get(
                "whitepaper-sequence", [])) and any(
                a == "email_sent" for _, a, _ in steps.get("welcome", []))
            return steps if done else None

        history = await stack.eventually(told)
        assert ("welcome-mail", "email_sent") in [(s, a) for s, a, _ in history["welcome"]]
        assert ("info-mail", "email_suppressed", "unsubscribed") in \
            history["whitepaper-sequence"]
    assert len(await mails_to(stack, address, 3)) == 3  # opt-in, welcome, follow-up


async def test_journeys_name_only_templates_the_mailer_has(stack: Stack) -> None:
    journey = {"name": "Typo", "trigger": {"manual": True}, "start": "a", "steps": {
        "a": {"type": "send_email", "template": "welcom", "next": "b"}, "b": {"type": "end"}}}
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.put(f"{stack.workflow}/api/journeys/typo", json=journey,
                                  headers=stack.admin)
        assert answer.status_code == 422
        assert answer.json()["problems"] == [{"location": "steps.a.template",
                                              "message": "missing template 'welcom'"}]
        created = await client.put(f"{stack.mailer}/api/templates/welcom", headers=stack.admin,
                                   json={"locales": {"de": {"subject": "Hallo",
                                                            "html": "<p>Hallo</p>"}}})
        assert created.status_code == 201, created.text
        accepted = await client.put(f"{stack.workflow}/api/journeys/typo", json=journey,
                                    headers=stack.admin)
        assert accepted.status_code == 201, accepted.text


async def test_a_hard_bounce_reported_later_ends_the_contacts_journeys(stack: Stack) -> None:
    async with browser() as client:
        contact_id = await known_contact(stack, client)
        consent = await client.post(f"{stack.mailer}/api/contacts/{contact_id}/consents",
                                    headers=stack.admin,
                                    json={"action": "granted", "source": "crm import"})
        assert consent.status_code == 201
        await stack.track(client, "track", {"userId": stack.user_ids[contact_id],
                                            "event": "Document Downloaded",
                                            "properties": {"document": "whitepaper.pdf"}})

        async def sent() -> dict[str, Any] | None:
            items = [m for m in await messages(stack, client, contact_id)
                     if m["template_id"] == "whitepaper-info" and m["state"] == "sent"]
            return items[0] if items else None

        mail = await stack.eventually(sent)
        bounce = await client.post(f"{stack.mailer}/api/bounces", headers=stack.admin, json={
            "events": [{"type": "bounce", "recipient": mail["to_address"], "status": "5.1.1",
                        "message_id": mail["message_id"]}]})
        assert bounce.status_code == 200, bounce.text

        async def ended() -> dict[str, Any] | None:
            items = [e for e in await journeys_of(stack, client, contact_id)
                     if e["journey_id"] == "whitepaper-sequence" and e["state"] == "exited"]
            return items[0] if items else None

        enrollment = await stack.eventually(ended)

        async def flagged() -> bool:
            """Scoring consumed the bounce too: the contact says nobody reads the address."""
            body = (await stack.api(client, "GET", f"/contacts/{contact_id}")).json()
            return bool(body["traits"].get("email_status") == "bounced")

        await stack.eventually(flagged)
    assert enrollment["end_reason"] == "email bounced"
    actions = [h["action"] for h in enrollment["history"]]
    assert actions[-3:] == ["email_sent", "email_bounced", "exited"]
