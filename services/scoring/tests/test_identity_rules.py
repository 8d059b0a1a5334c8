"""The identity rules, one test each, on the pure resolver."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from leadwerk_scoring.domain.identity import (
    ANONYMOUS,
    EMAIL,
    USER,
    Claims,
    ContactView,
    Identifier,
    Resolution,
    claims_from,
    clean_id,
    device_contact_id,
    normalise_email,
    resolve,
)

NOW = datetime(2026, 11, 21, 10, tzinfo=UTC)
WS = "dev"


def contact(contact_id: str, *identifiers: Identifier, age_days: int = 1) -> ContactView:
    return ContactView(contact_id, NOW - timedelta(days=age_days), frozenset(identifiers))


def email(value: str) -> Identifier:
    return Identifier(EMAIL, value)


def user(value: str) -> Identifier:
    return Identifier(USER, value)


def device(value: str) -> Identifier:
    return Identifier(ANONYMOUS, value)


def run(claims: Claims, known: dict[Identifier, ContactView],
        token: ContactView | None = None) -> Resolution | None:
    return resolve(WS, claims, known, token_contact=token, now=NOW, new_id="new")


def test_an_anonymous_device_is_its_own_lightweight_contact() -> None:
    resolution = run(Claims(device="d1"), {})
    assert resolution is not None
    assert resolution.contact_id == device_contact_id(WS, "d1")
    assert not resolution.known
    assert not resolution.create
    assert resolution.link == []


def test_identifying_a_device_promotes_its_anonymous_history() -> None:
    resolution = run(Claims(device="d1", strong=(email("a@x.de"),)), {})
    assert resolution is not None
    assert resolution.contact_id == device_contact_id(WS, "d1")  # same id: nothing moves
    assert resolution.create
    assert resolution.merges == []
    assert set(resolution.link) == {email("a@x.de"), device("d1")}


def test_the_same_email_on_a_second_device_joins_that_devices_history() -> None:
    anna = contact("c-anna", email("a@x.de"), device("d1"))
    resolution = run(Claims(device="d2", strong=(email("a@x.de"),)), {email("a@x.de"): anna})
    assert resolution is not None
    assert resolution.contact_id == "c-anna"
    [merge] = resolution.merges
    assert (merge.survivor, merge.merged, merge.reason) == (
        "c-anna", device_contact_id(WS, "d2"), "device")
    assert device("d2") in resolution.link


def test_a_shared_device_switches_between_two_people_and_never_merges_them() -> None:
    anna = contact("c-anna", user("u-anna"), device("kiosk"))
    ben = contact("c-ben", user("u-ben"))
    resolution = run(Claims(device="kiosk", strong=(user("u-ben"),)),
                     {device("kiosk"): anna, user("u-ben"): ben})
    assert resolution is not None
    assert resolution.contact_id == "c-ben"
    assert resolution.merges == []
    assert resolution.switched_device
    assert resolution.link == [device("kiosk")]


def test_a_second_email_on_a_known_device_makes_a_new_contact_not_a_merge() -> None:
    anna = contact("c-anna", email("anna@x.de"), device("family-pc"))
    resolution = run(Claims(device="family-pc", strong=(email("ben@x.de"),)),
                     {device("family-pc"): anna})
    assert resolution is not None
    assert resolution.contact_id == "new"
    assert resolution.create
    assert resolution.merges == []
    assert resolution.switched_device


def test_two_user_ids_named_by_one_event_are_not_merged() -> None:
    anna = contact("c-anna", user("u-anna"), email("anna@x.de"))
    ben = contact("c-ben", user("u-ben"))
    resolution = run(Claims(strong=(user("u-ben"), email("anna@x.de"))),
                     {user("u-ben"): ben, email("anna@x.de"): anna})
    assert resolution is not None
    assert resolution.contact_id == "c-ben"
    assert resolution.merges == []
    assert resolution.conflicts


def test_a_login_on_a_device_known_by_email_only_joins_the_user_id() -> None:
    anna = contact("c-anna", email("anna@x.de"), device("d1"))
    resolution = run(Claims(device="d1", strong=(user("u-anna"),)), {device("d1"): anna})
    assert resolution is not None
    assert resolution.contact_id == "c-anna"
    assert resolution.link == [user("u-anna")]
    assert not resolution.create


def test_the_older_contact_survives_a_merge() -> None:
    old = contact("c-old", email("anna@x.de"), age_days=30)
    young = contact("c-young", user("u-anna"), age_days=1)
    resolution = run(Claims(strong=(user("u-anna"), email("anna@x.de"))),
                     {user("u-anna"): young, email("anna@x.de"): old})
    assert resolution is not None
    assert resolution.contact_id == "c-old"
    assert [(m.survivor, m.merged) for m in resolution.merges] == [("c-old", "c-young")]


def test_alias_merges_explicitly_even_across_user_ids() -> None:
    old = contact("c-1", user("old-id"), age_days=10)
    new = contact("c-2", user("new-id"))
    resolution = run(Claims(strong=(user("new-id"),), alias_of="old-id"),
                     {user("old-id"): old, user("new-id"): new})
    assert resolution is not None
    assert [(m.survivor, m.merged, m.reason) for m in resolution.merges] == [
        ("c-1", "c-2", "alias")]


def test_alias_of_an_anonymous_id_brings_that_history() -> None:
    resolution = run(Claims(strong=(user("u-1"),), alias_of="anon-7"), {})
    assert resolution is not None
    assert resolution.contact_id == device_contact_id(WS, "anon-7")
    assert resolution.create


def test_a_token_names_the_contact_and_links_the_device() -> None:
    anna = contact("c-anna", email("anna@x.de"))
    resolution = run(Claims(device="d9", token_contact="c-anna"), {}, token=anna)
    assert resolution is not None
    assert resolution.contact_id == "c-anna"
    assert resolution.link == [device("d9")]


def test_an_event_naming_nobody_is_not_kept() -> None:
    assert run(Claims(), {}) is None


@pytest.mark.parametrize("value", [None, "", " ", "null", "NULL", "undefined", "0", "-1",
                                   "anonymous", "Guest", "[object Object]", "n/a", "000",
                                   "00000000-0000-0000-0000-000000000000", True, {}, []])
def test_placeholders_are_not_identifiers(value: object) -> None:
    assert clean_id(value) is None
    claims = claims_from("tracking.identify.v1", {"user_id": value, "anonymous_id": value,
                                                  "traits": {"email": "null"}})
    assert claims.strong == ()
    assert claims.device is None


def test_emails_are_normalised() -> None:
    assert normalise_email("  Anna.Schmidt@Example.DE ") == "anna.schmidt@example.de"
    assert normalise_email("not-an-email") is None
    assert normalise_email("a@b") is None


def test_claims_of_identify_form_and_token_events() -> None:
    identify = claims_from("tracking.identify.v1", {
        "user_id": "crm-4711", "anonymous_id": "d1",
        "traits": {"email": "Anna@X.de", "customer_number": "K-100"}}, declared=["customer_number"])
    assert identify.device == "d1"
    assert identify.strong == (user("crm-4711"), email("anna@x.de"),
                               Identifier("customer_number", "K-100"))
    form = claims_from("tracking.form_submitted.v1", {"anonymous_id": "d1",
                                                      "email": "anna@x.de"})
    assert form.strong == (email("anna@x.de"),)
    page = claims_from("tracking.page.v1", {"anonymous_id": "d1",
                                            "traits": {"email": "anna@x.de"}})
    assert page.strong == ()  # only identity events say who someone is
    click = claims_from("tracking.email_clicked.v1", {"contact_id": "c-anna"})
    assert click.token_contact == "c-anna"
