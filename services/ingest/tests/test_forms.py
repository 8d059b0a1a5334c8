"""HTML form posts to /f/<form-id>."""

from __future__ import annotations

import httpx
import pytest

from leadwerk_platform.testing.helpers import read_topic, values

from .conftest import RunningIngest

pytestmark = pytest.mark.integration

FORM = {"email": "  Anna.Schmidt@Example.COM ", "first_name": "Anna", "company": "Schmidt GmbH",
        "consent_marketing": "on", "website": "", "password": "never stored"}


async def test_urlencoded_form_becomes_an_event_and_redirects(ingest: RunningIngest) -> None:
    async with httpx.AsyncClient(base_url=ingest.url, cookies={"lw_aid": "anon-cookie"}) as client:
        response = await client.post(
            "/f/ebook-download", data=FORM,
            headers={"Referer": "https://example.com/ebook?utm_source=linkedin"})
    assert response.status_code == 303
    assert response.headers["location"] == "https://www.example.com/ebook/danke"
    [record] = await read_topic(ingest.bootstrap, ingest.topic, 1)
    assert record.key == b"dev:a:anon-cookie"
    event = values([record])[0]
    assert event["type"] == "tracking.form_submitted.v1"
    data = event["data"]
    assert data["email"] == "anna.schmidt@example.com"
    assert data["traits"] == {"email": "anna.schmidt@example.com", "first_name": "Anna",
                              "company": "Schmidt GmbH"}
    assert data["consents"] == [{"purpose": "marketing", "given": True,
                                 "text_version": "2026-11-de-1", "double_opt_in": True}]
    assert data["campaign"]["source"] == "linkedin"
    assert "password" not in str(event)


async def test_json_form_without_consent(ingest: RunningIngest) -> None:
    async with httpx.AsyncClient(base_url=ingest.url) as client:
        response = await client.post("/f/ebook-download", json={
            "email": "b@example.com", "anonymous_id": "anon-2", "message_id": "m-1"})
    assert response.status_code == 200
    assert response.json() == {"success": True, "redirect": "https://www.example.com/ebook/danke"}
    [event] = values(await read_topic(ingest.bootstrap, ingest.topic, 1))
    assert event["data"]["consents"][0]["given"] is False
    assert event["data"]["anonymous_id"] == "anon-2"


async def test_honeypot_missing_fields_and_unknown_forms(ingest: RunningIngest) -> None:
    async with httpx.AsyncClient(base_url=ingest.url) as client:
        bot = await client.post("/f/ebook-download", data={**FORM, "website": "http://spam"})
        missing = await client.post("/f/ebook-download", json={"first_name": "x"})
        bad_email = await client.post("/f/ebook-download", data={"email": "not-an-email"})
        unknown = await client.post("/f/nope", json={"email": "a@example.com"})
        bad_json = await client.post("/f/ebook-download", content=b"{",
                                     headers={"Content-Type": "application/json"})
    assert bot.status_code == 303  # the bot sees success, nothing is recorded
    assert missing.status_code == 400
    assert missing.json()["error"]["details"] == [{"field": "email", "message": "required"}]
    assert bad_email.status_code == 400
    assert "not an email address" in bad_email.text
    assert unknown.status_code == 404
    assert bad_json.status_code == 400
    assert await read_topic(ingest.bootstrap, ingest.topic, 1, timeout=1.0) == []
