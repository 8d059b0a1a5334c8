"""The shipped journeys end to end: events through ingest, contacts from scoring, commands
from workflow on email-commands and crm-commands; waits advanced with the injectable clock."""

from __future__ import annotations

import functools
import uuid
from datetime import timedelta
from typing import Any

from leadwerk_platform.registry import ContractRegistry
from leadwerk_platform.testing.helpers import read_topic, values
from leadwerk_platform.tokens import EmailToken, TokenKind, TokenSigner

from .conftest import (
    Stack,
    browser,
    commands,
    journey_steps,
    journeys_of,
    known_contact,
    submit_form,
)


async def test_the_whitepaper_sequence_with_its_waits_and_the_non_opener_branch(
        stack: Stack) -> None:
    async with browser() as client:
        contact_id = await known_contact(stack, client, first_name="Anna")
        await stack.track(client, "track", {"userId": stack.user_ids[contact_id],
                                            "event": "Document Downloaded",
                                            "properties": {"document": "whitepaper.pdf"}})
        [info] = await commands(stack, "email-commands", contact_id, 1)
        assert info["type"] == "email.send_requested.v1"
        assert info["data"]["template"] == "whitepaper-info"
        assert info["data"]["class"] == "marketing"
        assert info["data"]["to"].startswith("lead.")
        assert info["data"]["personalization"]["first_name"] == "Anna"
        assert info["data"]["origin"]["journey_id"] == "whitepaper-sequence"
        try:
            for days, expected in ((3, "event-invitation"), (6, "event-invitation-reminder")):
                stack.clock.offset = timedelta(days=days, minutes=1)
                assert stack.flow.timers is not None
                stack.flow.timers.wake()
                sent = await commands(stack, "email-commands", contact_id,
                                      2 if days == 3 else 3)
                assert sent[-1]["data"]["template"] == expected
        finally:
            stack.clock.offset = timedelta(0)
        [enrollment] = [e for e in await journeys_of(stack, client, contact_id)
                        if e["journey_id"] == "whitepaper-sequence"]
        assert enrollment["state"] == "completed"
        actions = [(h["step"], h["action"]) for h in journey_steps(enrollment["history"])]
        assert actions == [(None, "entered"), ("info-mail", "email"), ("wait-3d", "wait"),
                           ("invitation", "email"), ("opened", "wait_for"),
                           ("opened", "timeout"), ("reminder", "email"), ("done", "end")]
        # Each command once: ids are idempotency keys, none repeated.
        sent = await commands(stack, "email-commands", contact_id, 3)
        assert len({m["id"] for m in sent}) == len(sent) == 3


async def test_an_mql_is_handed_to_sales_and_the_owner_is_notified(stack: Stack) -> None:
    async with browser() as client:
        contact_id = await known_contact(stack, client, company="Müller AG",
                                         owner="vertrieb@example.de")
        for _ in range(4):
            await stack.track(client, "track", {"userId": stack.user_ids[contact_id],
                                                "event": "Video Playback Started"})
        [handoff] = await commands(stack, "crm-commands", contact_id, 1, timeout=20)
        assert handoff["type"] == "crm.handoff_requested.v1"
        assert handoff["data"]["snapshot"]["stage"] == "mql"
        assert handoff["data"]["owner"] == "vertrieb@example.de"
        notes = [m for m in await commands(stack, "email-commands", contact_id, 1)
                 if m["data"]["template"] == "mql-alert"]
        assert [n["data"]["to"] for n in notes] == ["vertrieb@example.de"]
        assert notes[0]["data"]["class"] == "internal"


async def test_journeys_api_validates_versions_pauses_and_enrolls(stack: Stack) -> None:
    headers = stack.admin
    async with browser() as client:
        base = f"{stack.workflow}/api/journeys"
        assert (await client.get(base)).status_code == 401
        listed = (await client.get(base, headers=headers)).json()["items"]
        assert {j["journey_id"] for j in listed} >= {"welcome", "whitepaper-sequence",
                                                     "mql-handoff"}
        broken = {"name": "Broken", "trigger": {"manual": True}, "start": "a",
                  "steps": {"a": {"type": "wait", "duration": "1d", "next": "zzz"}}}
        answer = await client.put(f"{base}/broken", json=broken, headers=headers)
        assert answer.status_code == 422
        assert answer.json()["problems"] == [{"location": "steps.a.next",
                                              "message": "unknown step 'zzz'"}]
        manual = {"name": "Manual", "trigger": {"manual": True}, "start": "a", "steps": {
            "a": {"type": "send_email", "template": "welcome", "next": "b"},
            "b": {"type": "end"}}}
        created = await client.put(f"{base}/manual-test", json=manual, headers=headers)
        assert created.status_code == 201
        assert created.json()["version"] == 1
        contact_id = await known_contact(stack, client)
        enrolled = await client.post(f"{base}/manual-test/enroll", headers=headers,
                                     json={"contact_id": contact_id})
        assert enrolled.status_code == 201, enrolled.text
        again = await client.post(f"{base}/manual-test/enroll", headers=headers,
                                  json={"contact_id": contact_id})
        assert again.status_code == 409  # re-entry: never
        stats = (await client.get(f"{base}/manual-test/stats", headers=headers)).json()
        assert (stats["entered"], stats["completed"]) == (1, 1)
        edited = await client.put(f"{base}/manual-test", headers=headers,
                                  content=b"name: Manual v2\ntrigger: {manual: true}\n"
                                          b"start: a\nsteps: {a: {type: end}}\n")
        assert edited.json()["version"] == 2
        paused = await client.post(f"{base}/manual-test/pause", headers=headers)
        assert paused.json()["status"] == "paused"
        detail = (await client.get(f"{base}/manual-test", headers=headers)).json()
        assert [v["version"] for v in detail["versions"]] == [2, 1]


