"""The seed scenarios, walked through the public ingest API and read from the contacts API."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer

from demo.story import signed_crm_event
from leadwerk_crm_bridge.domain.outbound import development_secret
from leadwerk_platform.envelope import Envelope, encode
from leadwerk_platform.registry import ContractRegistry
from leadwerk_platform.testing.helpers import read_topic, values
from leadwerk_scoring.domain.identity import device_contact_id

from .conftest import Stack, browser, submit_form


def visitor() -> str:
    return str(uuid.uuid4())


def email() -> str:
    return f"anna.{uuid.uuid4().hex[:8]}@example.de"


async def find(stack: Stack, client: httpx.AsyncClient, **query: str) -> dict[str, Any] | None:
    response = await stack.api(client, "GET", "/contacts", params=query)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items[0] if items else None


async def timeline(stack: Stack, client: httpx.AsyncClient, contact_id: str) -> list[Any]:
    response = await stack.api(client, "GET", f"/contacts/{contact_id}/timeline",
                               params={"limit": 500})
    assert response.status_code == 200, response.text
    items: list[Any] = response.json()["items"]
    return items


async def test_anonymous_visits_then_a_form_make_one_contact_with_the_whole_history(
        stack: Stack) -> None:
    device, address = visitor(), email()
    async with browser() as client:
        for path in ("/", "/produkte", "/whitepaper"):
            await stack.track(client, "page", {"anonymousId": device, "name": path,
                                               "properties": {"path": path},
                                               "context": {"campaign": {
                                                   "source": "newsletter", "name": "herbst"}}})
        await stack.track(client, "track", {"anonymousId": device,
                                            "event": "Document Downloaded"})
        await submit_form(stack, client, device, address)

        async def contact() -> dict[str, Any] | None:
            # The stitcher's part (identity, timeline) and the scorer's (score, stage) arrive
            # separately: wait for both.
            found = await find(stack, client, email=address)
            if found is None or found["score"] < 20 or found["stage"] == "visitor" or \
                    len(await timeline(stack, client, found["id"])) < 5:
                return None
            return found

        found = await stack.eventually(contact)
        assert found["known"] is True
        assert found["traits"]["company"] == "Schmidt GmbH"
        assert {"kind": "anonymous", "value": device} in found["identifiers"]
        assert found["stage"] == "lead"
        assert found["score"] == 20  # one visit (5) and one download (15)
        # The campaign that brought the anonymous visitor is her first touch.
        assert found["attribution"]["first_touch"]["name"] == "herbst"
        by_device = await find(stack, client, anonymous_id=device)
        assert by_device is not None
        assert by_device["id"] == found["id"]


async def wait_contact(stack: Stack, client: httpx.AsyncClient,
                       ready: Callable[[dict[str, Any]], bool], **query: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        found = await find(stack, client, **query)
        return found if found is not None and ready(found) else None

    result: dict[str, Any] = await stack.eventually(probe)
    return result


async def test_the_seed_example_b1_with_50_points(stack: Stack) -> None:
    user_id, device = f"crm-{uuid.uuid4().hex[:8]}", visitor()
    async with browser() as client:
        await stack.track(client, "identify", {
            "userId": user_id, "anonymousId": device,
            "traits": {"email": email(), "company": {"name": "Schmidt GmbH",
                                                     "annual_revenue": 5_000_000}}})
        await stack.track(client, "page", {"userId": user_id, "name": "Start"})
        await stack.track(client, "track", {"userId": user_id, "event": "Document Downloaded"})
        await stack.track(client, "track", {"userId": user_id,
                                            "event": "Video Playback Started"})
        found = await wait_contact(stack, client, lambda c: c["score"] >= 50, user_id=user_id)
        assert (found["rating"], found["score"], found["grade"], found["band"]) == (
            "B1", 50, "B", 1)
        response = await stack.api(client, "GET", f"/contacts/{found['id']}/score-history")
        explanation = response.json()
        assert explanation["by_rule"] == {"document-download": 15, "video-started": 30,
                                          "website-visit": 5}
        assert all(entry["event_id"] for entry in explanation["history"])
        assert [s["to_stage"] for s in explanation["stages"]] == ["lead"]


async def test_two_devices_joined_by_email_share_one_timeline(stack: Stack) -> None:
    laptop, phone, address = visitor(), visitor(), email()
    async with browser() as client:
        await stack.track(client, "page", {"anonymousId": laptop, "name": "Start"})
        await submit_form(stack, client, laptop, address)
        await stack.track(client, "page", {"anonymousId": phone, "name": "Preise"})
        await stack.track(client, "track", {"anonymousId": phone,
                                            "event": "Video Playback Started"})
        await submit_form(stack, client, phone, address)

        async def joined() -> dict[str, Any] | None:
            found = await find(stack, client, email=address)
            if found is None or len(await timeline(stack, client, found["id"])) < 5:
                return None
            return await find(stack, client, email=address)  # identifiers after the merge

        found = await stack.eventually(joined)
        devices = {i["value"] for i in found["identifiers"] if i["kind"] == "anonymous"}
        assert devices == {laptop, phone}
        events = await timeline(stack, client, found["id"])
        assert sorted(e["type"] for e in events) == [
            "form_submitted", "form_submitted", "page", "page", "track"]
        # Two visits (one per device), the video and the download-free form: 5 + 5 + 30.
        found = await wait_contact(stack, client, lambda c: c["score"] >= 40, email=address)
        assert found["score"] == 40
        by_phone = await find(stack, client, anonymous_id=phone)
        assert by_phone is not None
        assert by_phone["id"] == found["id"]


async def test_a_shared_device_never_merges_two_people(stack: Stack) -> None:
    kiosk, anna, ben = visitor(), f"u-{uuid.uuid4().hex[:6]}", f"u-{uuid.uuid4().hex[:6]}"
    async with browser() as client:
        await stack.track(client, "identify", {"userId": anna, "anonymousId": kiosk,
                                               "traits": {"email": email()}})
        # As analytics.js does after identify: later calls carry the userId too (events keyed
        # by different ids have no order between them).
        await stack.track(client, "page", {"userId": anna, "anonymousId": kiosk,
                                           "name": "Anna liest"})
        await wait_contact(stack, client, lambda c: c["score"] >= 5, user_id=anna)
        await stack.track(client, "identify", {"userId": ben, "anonymousId": kiosk,
                                               "traits": {"email": email()}})
        await stack.track(client, "page", {"userId": ben, "anonymousId": kiosk,
                                           "name": "Ben liest"})
        ben_contact = await wait_contact(stack, client, lambda c: c["score"] >= 5,
                                         user_id=ben)
        anna_contact = await find(stack, client, user_id=anna)
        assert anna_contact is not None
        assert anna_contact["id"] != ben_contact["id"]
        anna_pages = [e["name"] for e in await timeline(stack, client, anna_contact["id"])
                      if e["type"] == "page"]
        ben_pages = [e["name"] for e in await timeline(stack, client, ben_contact["id"])
                     if e["type"] == "page"]
        assert (anna_pages, ben_pages) == (["Anna liest"], ["Ben liest"])
        device_now = await find(stack, client, anonymous_id=kiosk)
        assert device_now is not None
        assert device_now["id"] == ben_contact["id"]  # the device switched


async def become_mql(stack: Stack, client: httpx.AsyncClient,
                     user_id: str | None = None) -> dict[str, Any]:
    """A lead with email and company who watched four videos: 125 points, an MQL."""
    user_id = user_id or f"crm-{uuid.uuid4().hex[:8]}"
    await stack.track(client, "identify", {"userId": user_id, "traits": {
        "email": email(), "company": "Müller AG"}})
    for _ in range(4):
        await stack.track(client, "track", {"userId": user_id,
                                            "event": "Video Playback Started"})
    await stack.track(client, "page", {"userId": user_id, "name": "Preise"})
    return await wait_contact(stack, client, lambda c: c["stage"] == "mql" and c["score"] >= 125,
                              user_id=user_id)


async def test_an_mql_is_downgraded_when_engagement_decays(stack: Stack) -> None:
    async with browser() as client:
        mql = await become_mql(stack, client)
        assert mql["score"] == 125
        try:
            # 125 points halve every 90 days: under 50 after 119 days.
            stack.clock.offset = timedelta(days=118)
            assert stack.service.timer is not None
            stack.service.timer.wake()
            await asyncio.sleep(0.5)
            still = await stack.api(client, "GET", f"/contacts/{mql['id']}")
            assert still.json()["stage"] == "mql"
            stack.clock.offset = timedelta(days=120)
            stack.service.timer.wake()

            async def downgraded() -> dict[str, Any] | None:
                response = await stack.api(client, "GET", f"/contacts/{mql['id']}")
                body: dict[str, Any] = response.json()
                return body if body["stage"] == "lead" else None

            found = await stack.eventually(downgraded)
            assert found["score"] < 50
            history = (await stack.api(client, "GET",
                                       f"/contacts/{mql['id']}/score-history")).json()
            assert [(s["to_stage"], s["cause"]) for s in history["stages"]] == [
                ("lead", "identified"), ("mql", "score"), ("lead", "decay")]
        finally:
            stack.clock.offset = timedelta(0)


async def test_crm_acceptance_moves_an_mql_to_sal(stack: Stack) -> None:
    async with browser() as client:
        mql = await become_mql(stack, client)
        envelope = Envelope(id=str(uuid.uuid4()), type="crm.lead_feedback.v1", workspace="dev",
                            occurred_at=datetime.now(UTC), received_at=datetime.now(UTC),
                            producer="crm-bridge",
                            data={"contact_id": mql["id"], "status": "accepted",
                                  "reason": None, "connector": "hubspot", "crm_id": "51"})
        producer = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap_servers)
        await producer.start()
        try:
            await producer.send_and_wait(stack.settings.topic("crm-events"), encode(envelope),
                                         key=f"dev:{mql['id']}".encode())
        finally:
            await producer.stop()

        async def accepted() -> dict[str, Any] | None:
            body: dict[str, Any] = (await stack.api(client, "GET",
                                                    f"/contacts/{mql['id']}")).json()
            return body if body["stage"] == "sal" else None

        await stack.eventually(accepted)


async def crm_says(stack: Stack, client: httpx.AsyncClient, kind: str,
                   data: dict[str, Any]) -> None:
    """The CRM calls the bridge's signed inbound webhook (Standard Webhooks)."""
    body, headers = signed_crm_event(
        development_secret(stack.settings.secret_key.get_secret_value(), "inbound"), kind, data)
    response = await client.post(f"{stack.bridge}/webhooks/dev/generic", content=body,
                                 headers=headers)
    assert response.status_code == 200, response.text


