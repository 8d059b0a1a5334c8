"""Open pixel, click redirect, unsubscribe and opt-in confirmation, through signed tokens."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from leadwerk_platform.testing.helpers import read_topic, values
from leadwerk_platform.tokens import EmailToken, TokenKind, TokenSigner

from .conftest import RunningIngest

pytestmark = pytest.mark.integration


def token(ingest: RunningIngest, kind: TokenKind, **fields: Any) -> str:
    return ingest.signer.sign(EmailToken(kind=kind, workspace="dev", contact_id="c-1",
                                         message_id="msg-1", **fields))


async def test_open_pixel_answers_a_gif_and_records_the_open(ingest: RunningIngest) -> None:
    async with httpx.AsyncClient(base_url=ingest.url) as client:
        response = await client.get(f"/t/o/{token(ingest, TokenKind.OPEN)}",
                                    headers={"User-Agent": "Mozilla/5.0 Thunderbird/128.0"})
        forged = await client.get("/t/o/not-a-token")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/gif"
    assert response.content.startswith(b"GIF89a")
    assert "no-store" in response.headers["cache-control"]
    assert forged.status_code == 200  # mail clients always get their pixel …
    [event] = values(await read_topic(ingest.bootstrap, ingest.topic, 1, idle=0.5))
    assert event["type"] == "tracking.email_opened.v1"  # … but only the real one counts
    assert event["data"]["contact_id"] == "c-1"
    assert event["data"]["email_message_id"] == "msg-1"


async def test_click_redirects_only_when_the_signature_holds(ingest: RunningIngest) -> None:
    good = token(ingest, TokenKind.CLICK, url="https://example.com/whitepaper?utm_source=mail",
                 link_id="cta")
    payload, _, signature = good.rpartition(".")
    other_key = TokenSigner("another-secret-key-another-secret-key").sign(EmailToken(
        kind=TokenKind.CLICK, workspace="dev", contact_id="c-1", url="https://evil.example"))
    open_token = token(ingest, TokenKind.OPEN)
    async with httpx.AsyncClient(base_url=ingest.url) as client:
        response = await client.get(f"/t/c/{good}")
        forgeries = [await client.get(f"/t/c/{t}") for t in (
            other_key,                                   # signed with another key
            payload[:-2] + "xx." + signature,            # payload altered
            good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB"),  # signature altered
            open_token,                                  # a valid token of another kind
            "https%3A%2F%2Fevil.example",
        )]
    assert response.status_code == 302
    assert response.headers["location"] == "https://example.com/whitepaper?utm_source=mail"
    for forged in forgeries:
        assert forged.status_code == 404
        assert "location" not in forged.headers
    [event] = values(await read_topic(ingest.bootstrap, ingest.topic, 1, idle=0.5))
    assert event["type"] == "tracking.email_clicked.v1"
    assert event["data"]["url"] == "https://example.com/whitepaper?utm_source=mail"
    assert event["data"]["link_id"] == "cta"
    assert event["data"]["campaign"]["source"] == "mail"


async def test_unsubscribe_page_and_rfc8058_one_click(ingest: RunningIngest) -> None:
    unsubscribe = token(ingest, TokenKind.UNSUBSCRIBE, purpose="marketing")
    async with httpx.AsyncClient(base_url=ingest.url) as client:
        page = await client.get(f"/t/u/{unsubscribe}")
        one_click = await client.post(f"/t/u/{unsubscribe}",
                                      data={"List-Unsubscribe": "One-Click"})
        again = await client.post(f"/t/u/{unsubscribe}")  # the page's button, same link
        forged = await client.post("/t/u/forged", data={"List-Unsubscribe": "One-Click"})
    assert page.status_code == 200
    assert "<form method=\"post\"" in page.text
    assert one_click.status_code == 200
    assert again.status_code == 200
    assert forged.status_code == 404
    events = values(await read_topic(ingest.bootstrap, ingest.topic, 2, idle=0.5))
    assert [e["type"] for e in events] == ["tracking.unsubscribed.v1"] * 2
    assert {e["data"]["method"] for e in events} == {"one-click", "page"}
    assert len({e["id"] for e in events}) == 1  # the same link twice is one unsubscribe


async def test_optin_confirmation_is_a_post_behind_a_page(ingest: RunningIngest) -> None:
    confirm = token(ingest, TokenKind.CONFIRM, purpose="marketing",
                    consent_text_version="2026-11-de-1")
    async with httpx.AsyncClient(base_url=ingest.url) as client:
        page = await client.get(f"/t/confirm/{confirm}")
        assert await read_topic(ingest.bootstrap, ingest.topic, 1, timeout=0.5) == []
        confirmed = await client.post(f"/t/confirm/{confirm}")
        forged = await client.post(f"/t/confirm/{confirm[:-4]}AAAA")
    assert page.status_code == 200
    assert confirmed.status_code == 303
    assert forged.status_code == 404
    [event] = values(await read_topic(ingest.bootstrap, ingest.topic, 1, idle=0.5))
    assert event["type"] == "tracking.optin_confirmed.v1"
    assert event["data"]["consent_text_version"] == "2026-11-de-1"
    assert event["data"]["requested_at"]


async def test_expired_confirmation_token_is_refused(
        ingest: RunningIngest, monkeypatch: pytest.MonkeyPatch) -> None:
    eight_days_ago = time.time() - 8 * 86_400
    with monkeypatch.context() as patch:  # itsdangerous stamps tokens with time.time()
        patch.setattr(time, "time", lambda: eight_days_ago)
        stale = token(ingest, TokenKind.CONFIRM, purpose="marketing")
    fresh_unsubscribe = token(ingest, TokenKind.UNSUBSCRIBE)
    async with httpx.AsyncClient(base_url=ingest.url) as client:
        page = await client.get(f"/t/confirm/{stale}")
        confirmed = await client.post(f"/t/confirm/{stale}")
        # Unsubscribe links never expire (mail is read months later).
        with monkeypatch.context() as patch:
            patch.setattr(time, "time", lambda: eight_days_ago)
            old_unsubscribe = token(ingest, TokenKind.UNSUBSCRIBE)
        unsubscribed = await client.post(f"/t/u/{old_unsubscribe}")
    assert (page.status_code, confirmed.status_code) == (404, 404)
    assert unsubscribed.status_code == 200
    assert fresh_unsubscribe != old_unsubscribe
    [event] = values(await read_topic(ingest.bootstrap, ingest.topic, 1, idle=0.5))
    assert event["type"] == "tracking.unsubscribed.v1"
