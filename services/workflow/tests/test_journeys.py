"""Journey validation and the step runner (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from leadwerk_platform.settings import repository_root
from leadwerk_workflow.domain.calendar import (
    business_deadline,
    date_value,
    next_in_window,
    quiet_until,
    zone,
)
from leadwerk_workflow.domain.engine import (
    ContactState,
    EmailCap,
    Load,
    Position,
    advance,
    bucket,
    fair_choice,
    rating_value,
    territory_owner,
)
from leadwerk_workflow.domain.journey import Journey, QuietHours, Window, parse
from leadwerk_workflow.domain.teams import Teams
from leadwerk_workflow.engine import shipped_journeys, shipped_teams
from leadwerk_workflow.migration import MigrationRule, plan

NOW = datetime(2026, 11, 21, 10, tzinfo=UTC)


def journey(steps: dict[str, Any], start: str = "a", **extra: Any) -> dict[str, Any]:
    return {"id": "j", "name": "J", "trigger": {"manual": True}, "start": start,
            "steps": steps, **extra}


def locations(document: dict[str, Any], templates: set[str] | None = None,
              teams: set[str] | None = None) -> dict[str, str]:
    result, problems = parse(document, templates, teams)
    assert result is None
    return {p.location: p.message for p in problems}


def test_every_mistake_is_named_with_its_location() -> None:
    assert locations(journey({"a": {"type": "wait", "duration": "1d", "next": "nowhere"}})) == {
        "steps.a.next": "unknown step 'nowhere'"}
    assert "steps.orphan" in locations(journey({"a": {"type": "end"},
                                                "orphan": {"type": "end"}}))
    cycle = locations(journey({
        "a": {"type": "send_email", "template": "t", "next": "b"},
        "b": {"type": "condition", "when": {"stage": "mql"}, "then": "a", "else": "c"},
        "c": {"type": "end"}}))
    assert any("cycle without a wait" in m for m in cycle.values())
    split = locations(journey({"a": {"type": "split", "branches": [
        {"name": "x", "percent": 60, "next": "b"}, {"name": "y", "percent": 50, "next": "b"}]},
        "b": {"type": "end"}}))
    assert split == {"steps.a.branches": "branch percentages must add up to 100"}
    assert locations(journey({"a": {"type": "send_email", "template": "gone", "next": "b"},
                              "b": {"type": "end"}}), templates={"welcome"}) == {
        "steps.a.template": "missing template 'gone'"}
    unknown_type = locations(journey({"a": {"type": "teleport"}}))
    assert any(key.startswith("steps.a") for key in unknown_type)
    bad_duration = locations(journey({"a": {"type": "wait", "duration": "soon", "next": "a"}}))
    assert any("duration" in m for m in bad_duration.values())
    two_triggers = locations({**journey({"a": {"type": "end"}}),
                              "trigger": {"form": "f", "stage": "mql"}})
    assert any("exactly one" in m for m in two_triggers.values())


def test_a_loop_through_a_wait_is_fine() -> None:
    result, problems = parse(journey({
        "a": {"type": "send_email", "template": "t", "next": "b"},
        "b": {"type": "wait", "duration": "7d", "next": "a"}}))
    assert problems == []
    assert result is not None


def test_the_shipped_journeys_are_valid() -> None:
    shipped = shipped_journeys(Path(repository_root() / "config" / "journeys"))
    assert {name for name, _ in shipped} >= {"welcome.yaml", "whitepaper.yaml",
                                             "mql-handoff.yaml"}
    teams = shipped_teams(repository_root() / "config")
    assert teams.members("inside-sales")
    for _, document in shipped:
        document.pop("status", None)
        assert parse(document, teams=set(teams.teams))[1] == []


def test_the_shipped_whitepaper_sequence_starts_on_white_papers_only() -> None:
    """The pricing sheet is a buying signal for scoring, not a reason to send the white-paper
    mails and an event invitation."""
    shipped = dict(shipped_journeys(Path(repository_root() / "config" / "journeys")))
    document = shipped["whitepaper.yaml"]
    document.pop("status", None)
    event = parsed(document).trigger.event
    assert event is not None
    # The stitcher's flat view of a track event: its properties under ``properties.``.
    for file, starts in (("Whitepaper-KI.pdf", True), ("pricing-sheet.pdf", False)):
        assert event.matches("track", "Document Downloaded",
                             {"properties.document": file}) is starts


def parsed(document: dict[str, Any]) -> Journey:
    result, problems = parse(document)
    assert result is not None, problems
    return result


def test_the_runner_rests_at_waits_and_emits_commands_on_the_way() -> None:
    flow = parsed(journey({
        "a": {"type": "send_email", "template": "hello", "next": "b"},
        "b": {"type": "wait", "duration": "3d", "next": "c"},
        "c": {"type": "condition", "when": {"stage": "mql"}, "then": "d", "else": "e"},
        "d": {"type": "handoff", "sla": None, "next": "e"},
        "e": {"type": "end"}}))
    contact = ContactState("c-1", {"email": "a@x.de"}, stage="lead")
    first = advance(flow, Position(), contact, NOW, enrollment_id="e-1")
    assert [c.step_id for c in first.commands] == ["a"]
    assert (first.position.step, first.position.due_at) == ("b", NOW + timedelta(days=3))
    contact.stage = "mql"
    second = advance(flow, first.position, contact, NOW, enrollment_id="e-1", via="next")
    assert [c.kind for c in second.commands] == ["handoff"]
    assert second.position.state == "completed"
    assert [e.action for e in second.history] == ["condition", "handoff", "end"]
    assert "stage='mql'" in second.history[0].reason


def test_stale_steps_are_recorded_not_sent() -> None:
    flow = parsed(journey({"a": {"type": "wait", "duration": "1d", "next": "b"},
                           "b": {"type": "send_email", "template": "late", "next": "c"},
                           "c": {"type": "end"}}))
    resting = advance(flow, Position(), ContactState("c"), NOW, enrollment_id="e").position
    late = advance(flow, resting, ContactState("c"), NOW, enrollment_id="e", via="next",
                   suppress=True)
    assert late.commands == []
    assert late.history[0].action == "skipped"


def test_splits_are_stable_per_contact_and_follow_the_percentages() -> None:
    flow = parsed(journey({"a": {"type": "split", "branches": [
        {"name": "A", "percent": 30, "next": "b"}, {"name": "B", "percent": 70, "next": "b"}]},
        "b": {"type": "end"}}))
    chosen = [advance(flow, Position(), ContactState("c"), NOW,
                      enrollment_id=f"e-{n}").position.branches["a"] for n in range(2000)]
    share = chosen.count("A") / len(chosen)
    assert 0.26 < share < 0.34
    assert bucket("e-7", "a") == bucket("e-7", "a")


@pytest.mark.parametrize("reentry", ["never", "always", "30d"])
def test_reentry_settings_parse(reentry: str) -> None:
    flow = parsed(journey({"a": {"type": "end"}}, settings={"reentry": reentry}))
    assert (flow.settings.cooldown is not None) == (reentry == "30d")


def test_the_frequency_cap_delays_a_marketing_send_until_the_window_frees() -> None:
    flow = parsed(journey({"a": {"type": "send_email", "template": "news", "next": "b"},
                           "b": {"type": "send_email", "template": "receipt",
                                 "transactional": True, "next": "c"},
                           "c": {"type": "end"}}))
    cap = EmailCap(2, timedelta(days=7), [NOW - timedelta(days=6), NOW - timedelta(days=1)])
    held = advance(flow, Position(), ContactState("c"), NOW, enrollment_id="e", cap=cap)
    assert held.commands == []
    assert (held.position.step, held.position.due_at) == ("a", NOW + timedelta(days=1))
    assert held.history[-1].action == "capped"
    later = NOW + timedelta(days=1, seconds=1)
    sent = advance(flow, held.position, ContactState("c"), later, enrollment_id="e",
                   via="self", cap=cap)
    assert [c.step_id for c in sent.commands] == ["a", "b"]  # transactional is never capped
    assert [e.action for e in sent.history] == ["email", "transactional_email", "end"]
    dropped = advance(flow, Position(), ContactState("c"), NOW, enrollment_id="e2",
                      cap=EmailCap(1, timedelta(days=7), [NOW], policy="drop"))
    assert [c.step_id for c in dropped.commands] == ["b"]


def test_contact_change_steps_become_contact_commands() -> None:
    flow = parsed(journey({"a": {"type": "tag", "add": ["vip"], "next": "b"},
                           "b": {"type": "change_stage", "stage": "sal", "next": "c"},
                           "c": {"type": "end"}}))
    outcome = advance(flow, Position(), ContactState("c"), NOW, enrollment_id="e")
    assert [(c.kind, c.step_id) for c in outcome.commands] == [("contact", "a"),
                                                               ("contact", "b")]
    problems = locations(journey({"a": {"type": "change_stage", "stage": "recycled",
                                        "next": "b"}, "b": {"type": "end"}}))
    assert any("needs a reason" in m for m in problems.values())


def test_business_hour_windows_in_the_contacts_time_zone() -> None:
    window = Window(days=["mon", "tue", "wed", "thu", "fri"], start="09:00", end="17:00")
    berlin = zone("Europe/Berlin")
    saturday_noon = datetime(2026, 11, 21, 11, tzinfo=UTC)  # 12:00 in Berlin, a Saturday
    assert next_in_window(saturday_noon, window, berlin) == datetime(2026, 11, 23, 8,
                                                                     tzinfo=UTC)
    monday_ten = datetime(2026, 11, 23, 9, tzinfo=UTC)
    assert next_in_window(monday_ten, window, berlin) == monday_ten
    new_york = zone("America/New_York")
    assert next_in_window(monday_ten, window, new_york) == datetime(2026, 11, 23, 14,
                                                                    tzinfo=UTC)
    assert zone("Not/AZone").key == "Europe/Berlin"


def test_quiet_hours_hold_marketing_until_morning() -> None:
    flow = parsed(journey({"a": {"type": "send_email", "template": "news", "next": "b"},
                           "b": {"type": "end"}},
                          settings={"quiet_hours": {"start": "20:00", "end": "08:00"}}))
    late = datetime(2026, 11, 23, 22, tzinfo=UTC)  # 23:00 in Berlin
    held = advance(flow, Position(), ContactState("c"), late, enrollment_id="e")
    assert held.commands == []
    assert held.position.due_at == datetime(2026, 11, 24, 7, tzinfo=UTC)  # 08:00 Berlin
    morning = advance(flow, held.position, ContactState("c"), held.position.due_at,
                      enrollment_id="e", via="self")
    assert [c.step_id for c in morning.commands] == ["a"]
    windowed = parsed(journey({"a": {"type": "wait_window", "next": "b"},
                               "b": {"type": "end"}}))
    rest = advance(windowed, Position(), ContactState("c", {"timezone": "Europe/Berlin"}),
                   late, enrollment_id="e")
    assert (rest.position.step, rest.position.due_at) == (
        "a", datetime(2026, 11, 24, 8, tzinfo=UTC))
    assert quiet_until(datetime(2026, 11, 23, 12, tzinfo=UTC), QuietHours(),
                       zone(None)) is None


def test_owner_assignment_needs_what_its_strategy_uses() -> None:
    assert any("needs an owner" in m for m in locations(journey({
        "a": {"type": "assign_owner", "next": "b"}, "b": {"type": "end"}})).values())
    assert any("needs reps or a team" in m for m in locations(journey({
        "a": {"type": "assign_owner", "strategy": "round_robin", "next": "b"},
        "b": {"type": "end"}})).values())
    flow = parsed(journey({"a": {"type": "assign_owner", "owner": "x@example.de",
                                 "territories": [{"when": {"country": "AT"},
                                                  "owner": "wien@example.at"}],
                                 "next": "b"}, "b": {"type": "end"}}))
    step = flow.step("a")
    assert territory_owner(step, ContactState("c", {"country": "AT"})) == "wien@example.at"
    assert territory_owner(step, ContactState("c", {"country": "DE"})) is None


def test_a_handoff_waits_on_its_sla_in_business_hours_and_escalates_on_breach() -> None:
    flow = parsed(journey({
        "a": {"type": "handoff", "reason": "MQL",
              "sla": {"within": "1h", "on_breach": "tell-manager"}, "next": "done"},
        "tell-manager": {"type": "notify", "template": "sla-breach", "to": "manager",
                         "next": "done"},
        "done": {"type": "end"}}))
    friday_afternoon = datetime(2026, 11, 27, 15, 30, tzinfo=UTC)  # 16:30 in Berlin
    rest = advance(flow, Position(), ContactState("c"), friday_afternoon, enrollment_id="e")
    assert [c.kind for c in rest.commands] == ["handoff"]
    # Half an hour left on Friday, the other half on Monday from 09:00 Berlin (08:00 UTC).
    assert (rest.position.step, rest.position.due_at, rest.position.waiting_for) == (
        "a", datetime(2026, 11, 30, 8, 30, tzinfo=UTC), "sales_response")
    accepted = advance(flow, rest.position, ContactState("c"), friday_afternoon,
                       enrollment_id="e", via="next")
    assert (accepted.commands, accepted.position.state) == ([], "completed")
    breached = advance(flow, rest.position, ContactState("c"), friday_afternoon,
                       enrollment_id="e", via="on_breach")
    assert [c.step_id for c in breached.commands] == ["tell-manager"]
    # Without an escalation step the breach is recorded by the adapter and the journey goes on.
    quiet = parsed(journey({"a": {"type": "handoff", "next": "b"}, "b": {"type": "end"}}))
    resting = advance(quiet, Position(), ContactState("c"), NOW, enrollment_id="e").position
    assert advance(quiet, resting, ContactState("c"), NOW, enrollment_id="e",
                   via="on_breach").position.state == "completed"
    # A handoff that only waits for sales still needs a way out of a loop: a cycle through it
    # is fine, one through an SLA-less hand-off is not.
    loop = locations(journey({"a": {"type": "handoff", "sla": None, "next": "a"}}))
    assert any("cycle without a wait" in m for m in loop.values())


def test_business_deadlines_count_only_the_window() -> None:
    berlin = zone(None)
    monday_nine = datetime(2026, 11, 23, 8, tzinfo=UTC)
    assert business_deadline(monday_nine, timedelta(hours=10), Window(), berlin) == \
        datetime(2026, 11, 24, 10, tzinfo=UTC)  # 8 h Monday, 2 h Tuesday from 09:00
    saturday = datetime(2026, 11, 28, 12, tzinfo=UTC)
    assert business_deadline(saturday, timedelta(hours=1), Window(), berlin) == \
        datetime(2026, 11, 30, 9, tzinfo=UTC)
    assert business_deadline(saturday, timedelta(hours=1), None, berlin) == \
        saturday + timedelta(hours=1)


def test_fair_distribution_balances_counts_first_then_average_rating() -> None:
    reps = ["anna", "jonas", "mia"]
    loads: dict[str, Load] = {}
    leads = ["A3", "D1", "D1", "A3", "B2", "C1", "A3", "D1", "B2"] * 4
    for rating in leads:
        owner, reason = fair_choice(reps, loads, rating_value(rating))
        assert reason.startswith("fair:")
        load = loads.get(owner, Load())
        loads[owner] = Load(load.count + 1, load.total + rating_value(rating))
    counts = [loads[r].count for r in reps]
    averages = [loads[r].total / loads[r].count for r in reps]
    assert max(counts) - min(counts) <= 1
    overall = sum(rating_value(r) for r in leads) / len(leads)
    assert all(abs(a - overall) < 0.5 for a in averages), averages
    # Round robin on the same leads would give one rep every A3 (positions 0, 3, 6).
    robin = [sum(rating_value(r) for r in leads[i::3]) / len(leads[i::3]) for i in range(3)]
    assert max(robin) - min(robin) > max(averages) - min(averages)
    # Equal counts: a strong lead goes to the rep whose leads were weakest, ties by order.
    even = {"anna": Load(2, 10.0), "jonas": Load(2, 4.0), "mia": Load(3, 3.0)}
    assert fair_choice(reps, even, rating_value("A3"))[0] == "jonas"
    assert fair_choice(reps, even, rating_value("D1"))[0] == "anna"
    assert fair_choice(reps, {}, 0.0)[0] == "anna"
    assert (rating_value("A3"), rating_value("B1"), rating_value("D1"), rating_value(None)) \
        == (6.0, 3.0, 1.0, 0.0)


def test_teams_name_members_and_the_manager_escalations_go_to() -> None:
    teams = Teams.from_document({
        "teams": {"inside": {"manager": "boss@x.de", "members": ["a@x.de", "b@x.de"]},
                  "partners": {"members": ["p@partner.example"]}},
        "default_manager": "head@x.de"})
    assert teams.members("inside") == ["a@x.de", "b@x.de"]
    assert teams.manager_of("b@x.de") == "boss@x.de"
    assert teams.manager_of("p@partner.example") == "head@x.de"  # team without a manager
    assert teams.manager_of(None) == "head@x.de"
    assert locations(journey({"a": {"type": "assign_owner", "strategy": "fair",
                                    "team": "nobody", "next": "b"}, "b": {"type": "end"}}),
                     teams={"inside"}) == {"steps.a.team": "unknown team 'nobody'"}


@pytest.mark.parametrize(("trigger", "valid"), [
    ({"segment": {"rating": {"in": ["A1", "A2", "A3"]}, "country": "DE"}}, True),
    ({"date": {"trait": "trial_end", "before": "3d"}}, True),
    ({"date": {"trait": "trial_end", "before": "3d", "after": "1d"}}, False),
    ({"date": {"trait": "trial_end", "at": "9 am"}}, False),
    ({"inactive_for": "90d"}, True),
    ({"inactive_for": "a while"}, False),
    ({"segment": {}}, False),
    ({"inactive_for": "90d", "form": "f"}, False),
])
def test_segment_date_and_silence_triggers(trigger: dict[str, Any], valid: bool) -> None:
    result, problems = parse({**journey({"a": {"type": "end"}}), "trigger": trigger})
    assert (result is not None) == valid, problems
    if result is not None:
        assert result.trigger.timed == ("segment" not in trigger)


def test_date_traits_become_moments_in_the_contacts_time_zone() -> None:
    berlin = zone("Europe/Berlin")
    assert date_value("2026-12-01", "09:00", berlin) == datetime(2026, 12, 1, 8, tzinfo=UTC)
    assert date_value("2026-12-01T10:00:00+01:00", "09:00", berlin) == \
        datetime(2026, 12, 1, 9, tzinfo=UTC)
    assert date_value("2026-12-01T10:00:00", "09:00", berlin) == \
        datetime(2026, 12, 1, 10, tzinfo=UTC)
    assert date_value("next week", "09:00", berlin) is None
    assert date_value(20261201, "09:00", berlin) is None


def test_a_migration_rule_maps_every_resting_step_or_names_what_does_not() -> None:
    old = parsed(journey({"a": {"type": "wait", "duration": "1d", "next": "b"},
                          "b": {"type": "wait_for", "event": {"kind": "email_opened"},
                                "timeout": "3d", "on_event": "c", "on_timeout": "c"},
                          "c": {"type": "end"}}))
    new = parsed({**journey({"a": {"type": "wait", "duration": "2d", "next": "opened"},
                             "opened": {"type": "wait_for", "event": {"kind": "email_clicked"},
                                        "timeout": "3d", "on_event": "c", "on_timeout": "c"},
                             "c": {"type": "end"}}), "version": 2})
    mapping, problems = plan(old, new, {"a", "b"}, MigrationRule(from_version=1,
                                                                 steps={"b": "opened"}))
    assert (mapping, problems) == ({"a": "a", "b": "opened"}, [])
    _, problems = plan(old, new, {"a", "b"}, MigrationRule(from_version=1))
    assert problems == [{"location": "steps.b",
                         "message": "version 2 has no step 'b'; map it in steps"}]
    _, problems = plan(old, new, {"b"}, MigrationRule(from_version=1, steps={"b": "a"}))
    assert problems[0]["message"] == "'a' in version 2 is a wait step, not a wait_for"