async def test_a_lead_sales_rejects_goes_back_to_nurturing_until_it_engages_again(
        stack: Stack) -> None:
    """Sales says "not suitable": the lead is recycled with the reason kept, and its old
    score does not make it an MQL again at the next page view; engagement earned since does."""
    user_id = f"crm-{uuid.uuid4().hex[:8]}"
    async with browser() as client:
        mql = await become_mql(stack, client, user_id)
        await crm_says(stack, client, "lead.rejected", {"contact_id": mql["id"],
                                                        "reason": "kein Budget vor 2027"})
        recycled = await wait_contact(stack, client, lambda c: c["stage"] == "recycled",
                                      user_id=user_id)
        await stack.track(client, "page", {"userId": user_id, "name": "Preise"})
        await stack.track(client, "track", {"userId": user_id,
                                            "event": "Video Playback Started"})
        later = await wait_contact(stack, client, lambda c: c["score"] > recycled["score"],
                                   user_id=user_id)
        assert later["stage"] == "recycled"  # 155 points, but only 30 of them since
        history = (await stack.api(client, "GET",
                                   f"/contacts/{mql['id']}/score-history")).json()
        assert {"from_stage": "mql", "to_stage": "recycled", "cause": "crm",
                "reason": "kein Budget vor 2027"}.items() <= history["stages"][-1].items()
        for _ in range(3):  # 90 more: 120 earned since the recycle
            await stack.track(client, "track", {"userId": user_id,
                                                "event": "Video Playback Started"})
        again = await wait_contact(stack, client, lambda c: c["stage"] == "mql",
                                   user_id=user_id)
        assert again["score"] > later["score"]


