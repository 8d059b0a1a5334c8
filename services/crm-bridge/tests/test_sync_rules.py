"""Pure sync rules: activities in words, the hand-off summary, HubSpot's field mapping and
webhook reading, its request signature, the circuit breaker."""

from __future__ import annotations

import base64
import hashlib
import hmac

from leadwerk_crm_bridge.config import ActivityRule, Config, Connector
from leadwerk_crm_bridge.domain import hubspot
from leadwerk_crm_bridge.domain.breaker import Breaker
from leadwerk_crm_bridge.domain.sync import activity_view, label_for, summary
from leadwerk_platform.settings import Environment, repository_root

RULES = [ActivityRule.model_validate(r) for r in (
    {"type": "track", "event": "Document Downloaded", "label": "downloaded {properties.document}"},
    {"type": "page", "where": {"page.path": {"prefix": "/pricing"}},
     "label": "viewed the pricing page"},
)]
HUBSPOT = Connector(id="hubspot", workspace="dev", kind="hubspot", url="https://api.hubapi.com",
                    owners={"anna@example.de": "501"}, fields={"industry": None,
                                                               "budget": "budget_eur"})


def test_only_activities_a_rule_names_reach_the_crm_in_words() -> None:
    download = activity_view({"kind": "track", "name": "Document Downloaded",
                              "properties": {"properties.document": "pricing.pdf"}})
    pricing = activity_view({"kind": "page", "properties": {"page.path": "/pricing/pro"}})
    careers = activity_view({"kind": "page", "properties": {"page.path": "/karriere"}})
    assert label_for(download, RULES) == "downloaded pricing.pdf"
    assert label_for(pricing, RULES) == "viewed the pricing page"
    assert label_for(careers, RULES) is None


def test_the_summary_counts_repeats_newest_first() -> None:
    assert summary(["downloaded the pricing sheet", "watched the demo video",
                    "downloaded the pricing sheet"]) == \
        "downloaded the pricing sheet twice, watched the demo video"
    assert summary(["visited"] * 3) == "visited 3 times"
    assert summary([]) == ""


def test_hubspot_properties_follow_the_mapping_as_strings() -> None:
    contact = {"traits": {"email": "a@b.de", "first_name": "Anna", "industry": "Retail",
                          "budget": 5000.0, "company.annual_revenue": 2500000},
               "score": 120.0, "grade": "B", "rating": "B2", "stage": "sql",
               "owner": "anna@example.de"}
    upsert = hubspot.upsert_input(HUBSPOT, contact, "d-1")
    assert upsert is not None
    assert upsert["id"] == "a@b.de"
    assert upsert["idProperty"] == "email"
    assert upsert["properties"] == {
        "email": "a@b.de", "firstname": "Anna", "budget_eur": "5000",
        "annualrevenue": "2500000", "leadwerk_score": "120", "leadwerk_grade": "B",
        "leadwerk_rating": "B2", "lifecyclestage": "salesqualifiedlead",
        "hs_lead_status": "IN_PROGRESS", "hubspot_owner_id": "501"}
    assert hubspot.upsert_input(HUBSPOT, {"traits": {"first_name": "X"}}, "d-2") is None


def _event(name: str, value: str, event_id: int = 1) -> dict[str, object]:
    return {"eventId": event_id, "subscriptionType": "contact.propertyChange",
            "objectId": 7001, "propertyName": name, "propertyValue": value,
            "occurredAt": 1_700_000_000_000}


def test_hubspot_changes_read_as_verdicts_owner_and_traits() -> None:
    won = hubspot.change(HUBSPOT, _event("lifecyclestage", "customer"))
    assert won is not None
    assert (won.status, won.hubspot_id) == ("won", "7001")
    rejected = hubspot.change(HUBSPOT, _event("hs_lead_status", "BAD_TIMING"))
    assert rejected is not None
    assert (rejected.status, rejected.reason) == ("rejected", "BAD_TIMING")
    owner = hubspot.change(HUBSPOT, _event("hubspot_owner_id", "501"))
    assert owner is not None
    assert owner.traits == {"owner": "anna@example.de"}
    budget = hubspot.change(HUBSPOT, _event("budget_eur", "7000"))
    assert budget is not None
    assert budget.traits == {"budget": "7000"}
    # Our own updates echoed back, and what Leadwerk computes itself, change nothing.
    assert hubspot.change(HUBSPOT, _event("lifecyclestage", "marketingqualifiedlead")) is None
    assert hubspot.change(HUBSPOT, _event("leadwerk_score", "5")) is None
    assert hubspot.change(HUBSPOT, _event("industry", "Retail")) is None  # mapping dropped it
    assert hubspot.change(HUBSPOT, {**_event("x", "y"), "subscriptionType": "deal.creation"}) \
        is None


def test_hubspot_v3_signatures_are_checked_with_age() -> None:
    body, uri, stamp = b'[{"eventId": 1}]', "https://crm.example/webhooks/dev/hubspot", \
        "1700000000000"
    digest = base64.b64encode(hmac.new(b"secret", b"POST" + uri.encode() + body
                                       + stamp.encode(), hashlib.sha256).digest()).decode()

    def valid(secret: str = "secret", payload: bytes = body,  # noqa: S107 - a test key
              now_ms: int = 1_700_000_060_000
              ) -> bool:
        return hubspot.signature_valid(secret, method="POST", uri=uri, body=payload,
                                       timestamp=stamp, signature=digest, now_ms=now_ms)

    assert valid()
    assert not valid(secret="other")
    assert not valid(payload=b"[]")
    assert not valid(now_ms=1_700_000_000_000 + 301_000)


def test_the_breaker_opens_after_failures_probes_once_and_closes_on_success() -> None:
    breaker = Breaker(threshold=3, cooldown=10.0, longest=25.0)
    for now in (0.0, 1.0):
        breaker.record(False, now)
        assert breaker.wait(now) == 0.0
    breaker.record(False, 2.0)
    assert breaker.is_open
    assert breaker.wait(5.0) == 7.0
    assert breaker.wait(12.0) == 0.0  # the probe
    assert breaker.wait(12.5) > 0  # only one at a time
    breaker.record(False, 13.0)  # the probe failed: twice the pause
    assert breaker.wait(14.0) == 19.0
    assert breaker.wait(33.0) == 0.0
    breaker.record(False, 33.0)
    assert breaker.wait(34.0) == 24.0  # at most ``longest``
    assert breaker.wait(58.0) == 0.0
    breaker.record(True, 58.0)
    assert not breaker.is_open
    assert breaker.wait(58.0) == 0.0


def test_production_never_lets_webhooks_reach_private_addresses() -> None:
    """The shipped configuration (in the image too) allows it for the local demo only."""
    config = Config.load(repository_root() / "config")
    assert config.private_webhooks(Environment.DEVELOPMENT) == {"dev"}
    assert config.private_webhooks(Environment.PRODUCTION) == frozenset()
