"""``/sdk.js`` in a real headless Chromium: a page on another origin loads the script from
ingest, and what the browser sends is checked where it lands, on the Kafka topic.

Needs Debian's Chromium at /usr/bin/chromium (``apt-get install chromium``); Playwright's own
browser downloads are never used.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright
from playwright.async_api import Request as BrowserRequest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from leadwerk_platform.testing.helpers import read_topic, serve_app, values

from .conftest import WRITE_KEY, RunningIngest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.integration,
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason=f"needs Chromium at {CHROMIUM} (apt-get install chromium)"),
]

#: The queue stub a page puts before the async script tag (methods that queue, Segment-style).
STUB = """<script>
  window.leadwerk = window.leadwerk || [];
  ['init', 'page', 'track', 'identify', 'reset', 'consent'].forEach(function (m) {
    leadwerk[m] = leadwerk[m] || function () {
      leadwerk.push([m].concat([].slice.call(arguments)));
    };
  });
</script>"""


#: ``site(pages)`` publishes ``{name: html}`` and returns the site's base URL.
Site = Callable[[dict[str, str]], str]


def html(body: str) -> str:
    return f"<!doctype html><html><head><title>SDK test</title></head><body>{body}</body></html>"


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    created = await browser.new_context()
    try:
        yield created
    finally:
        await created.close()


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    """Serve HTML pages on their own port under ``localhost``: another origin *and* another
    site than ingest on ``127.0.0.1``, so CORS applies and ingest never sees the page's
    cookies."""
    pages: dict[str, str] = {}

    async def serve(request: Request) -> Response:
        found = pages.get(request.path_params["name"])
        return HTMLResponse(found) if found is not None else Response(status_code=404)

    app = Starlette(routes=[Route("/{name}", serve)])
    async with serve_app(app) as url:
        base = url.replace("127.0.0.1", "localhost")

        def publish(new_pages: dict[str, str]) -> str:
            pages.update(new_pages)
            return base

        yield publish


async def open_page(context: BrowserContext, url: str) -> Page:
    page = await context.new_page()
    await page.goto(url)
    await page.wait_for_function("() => window.leadwerk && window.leadwerk.VERSION")
    return page


async def cookie(context: BrowserContext, name: str = "lw_aid") -> str | None:
    return next((c.get("value") for c in await context.cookies() if c.get("name") == name), None)


async def local_storage(page: Page) -> dict[str, str]:
    result: dict[str, str] = await page.evaluate("() => ({...window.localStorage})")
    return result


async def nothing_arrives(ingest: RunningIngest, idle: float = 1.5) -> None:
    records = await read_topic(ingest.bootstrap, ingest.topic, 0, timeout=idle + 1, idle=idle)
    assert values(records) == []


@pytest.mark.parametrize("transport", ["beacon", "fetch"])
async def test_page_view_queued_track_and_identify(
        transport: str, ingest: RunningIngest, context: BrowserContext, site: Site) -> None:
    if transport == "fetch":  # the fallback when sendBeacon is missing
        await context.add_init_script("delete Navigator.prototype.sendBeacon")
    sent: list[BrowserRequest] = []
    context.on("request", lambda r: sent.append(r) if "/v1/" in r.url else None)
    base = site({"tracked": html(STUB + f"""
<script>leadwerk.track('Signed Up', {{plan: 'pro'}});</script>
<script async src="{ingest.url}/sdk.js" data-write-key="{WRITE_KEY}"></script>""")})
    page = await open_page(context, f"{base}/tracked?utm_source=newsletter&utm_campaign=launch")
    await page.evaluate("() => leadwerk.identify('u-42', {email: 'ada@example.com'})")

    events = values(await read_topic(ingest.bootstrap, ingest.topic, 3, idle=0.3))
    by_type = {e["type"]: e["data"] for e in events}
    assert len(events) == 3
    assert set(by_type) == {"tracking.page.v1", "tracking.track.v1", "tracking.identify.v1"}
    anonymous_id = await cookie(context)
    assert anonymous_id
    assert len(anonymous_id) == 36
    assert {d["anonymous_id"] for d in by_type.values()} == {anonymous_id}
    assert (await local_storage(page))["lw_aid"] == anonymous_id

    viewed = by_type["tracking.page.v1"]
    assert viewed["user_id"] is None
    assert viewed["properties"]["path"] == "/tracked"
    assert viewed["context"]["page"]["title"] == "SDK test"
    assert viewed["context"]["library"]["name"] == "leadwerk.js"
    assert viewed["context"]["campaign"] == {"source": "newsletter", "name": "launch"}
    assert viewed["campaign"]["source"] == "newsletter"
    assert "HeadlessChrome" in viewed["context"]["userAgent"]
    assert by_type["tracking.track.v1"]["event"] == "Signed Up"
    assert by_type["tracking.track.v1"]["properties"] == {"plan": "pro"}
    identified = by_type["tracking.identify.v1"]
    assert identified["user_id"] == "u-42"
    assert identified["traits"] == {"email": "ada@example.com"}
    assert (await local_storage(page))["lw_uid"] == "u-42"
    assert len({e["id"] for e in events}) == 3
    # Simple requests (text/plain, no Authorization: ingest accepted them, so the write key was
    # in the body), hence no CORS preflight.
    assert sorted(r.url.rsplit("/", 1)[1] for r in sent) == ["identify", "page", "track"]
    for request in sent:
        assert request.method == "POST"
        assert request.resource_type == ("ping" if transport == "beacon" else "fetch")
        assert request.headers["content-type"].startswith("text/plain")
        assert "authorization" not in request.headers


@pytest.mark.parametrize("signal", [
    "Object.defineProperty(Navigator.prototype, 'globalPrivacyControl', {get: () => true})",
    "Object.defineProperty(Navigator.prototype, 'doNotTrack', {get: () => '1'})",
], ids=["gpc", "dnt"])
async def test_privacy_signals_send_and_store_nothing(
        signal: str, ingest: RunningIngest, context: BrowserContext,
        site: Site) -> None:
    await context.add_init_script(signal)
    base = site({"private": html(STUB + f"""
