"""Routing, speed to lead, and the triggers that fire later (segment, date, silence), plus
migrating enrollments to a new journey version: through ingest, scoring and the workflow
API, with the injectable clock for the waits. Tests that move the clock far run last."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer

from leadwerk_platform.envelope import Envelope, encode

from .conftest import (
    Stack,
    browser,
    commands,
    journey_steps,
    journeys_of,
    known_contact,
    submit_form,
)

INSIDE_SALES = {"anna.berger@example.de", "jonas.weber@example.de", "mia.schulz@example.de"}


async def enrollment(stack: Stack, client: httpx.AsyncClient, contact_id: str, journey: str,
                     check: Callable[[dict[str, Any]], bool] = lambda e: True,
                     ) -> dict[str, Any]:
    async def found() -> dict[str, Any] | None:
        items = [e for e in await journeys_of(stack, client, contact_id)
                 if e["journey_id"] == journey and check(e)]
        return items[0] if items else None

    result: dict[str, Any] = await stack.eventually(found)
    return result


async def at(stack: Stack, moment: datetime, then: Callable[[], Awaitable[Any]]) -> Any:
    """Move the clock a minute past ``moment``, wake the timers, run ``then``, move back."""
    stack.clock.offset = moment + timedelta(minutes=1) - datetime.now(UTC)
    try:
        assert stack.flow.timers is not None
        stack.flow.timers.wake()
        return await then()
    finally:
        stack.clock.offset = timedelta(0)


async def test_registrations_are_spread_fairly_across_inside_sales(stack: Stack) -> None:
    addresses = [f"reg.{uuid.uuid4().hex[:8]}@example.de" for _ in range(6)]
    async with browser() as client:
        for address in addresses:
            await submit_form(stack, client, str(uuid.uuid4()), address)
        welcomes = []
        for address in addresses:
            async def contact(address: str = address) -> str | None:
                response = await stack.api(client, "GET", "/contacts",
                                           params={"email": address})
                items = response.json()["items"]
                return items[0]["id"] if items else None

            contact_id = await stack.eventually(contact)
            [mail] = await commands(stack, "email-commands", contact_id, 1)
            welcomes.append(mail)
        owners = [m["data"]["personalization"]["owner"] for m in welcomes]
        assert set(owners) == INSIDE_SALES  # six registrations, three reps: two each
        assert all(m["data"]["sender"] == {"kind": "owner"} for m in welcomes)
        report = await client.get(f"{stack.workflow}/api/teams/inside-sales/assignments",
                                  headers=stack.admin)
        assert report.status_code == 200, report.text
        assert sorted(m["leads"] for m in report.json()["members"]) == [2, 2, 2]
        first = await enrollment(stack, client, welcomes[0]["data"]["contact_id"], "welcome")
        [why] = [h["reason"] for h in first["history"] if h["action"] == "owner"]
        assert why.startswith(f"{owners[0]} (fair: ")
        assert "leads in the period (fewest of 3)" in why
        missing = await client.get(f"{stack.workflow}/api/teams/nobody/assignments",
                                   headers=stack.admin)
        assert missing.status_code == 404


async def test_a_segment_trigger_enters_contacts_whose_traits_come_to_match(
        stack: Stack) -> None:
    journey = {"name": "Machine builders", "trigger": {"segment": {
        "industry": "Maschinenbau", "email": {"exists": True}}},
        "start": "tag", "steps": {"tag": {"type": "tag", "add": ["maschinenbau"],
                                          "next": "end"}, "end": {"type": "end"}}}
    async with browser() as client:
        base = f"{stack.workflow}/api/journeys/machine-builders"
        assert (await client.put(base, json=journey, headers=stack.admin)).status_code == 201
        assert (await client.post(f"{base}/activate", headers=stack.admin)).status_code == 200
        await asyncio.sleep(1.1)  # the active list is cached for a second per process
        outside = await known_contact(stack, client, industry="Handel")
        inside = await known_contact(stack, client, industry="Maschinenbau")
        entered = await enrollment(stack, client, inside, "machine-builders")
        assert "industry='Maschinenbau'" in entered["history"][0]["reason"]
        # The other contact enters once its industry changes to match.
        assert [e for e in await journeys_of(stack, client, outside)
                if e["journey_id"] == "machine-builders"] == []
        await stack.track(client, "identify", {"userId": stack.user_ids[outside],
                                               "traits": {"industry": "Maschinenbau"}})
        await enrollment(stack, client, outside, "machine-builders")


async def test_a_segment_journey_activated_later_enters_the_contacts_already_in_it(
        stack: Stack) -> None:
    """A marketer's segment reaches its existing audience, not only contacts that come to
    match after the journey is switched on."""
    async with browser() as client:
        members = [await known_contact(stack, client, industry="Anlagenbau")
                   for _ in range(2)]
        other = await known_contact(stack, client, industry="Handel")
        assert stack.flow.deps is not None
        pool = stack.flow.deps.pool

        async def projected() -> bool:  # the workflow has seen all three
            known = await pool.fetchval(
                "SELECT count(*) FROM contact_state WHERE contact_id = ANY($1::uuid[]) "
                "AND traits ? 'industry'", [*members, other])
            return bool(known == 3)

        await stack.eventually(projected)
        journey = {"name": "Plant builders", "trigger": {"segment": {
            "industry": "Anlagenbau", "email": {"exists": True}}},
            "start": "tag", "steps": {"tag": {"type": "tag", "add": ["anlagenbau"],
                                              "next": "end"}, "end": {"type": "end"}}}
        base = f"{stack.workflow}/api/journeys/plant-builders"
        assert (await client.put(base, json=journey, headers=stack.admin)).status_code == 201
        assert (await client.post(f"{base}/activate", headers=stack.admin)).status_code == 200
        for member in members:
            entered = await enrollment(stack, client, member, "plant-builders")
            assert "industry='Anlagenbau'" in entered["history"][0]["reason"]
        assert [e for e in await journeys_of(stack, client, other)
                if e["journey_id"] == "plant-builders"] == []
        # Activated again (a new version): nobody enters twice (re-entry: never).
        assert (await client.put(base, json=journey, headers=stack.admin)).status_code == 201
        await asyncio.sleep(1.5)
        for member in members:
            assert len([e for e in await journeys_of(stack, client, member)
                        if e["journey_id"] == "plant-builders"]) == 1


async def test_contacts_inside_an_old_version_move_by_an_explicit_rule(stack: Stack) -> None:
    v1 = {"name": "Nurture", "trigger": {"manual": True}, "start": "a", "steps": {
        "a": {"type": "wait", "duration": "1d", "next": "mail"},
        "mail": {"type": "send_email", "template": "welcome", "next": "end"},
        "end": {"type": "end"}}}
    v2 = {"name": "Nurture", "trigger": {"manual": True}, "start": "pause", "steps": {
        "pause": {"type": "wait", "duration": "1d", "next": "mail"},
        "mail": {"type": "send_email", "template": "welcome-follow-up", "next": "end"},
        "end": {"type": "end"}}}
    headers = stack.admin
    async with browser() as client:
        base = f"{stack.workflow}/api/journeys/nurture-migrate"
        assert (await client.put(base, json=v1, headers=headers)).status_code == 201
        assert (await client.post(f"{base}/activate", headers=headers)).status_code == 200
        contact_id = await known_contact(stack, client)
        enrolled = await client.post(f"{base}/enroll", headers=headers,
                                     json={"contact_id": contact_id})
        assert enrolled.status_code == 201, enrolled.text
        assert (await client.put(base, json=v2, headers=headers)).json()["version"] == 2
        unmapped = await client.post(f"{base}/migrate", headers=headers,
                                     json={"from_version": 1})
        assert unmapped.status_code == 422
        assert unmapped.json()["problems"] == [
            {"location": "steps.a", "message": "version 2 has no step 'a'; map it in steps"}]
        moved = await client.post(f"{base}/migrate", headers=headers,
                                  json={"from_version": 1, "steps": {"a": "pause"}})
        assert moved.status_code == 200, moved.text
        assert moved.json() == {"migrated": 1, "from_version": 1, "to_version": 2,
                                "steps": {"a": "pause"}}
        inside = await enrollment(stack, client, contact_id, "nurture-migrate")
        assert (inside["version"], inside["step"]) == (2, "pause")
        assert journey_steps(inside["history"])[-1]["action"] == "migrated"
        due = datetime.fromisoformat(inside["due_at"])
        [mail] = await at(stack, due,
                          lambda: commands(stack, "email-commands", contact_id, 1))
        assert mail["data"]["template"] == "welcome-follow-up"


async def test_a_date_trigger_writes_three_days_before_the_trial_ends(stack: Stack) -> None:
    trial_end = (datetime.now(UTC) + timedelta(days=5)).date().isoformat()
    async with browser() as client:
        early = await known_contact(stack, client, trial_end=trial_end)
        await stack.eventually(lambda: projected(stack, early, "trial_end"))
        base = f"{stack.workflow}/api/journeys/trial-ending"
        activated = await client.post(f"{base}/activate", headers=stack.admin)
        assert activated.status_code == 200, activated.text  # arms the contacts already known
        await asyncio.sleep(1.1)  # the active list is cached for a second per process
        late = await known_contact(stack, client, trial_end=trial_end)
        assert stack.flow.deps is not None
        pool = stack.flow.deps.pool

        async def armed() -> list[Any] | None:
            rows = await pool.fetch("SELECT contact_id::text AS c, due_at FROM trigger_timers "
                                    "WHERE journey_id = 'trial-ending'")
            return rows if {r["c"] for r in rows} >= {early, late} else None

        rows = await stack.eventually(armed)
        due = {r["c"]: r["due_at"] for r in rows}
        nine_berlin = datetime.combine(date.fromisoformat(trial_end) - timedelta(days=3),
                                       datetime.min.time(), tzinfo=UTC) + timedelta(hours=8)
        assert due[early] == due[late] == nine_berlin  # 09:00 in Berlin in winter

        async def both() -> list[dict[str, Any]]:
            return [(await commands(stack, "email-commands", c, 1))[0] for c in (early, late)]

        sent = await at(stack, nine_berlin, both)
        assert [m["data"]["template"] for m in sent] == ["trial-ending", "trial-ending"]
        entered = await enrollment(stack, client, late, "trial-ending")
        assert entered["history"][0]["reason"] == f"date trial_end {trial_end}"


async def projected(stack: Stack, contact_id: str, trait: str) -> bool:
    """The workflow has seen the contact's ``trait``."""
    assert stack.flow.deps is not None
    value = await stack.flow.deps.pool.fetchval(
        "SELECT traits->>$2 FROM contact_state WHERE contact_id = $1", contact_id, trait)
    return value is not None