async def test_a_merge_moves_enrollments_to_the_survivor_without_duplicates(
        stack: Stack) -> None:
    async with browser() as client:
        first = await known_contact(stack, client)
        second = await known_contact(stack, client)
        for contact_id in (first, second):
            await stack.track(client, "track", {"userId": stack.user_ids[contact_id],
                                                "event": "Document Downloaded",
                                                "properties": {"document": "whitepaper.pdf"}})
            await commands(stack, "email-commands", contact_id, 1)
        merged = await stack.api(client, "POST", f"/contacts/{first}/merge/{second}")
        assert merged.status_code == 200, merged.text

        async def moved() -> list[dict[str, Any]] | None:
            items = await journeys_of(stack, client, first)
            return items if len(items) == 2 else None

        items = await stack.eventually(moved)
        states = sorted((e["state"], e["end_reason"] or "") for e in items)
        assert states == [("active", ""), ("exited", f"merged into {first}")]
        assert await journeys_of(stack, client, second) == []


async def test_reaching_the_goal_leaves_the_welcome_journey(stack: Stack) -> None:
    device, address = str(uuid.uuid4()), f"goal.{uuid.uuid4().hex[:8]}@example.de"
    async with browser() as client:
        await submit_form(stack, client, device, address)

        async def contact() -> str | None:
            response = await stack.api(client, "GET", "/contacts", params={"email": address})
            items = response.json()["items"]
            return items[0]["id"] if items else None

        contact_id: str = await stack.eventually(contact)

        async def welcome(state: str) -> dict[str, Any] | None:
            items = [e for e in await journeys_of(stack, client, contact_id)
                     if e["journey_id"] == "welcome" and e["state"] == state]
            return items[0] if items else None

        await stack.eventually(lambda: welcome("active"))
        for _ in range(4):  # 120 points with email and company: an MQL
            await stack.track(client, "track", {"anonymousId": device,
                                                "event": "Video Playback Started"})
        left = await stack.eventually(lambda: welcome("exited"))
        assert left["end_reason"] == "goal reached"


async def test_an_opened_invitation_ends_the_sequence_without_a_reminder(stack: Stack) -> None:
    """The closed loop: the open pixel of the invitation (a signed token, as the mailer will
    put in every marketing email) reaches the waiting journey through ingest and scoring."""
    signer = TokenSigner(stack.settings.secret_key.get_secret_value())
    async with browser() as client:
        contact_id = await known_contact(stack, client)
        await stack.track(client, "track", {"userId": stack.user_ids[contact_id],
                                            "event": "Document Downloaded",
                                            "properties": {"document": "whitepaper.pdf"}})
        await commands(stack, "email-commands", contact_id, 1)
        try:
            stack.clock.offset = timedelta(days=3, minutes=1)
            assert stack.flow.timers is not None
            stack.flow.timers.wake()
            invitation = (await commands(stack, "email-commands", contact_id, 2))[-1]
            assert invitation["data"]["template"] == "event-invitation"
            token = signer.sign(EmailToken(TokenKind.OPEN, "dev", contact_id,
                                           message_id=invitation["id"]))
            pixel = await client.get(f"{stack.ingest}/t/o/{token}")
            assert pixel.status_code == 200

            async def finished() -> dict[str, Any] | None:
                items = [e for e in await journeys_of(stack, client, contact_id)
                         if e["journey_id"] == "whitepaper-sequence"
                         and e["state"] == "completed"]
                return items[0] if items else None

            enrollment = await stack.eventually(finished)
        finally:
            stack.clock.offset = timedelta(0)
        steps = [(h["step"], h["action"]) for h in journey_steps(enrollment["history"])]
        assert steps[-3:] == [("opened", "wait_for"), ("opened", "event"), ("done", "end")]
        assert "reminder" not in {step for step, _ in steps}