async def test_deal_won_and_owner_change_in_the_crm_reach_the_contact(stack: Stack) -> None:
    """The closed loop through the public interfaces: the CRM calls the bridge's signed
    webhook, the contacts API shows the customer and the new owner."""
    user_id = f"crm-{uuid.uuid4().hex[:8]}"
    async with browser() as client:
        mql = await become_mql(stack, client, user_id)
        # Sales has the lead once the hand-off journey has given it an owner.
        await wait_contact(stack, client, lambda c: bool(c["traits"].get("owner")),
                           user_id=user_id)
        await crm_says(stack, client, "deal.won", {"contact_id": mql["id"], "crm_id": "D-4711",
                                                   "value": 24000})
        await crm_says(stack, client, "owner.changed", {"contact_id": mql["id"],
                                                        "owner": "jonas.weber@example.de"})

        async def won() -> dict[str, Any] | None:
            body: dict[str, Any] = (await stack.api(client, "GET",
                                                    f"/contacts/{mql['id']}")).json()
            owner = body["traits"].get("owner")
            return body if body["stage"] == "customer" and owner == "jonas.weber@example.de" \
                else None

        found = await stack.eventually(won)
        assert found["stage"] == "customer"


async def test_merge_export_and_erasure_through_the_api(stack: Stack) -> None:
    first, second = email(), email()
    async with browser() as client:
        await submit_form(stack, client, visitor(), first)
        await submit_form(stack, client, visitor(), second)
        a = await wait_contact(stack, client, lambda c: True, email=first)
        b = await wait_contact(stack, client, lambda c: True, email=second)
        unauthorised = await client.get(f"{stack.scoring}/api/contacts/{a['id']}")
        assert unauthorised.status_code == 401
        merged = await stack.api(client, "POST", f"/contacts/{a['id']}/merge/{b['id']}")
        assert merged.status_code == 200, merged.text
        emails = {i["value"] for i in merged.json()["identifiers"] if i["kind"] == "email"}
        assert emails == {first, second}
        via_old_id = await stack.api(client, "GET", f"/contacts/{b['id']}")
        assert via_old_id.json()["id"] == a["id"]

        # Events that arrive for the merged-away person land on the survivor.
        await stack.track(client, "identify", {"anonymousId": visitor(),
                                               "traits": {"email": second}})

        async def landed() -> bool:
            return len(await timeline(stack, client, a["id"])) == 3

        await stack.eventually(landed)
        export = (await stack.api(client, "GET", f"/contacts/{a['id']}/export")).json()
        assert len(export["timeline"]) == 3
        assert b["id"] in [m["merged_id"] for m in export["merged_contacts"]]

        erased = await stack.api(client, "DELETE", f"/contacts/{a['id']}")
        assert erased.status_code == 200
        assert (await stack.api(client, "GET", f"/contacts/{a['id']}")).status_code == 404
        assert await find(stack, client, email=first) is None
        # An in-flight event for the erased person does not bring the profile back, nor
        # does a journey's change request sent after the erasure.
        await submit_form(stack, client, visitor(), first)
        late = {"name": "Late", "trigger": {"manual": True}, "start": "tag", "steps": {
            "tag": {"type": "tag", "add": ["late"], "next": "end"}, "end": {"type": "end"}}}
        base = f"{stack.workflow}/api/journeys/late-change"
        assert (await client.put(base, json=late, headers=stack.admin)).status_code == 201
        enrolled = await client.post(f"{base}/enroll", headers=stack.admin,
                                     json={"contact_id": a["id"]})
        assert enrolled.status_code == 201, enrolled.text
        await asyncio.sleep(1.5)
        assert await find(stack, client, email=first) is None
        assert (await stack.api(client, "GET", f"/contacts/{a['id']}")).status_code == 404
        assert stack.service.deps is not None
        left = await stack.service.deps.pool.fetchval(
            "SELECT count(*) FROM scores WHERE contact_id = $1", a["id"])
        assert left == 0