async def crm_feedback(stack: Stack, contact_id: str, status: str) -> None:
    now = datetime.now(UTC)
    envelope = Envelope(id=str(uuid.uuid4()), type="crm.lead_feedback.v1", workspace="dev",
                        occurred_at=now, received_at=now, producer="crm-bridge",
                        data={"contact_id": contact_id, "status": status, "reason": None,
                              "connector": "hubspot", "crm_id": "77"})
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(stack.settings.topic("crm-events"), encode(envelope),
                                     key=f"dev:{contact_id}".encode())
    finally:
        await producer.stop()


async def test_speed_to_lead_escalates_and_reassigns_then_acceptance_ends_it(
        stack: Stack) -> None:
    async with browser() as client:
        contact_id = await known_contact(stack, client, company="Weber Maschinenbau GmbH")
        for _ in range(4):
            await stack.track(client, "track", {"userId": stack.user_ids[contact_id],
                                                "event": "Video Playback Started"})
        [handoff] = await commands(stack, "crm-commands", contact_id, 1, timeout=20)
        first_owner = handoff["data"]["owner"]
        assert first_owner in INSIDE_SALES
        waiting = await enrollment(stack, client, contact_id, "mql-handoff",
                                   lambda e: e["step"] == "handoff")
        assert journey_steps(waiting["history"])[-1]["action"] == "sla"
        due = datetime.fromisoformat(waiting["due_at"])
        # One business hour in Berlin: never more than a weekend and an hour away.
        assert timedelta(0) < due - datetime.now(UTC) < timedelta(days=3)

        async def escalated() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            crm = await commands(stack, "crm-commands", contact_id, 2)
            mails = await commands(stack, "email-commands", contact_id, 3)
            return crm, mails

        crm, mails = await at(stack, due, escalated)
        assert [(m["data"]["template"], m["data"]["class"]) for m in mails] == [
            ("mql-alert", "internal"), ("sla-breach", "internal"), ("mql-alert", "internal")]
        assert mails[1]["data"]["to"] == "vertriebsleitung@example.de"  # the team's manager
        second_owner = crm[1]["data"]["owner"]
        assert second_owner in INSIDE_SALES - {first_owner}
        assert mails[2]["data"]["to"] == second_owner
        # Sales accepts (CRM feedback): the contact becomes SAL and the clock stops.
        await crm_feedback(stack, contact_id, "accepted")
        done = await enrollment(stack, client, contact_id, "mql-handoff",
                                lambda e: e["state"] == "completed")
        own = journey_steps(done["history"])
        actions = [(h["step"], h["action"]) for h in own]
        assert ("handoff", "sla_breached") in actions
        assert actions[-2:] == [("handoff-again", "sales_responded"), ("done", "end")]
        assert own[-2]["reason"] == "stage sal"