<script>leadwerk.track('Queued');</script>
<script async src="{ingest.url}/sdk.js" data-write-key="{WRITE_KEY}"></script>""")})
    page = await open_page(context, f"{base}/private")
    await page.evaluate("""() => { leadwerk.track('Clicked'); leadwerk.identify('u-1');
                                   leadwerk.consent(true); leadwerk.page(); }""")
    await nothing_arrives(ingest)
    assert await context.cookies() == []
    assert await local_storage(page) == {}


async def test_consent_required_sends_only_after_consent(
        ingest: RunningIngest, context: BrowserContext,
        site: Site) -> None:
    base = site({"consent": html(STUB + f"""
<script>
  leadwerk.init({{writeKey: '{WRITE_KEY}', consentRequired: true}});
  leadwerk.track('Before Load');
</script>
<script async src="{ingest.url}/sdk.js"></script>""")})
    page = await open_page(context, f"{base}/consent")
    await page.evaluate("() => { leadwerk.track('Before Consent'); leadwerk.identify('u-7'); }")
    await nothing_arrives(ingest, idle=1.0)
    assert await context.cookies() == []
    assert await local_storage(page) == {}

    await page.evaluate("() => { leadwerk.consent(true); leadwerk.track('After Consent'); }")
    events = values(await read_topic(ingest.bootstrap, ingest.topic, 2, idle=0.5))
    assert sorted(e["type"] for e in events) == ["tracking.page.v1", "tracking.track.v1"]
    assert [e["data"]["event"] for e in events if "event" in e["data"]] == ["After Consent"]
    anonymous_id = await cookie(context)
    assert anonymous_id
    assert {e["data"]["anonymous_id"] for e in events} == {anonymous_id}
    assert all(e["data"]["user_id"] is None for e in events)
    assert (await local_storage(page))["lw_consent"] == "granted"

    await page.evaluate("() => leadwerk.consent(false)")
    assert await cookie(context) is None
    assert await local_storage(page) == {"lw_consent": "denied"}


async def test_form_submission_carries_the_anonymous_id(
        ingest: RunningIngest, context: BrowserContext,
        site: Site) -> None:
    base = site({"ebook": html(f"""
<script async src="{ingest.url}/sdk.js" data-write-key="{WRITE_KEY}"></script>
<form data-leadwerk-form="ebook-download">
  <input name="email" type="email"> <input name="first_name">
  <input name="website" style="display:none">
  <label><input type="checkbox" name="consent_marketing" value="on"> Yes</label>
  <button type="submit">Download</button>
</form>""")})
    page = await open_page(context, f"{base}/ebook")
    # The automatic page view first, so the form post is the second record.
    [viewed] = values(await read_topic(ingest.bootstrap, ingest.topic, 1))
    await page.fill("input[name=email]", "Ada@Example.com")
    await page.fill("input[name=first_name]", "Ada")
    await page.check("input[name=consent_marketing]")
    async with page.expect_response(lambda r: "/f/ebook-download" in r.url) as posted:
        await page.click("button[type=submit]")
    response = await posted.value
    assert response.request.method == "POST"
    assert response.url == f"{ingest.url}/f/ebook-download"
    assert response.status == 303  # to the form's thank-you page

    events = values(await read_topic(ingest.bootstrap, ingest.topic, 2))
    [submitted] = [e for e in events if e["type"] == "tracking.form_submitted.v1"]
    data = submitted["data"]
    anonymous_id = await cookie(context)
    assert anonymous_id
    assert data["anonymous_id"] == anonymous_id == viewed["data"]["anonymous_id"]
    assert data["form_id"] == "ebook-download"
    assert data["email"] == "ada@example.com"
    assert data["traits"] == {"email": "ada@example.com", "first_name": "Ada"}
    assert data["consents"][0]["given"] is True
    assert data["context"]["page"]["url"] == f"{base}/ebook"
    assert len(data["message_id"]) == 36