async def test_a_model_change_rescores_from_the_timeline_without_double_counting(
        stack: Stack) -> None:
    user_id = f"crm-{uuid.uuid4().hex[:8]}"
    async with browser() as client:
        for _ in range(2):
            await stack.track(client, "track", {"userId": user_id,
                                                "event": "Document Downloaded"})
        contact = await wait_contact(stack, client, lambda c: c["score"] >= 30,
                                     user_id=user_id)
        original = (await stack.api(client, "GET", "/scoring-model")).json()["model"]
        invalid = await stack.api(client, "PUT", "/scoring-model", content=b"bands: []")
        assert invalid.status_code == 422
        assert any("bands" in problem["loc"] for problem in invalid.json()["detail"])

        changed = {**original}
        changed["engagement"] = {**original["engagement"], "rules": [
            {**rule, "points": 40} if rule["id"] == "document-download" else rule
            for rule in original["engagement"]["rules"]]}
        try:
            stored = await stack.api(client, "PUT", "/scoring-model", json=changed)
            assert stored.status_code == 201, stored.text
            version = stored.json()["model"]["version"]
            for _ in range(2):  # a second run changes nothing: no double counting
                started = await stack.api(client, "POST", "/scoring-model/rescore")
                assert started.status_code == 202

                async def finished() -> dict[str, Any] | None:
                    body: dict[str, Any] = (await stack.api(
                        client, "GET", "/scoring-model/rescore")).json()
                    return body if body["state"] in {"done", "failed"} else None

                progress = await stack.eventually(finished)
                assert progress["state"] == "done", progress
                assert progress["done"] == progress["total"] > 0
                after = (await stack.api(client, "GET", f"/contacts/{contact['id']}")).json()
                assert after["score"] == 80
            history = (await stack.api(client, "GET",
                                       f"/contacts/{contact['id']}/score-history")).json()
            assert {e["model_version"] for e in history["history"]} == {version}
            assert history["by_rule"] == {"document-download": 80}
        finally:
            await stack.api(client, "PUT", "/scoring-model", json=original)
            await stack.api(client, "POST", "/scoring-model/rescore")


