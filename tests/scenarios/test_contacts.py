"""The seed scenarios, walked through the public ingest API and read from the contacts API."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from .conftest import Stack, browser


def visitor() -> str:
    return str(uuid.uuid4())


def email() -> str:
    return f"anna.{uuid.uuid4().hex[:8]}@example.de"


async def find(stack: Stack, client: httpx.AsyncClient, **query: str) -> dict[str, Any] | None:
    response = await stack.api(client, "GET", "/contacts", params=query)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items[0] if items else None


async def submit_form(stack: Stack, client: httpx.AsyncClient, device: str, address: str,
                      **fields: str) -> None:
    response = await client.post(
        f"{stack.ingest}/f/ebook-download", cookies={"lw_aid": device},
        data={"email": address, "first_name": "Anna", "company": "Schmidt GmbH",
              "consent_marketing": "on", **fields})
    assert response.status_code == 303, response.text


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
                                               "properties": {"path": path}})
        await stack.track(client, "track", {"anonymousId": device,
                                            "event": "Document Downloaded"})
        await submit_form(stack, client, device, address)

        async def contact() -> dict[str, Any] | None:
            found = await find(stack, client, email=address)
            if found is None or found["score"] < 20 or \
                    len(await timeline(stack, client, found["id"])) < 5:
                return None
            return found

        found = await stack.eventually(contact)
        assert found["known"] is True
        assert found["traits"]["company"] == "Schmidt GmbH"
        assert {"kind": "anonymous", "value": device} in found["identifiers"]
        assert found["stage"] == "lead"
        assert found["score"] == 20  # one visit (5) and one download (15)
        by_device = await find(stack, client, anonymous_id=device)
        assert by_device is not None
        assert by_device["id"] == found["id"]