async def test_journey_steps_change_the_contact_in_scoring(stack: Stack) -> None:
    headers = stack.admin
    journey = {"name": "Demo booked", "trigger": {"manual": True}, "start": "tag", "steps": {
        "tag": {"type": "tag", "add": ["demo-booked"], "next": "trait"},
        "trait": {"type": "set_trait", "traits": {"interest": "demo"}, "next": "points"},
        "points": {"type": "adjust_score", "points": 40, "reason": "booked a demo",
                   "next": "stage"},
        "stage": {"type": "change_stage", "stage": "sal", "reason": "demo booked",
                  "next": "hook"},
        "hook": {"type": "webhook", "url": "https://hooks.example.de/leadwerk", "next": "end"},
        "end": {"type": "end"}}}
    async with browser() as client:
        base = f"{stack.workflow}/api/journeys/demo-booked"
        assert (await client.put(base, json=journey, headers=headers)).status_code == 201
        contact_id = await known_contact(stack, client)
        enrolled = await client.post(f"{base}/enroll", headers=headers,
                                     json={"contact_id": contact_id})
        assert enrolled.status_code == 201, enrolled.text

        async def changed() -> dict[str, Any] | None:
            body: dict[str, Any] = (await stack.api(client, "GET",
                                                    f"/contacts/{contact_id}")).json()
            return body if body["stage"] == "sal" and body["score"] >= 40 else None

        contact = await stack.eventually(changed)
        assert contact["traits"]["tags"] == ["demo-booked"]
        assert contact["traits"]["interest"] == "demo"
        explained = (await stack.api(client, "GET",
                                     f"/contacts/{contact_id}/score-history")).json()
        assert explained["by_rule"]["journey:demo-booked"] == 40
        assert explained["stages"][-1]["cause"] == "journey"
        [hook] = await commands(stack, "crm-commands", contact_id, 1)
        assert hook["type"] == "crm.webhook_requested.v1"
        assert hook["data"]["url"] == "https://hooks.example.de/leadwerk"


async def test_every_command_the_workflow_published_matches_the_contracts(
        stack: Stack, contract_registry: ContractRegistry) -> None:
    """Runs last in this module: the commands the journeys above sent, against schemas/."""
    seen: set[str] = set()
    for topic in ("email-commands", "crm-commands", "contact-commands"):
        records = await read_topic(stack.settings.kafka_bootstrap_servers,
                                   stack.settings.topic(topic), 1, timeout=5, idle=1.0)
        for message in values(records):
            assert contract_registry.validate(message) == [], message
            assert message["type"] in contract_registry.topics[topic].message_types
            seen.add(message["type"])
    assert seen == {"email.send_requested.v1", "crm.handoff_requested.v1",
                    "crm.webhook_requested.v1", "contact.change_requested.v1"}


async def test_owners_are_assigned_round_robin_and_by_territory(stack: Stack) -> None:
    headers = stack.admin
    journey = {"name": "Routing", "trigger": {"manual": True}, "start": "assign", "steps": {
        "assign": {"type": "assign_owner", "strategy": "round_robin",
                   "reps": ["rep-a@example.de", "rep-b@example.de"],
                   "territories": [{"when": {"country": "AT"}, "owner": "wien@example.at"}],
                   "next": "tell"},
        "tell": {"type": "notify", "template": "mql-alert", "to": "owner", "next": "end"},
        "end": {"type": "end"}}}
    async with browser() as client:
        base = f"{stack.workflow}/api/journeys/routing-test"
        assert (await client.put(base, json=journey, headers=headers)).status_code == 201
        contacts = [await known_contact(stack, client), await known_contact(stack, client),
                    await known_contact(stack, client, country="AT")]

        async def projected(contact_id: str) -> bool:
            """The workflow has seen the contact's traits (the territory rule reads them)."""
            assert stack.flow.deps is not None
            email = await stack.flow.deps.pool.fetchval(
                "SELECT traits->>'email' FROM contact_state WHERE contact_id = $1", contact_id)
            return email is not None

        owners = []
        for contact_id in contacts:
            await stack.eventually(functools.partial(projected, contact_id))
            enrolled = await client.post(f"{base}/enroll", headers=headers,
                                         json={"contact_id": contact_id})
            assert enrolled.status_code == 201, enrolled.text
            notes = [m for m in await commands(stack, "email-commands", contact_id, 1)
                     if m["data"]["template"] == "mql-alert"]
            owners.append(notes[0]["data"]["to"])
        assert owners[:2] in (["rep-a@example.de", "rep-b@example.de"],
                              ["rep-b@example.de", "rep-a@example.de"])
        assert owners[2] == "wien@example.at"

        async def owned() -> bool:
            body = (await stack.api(client, "GET", f"/contacts/{contacts[2]}")).json()
            return bool(body["owner"] == "wien@example.at")

        await stack.eventually(owned)  # the owner trait reached scoring