async def test_contacts_silent_for_90_days_get_the_wake_up_mail(stack: Stack) -> None:
    """Moves the clock by 90 days: the last test of this module."""
    device = str(uuid.uuid4())
    async with browser() as client:
        contact_id = await known_contact(stack, client)
        await stack.track(client, "page", {"userId": stack.user_ids[contact_id],
                                           "name": "Preise"})
        await stack.track(client, "page", {"anonymousId": device, "name": "Start"})
        assert stack.flow.deps is not None
        pool = stack.flow.deps.pool

        async def armed() -> datetime | None:
            due: datetime | None = await pool.fetchval(
                "SELECT due_at FROM trigger_timers WHERE journey_id = 'wake-up' "
                "AND contact_id = $1", contact_id)
            return due

        due = await stack.eventually(armed)
        assert timedelta(days=89) < due - datetime.now(UTC) <= timedelta(days=90)
        anonymous = await pool.fetchval(
            "SELECT count(*) FROM trigger_timers t LEFT JOIN contact_state s "
            "USING (workspace, contact_id) WHERE t.journey_id = 'wake-up' "
            "AND s.traits->>'email' IS NULL")
        assert anonymous == 0  # devices nobody has identified are not woken
        mails = await at(stack, due, lambda: commands(stack, "email-commands", contact_id, 1))
        assert [m["data"]["template"] for m in mails] == ["wake-up"]
        entered = await enrollment(stack, client, contact_id, "wake-up")
        assert entered["history"][0]["reason"] == "no activity for 90d"