async def test_retention_purges_old_anonymous_activity_only(stack: Stack) -> None:
    lurker, known_device, address = visitor(), visitor(), email()
    async with browser() as client:
        await stack.track(client, "page", {"anonymousId": lurker, "name": "Start"})
        await submit_form(stack, client, known_device, address)
        known = await wait_contact(stack, client, lambda c: True, email=address)
        lurker_id = device_contact_id("dev", lurker)

        async def lurker_seen() -> bool:
            response = await stack.api(client, "GET", f"/contacts/{lurker_id}")
            return response.status_code == 200

        await stack.eventually(lurker_seen)
        assert stack.service.retention is not None
        try:
            stack.clock.offset = timedelta(days=89)
            await stack.service.retention.run_once()
            assert await lurker_seen()
            stack.clock.offset = timedelta(days=91)
            assert await stack.service.retention.run_once() >= 1
            assert not await lurker_seen()
            assert len(await timeline(stack, client, known["id"])) == 1
        finally:
            stack.clock.offset = timedelta(0)

async def test_unprocessable_tracking_events_are_dead_lettered_and_the_stream_goes_on(
        stack: Stack) -> None:
    topic = stack.settings.topic("tracking-events")
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"not json", key=b"dev:a:broken")
        wrong = Envelope(id=str(uuid.uuid4()), type="contact.activity.v1", workspace="dev",
                         occurred_at=datetime.now(UTC), received_at=datetime.now(UTC),
                         producer="somebody", data={})
        await producer.send_and_wait(topic, encode(wrong), key=b"dev:a:broken")
    finally:
        await producer.stop()
    address = email()
    async with browser() as client:
        await submit_form(stack, client, visitor(), address)
        await wait_contact(stack, client, lambda c: True, email=address)
    dead = await read_topic(stack.settings.kafka_bootstrap_servers,
                            stack.settings.topic("tracking-events-dlq"), 2)
    assert b"not json" in {r.value for r in dead}
    for record in dead:
        headers = dict(record.headers)
        assert headers["x-leadwerk-dlq-topic"] == topic.encode()
        assert headers["x-leadwerk-dlq-group"].endswith(b"scoring.stitcher")
        assert headers["x-leadwerk-dlq-error"]

async def test_everything_scoring_published_matches_the_contracts(
        stack: Stack, contract_registry: ContractRegistry) -> None:
    """Runs last in this module: every message the scenarios above caused is checked."""
    seen: dict[str, int] = {}
    for topic in ("contact-events", "contact-changes"):
        records = await read_topic(stack.settings.kafka_bootstrap_servers,
                                   stack.settings.topic(topic), 1, timeout=5, idle=1.0)
        for message in values(records):
            assert contract_registry.validate(message) == [], message
            assert message["type"] in contract_registry.topics[topic].message_types
            seen[message["type"]] = seen.get(message["type"], 0) + 1
    assert set(seen) == {"contact.activity.v1", "contact.merged.v1", "contact.profile_changed.v1",
                         "contact.score_changed.v1", "contact.stage_changed.v1",
                         "contact.erased.v1"}
