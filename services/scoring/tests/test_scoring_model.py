"""The scoring model and lifecycle rules (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from leadwerk_platform.settings import repository_root
from leadwerk_scoring.adapters.config import default_model
from leadwerk_scoring.domain import lifecycle
from leadwerk_scoring.domain.model import (
    ScoringModel,
    add_points,
    cap_window,
    decayed,
    falls_below_at,
    rating,
)

T0 = datetime(2026, 11, 21, 10, tzinfo=UTC)


@pytest.fixture(scope="module")
def model() -> ScoringModel:
    return default_model(Path(repository_root() / "config"))


def points_for(model: ScoringModel, activity: dict[str, object]) -> list[tuple[str, float]]:
    return [(r.id, r.points) for r in model.engagement.rules if r.matches(activity)]


def test_the_seed_example_is_b1_with_50_points(model: ScoringModel) -> None:
    visit = points_for(model, {"type": "visit"})
    download = points_for(model, {"type": "track", "event": "Document Downloaded"})
    video = points_for(model, {"type": "track", "event": "Video Playback Started"})
    assert (visit, download, video) == ([("website-visit", 5)], [("document-download", 15)],
                                        [("video-started", 30)])
    score = sum(p for _, p in visit + download + video)
    grade = model.grade({"company.annual_revenue": 5_000_000})
    assert rating(grade, model.band(score)) == "B1"
    assert score == 50


def test_grades_and_bands_follow_the_seed_thresholds(model: ScoringModel) -> None:
    assert model.grade({"company.annual_revenue": 50_000_000}) == "A"
    assert model.grade({"company.annual_revenue": "2000000"}) == "B"
    assert model.grade({"company.annual_revenue": 1_999_999}) == "C"
    assert model.grade({}) == "C"
    assert [model.band(s) for s in (0, 99.9, 100, 199, 200, 1000)] == [1, 1, 2, 2, 3, 3]


def test_negative_points_and_conditions_on_fields(model: ScoringModel) -> None:
    assert points_for(model, {"type": "page", "page.path": "/karriere/jobs"}) == [
        ("careers-page", -10)]
    assert points_for(model, {"type": "page", "page.path": "/produkte"}) == []


def test_decay_is_exact_and_order_independent() -> None:
    half_life = timedelta(days=10)
    assert decayed(100, T0, T0 + half_life, half_life) == pytest.approx(50)
    in_order = add_points(*add_points(0, None, 30, T0, half_life), 20, T0 + half_life,
                          half_life)
    reverse = add_points(*add_points(0, None, 20, T0 + half_life, half_life), 30, T0,
                         half_life)
    assert in_order[1] == reverse[1]
    assert in_order[0] == pytest.approx(reverse[0])
    assert in_order[0] == pytest.approx(35)


@given(st.lists(st.tuples(st.integers(-50, 50), st.integers(0, 10_000)), min_size=1,
                max_size=20))
def test_any_arrival_order_gives_the_same_score(events: list[tuple[int, int]]) -> None:
    half_life = timedelta(days=30)

    def total(items: list[tuple[int, int]]) -> float:
        score, at = 0.0, None
        for points, minutes in items:
            score, at = add_points(score, at, points, T0 + timedelta(minutes=minutes),
                                   half_life)
        assert at is not None
        return decayed(score, at, T0 + timedelta(days=30), half_life)

    assert total(events) == pytest.approx(total(list(reversed(events))), abs=1e-6)


def test_the_moment_decay_crosses_the_lower_threshold() -> None:
    half_life = timedelta(days=10)
    crossing = falls_below_at(200, T0, 50, half_life)
    assert crossing is not None
    assert abs(crossing - (T0 + 2 * half_life)) < timedelta(seconds=1)
    assert decayed(200, T0, crossing, half_life) < 50
    assert falls_below_at(40, T0, 50, half_life) is None
    assert falls_below_at(200, T0, 50, None) is None


def test_cap_windows_are_fixed(model: ScoringModel) -> None:
    rule = next(r for r in model.engagement.rules if r.id == "email-click")
    start = cap_window(rule, T0 + timedelta(hours=5))
    assert start == datetime(2026, 11, 21, tzinfo=UTC)


def test_invalid_models_name_the_problem(model: ScoringModel) -> None:
    document = model.model_dump(by_alias=True, exclude_none=True)
    document["bands"] = [{"below": 200, "band": 2}, {"below": 100, "band": 1}, {"band": 3}]
    with pytest.raises(ValidationError, match="ordered"):
        ScoringModel.model_validate(document)
    document = model.model_dump(by_alias=True, exclude_none=True)
    document["lifecycle"] = {"mql": {"score_at_least": 50, "downgrade_below": 60}}
    with pytest.raises(ValidationError, match="hysteresis"):
        ScoringModel.model_validate(document)
    document = model.model_dump(by_alias=True, exclude_none=True)
    document["engagement"]["rules"].append(document["engagement"]["rules"][0])
    with pytest.raises(ValidationError, match="unique"):
        ScoringModel.model_validate(document)


def test_round_trip_through_json(model: ScoringModel) -> None:
    again = ScoringModel.model_validate_json(model.model_dump_json(by_alias=True,
                                                                   exclude_none=True))
    assert again == model


def test_lifecycle_transitions(model: ScoringModel) -> None:
    full = {"email": "a@x.de", "company": "X"}
    assert lifecycle.on_identified("visitor") == lifecycle.Transition("visitor", "lead",
                                                                      "identified")
    assert lifecycle.on_score("lead", 120, full, model).to_stage == "mql"  # type: ignore[union-attr]
    assert lifecycle.on_score("lead", 120, {"email": "a@x.de"}, model) is None  # data missing
    # 100 points earned over a few minutes have decayed a hair below 100: still shown as 100.
    assert lifecycle.on_score("lead", 99.9999, full, model) is not None
    assert lifecycle.on_score("lead", 99.99, full, model) is None
    assert lifecycle.on_score("mql", 60, full, model) is None  # hysteresis band
    downgrade = lifecycle.on_score("mql", 40, full, model)
    assert downgrade is not None
    assert (downgrade.to_stage, downgrade.cause) == ("lead", "decay")
    accepted = lifecycle.on_feedback("mql", "accepted", None)
    assert accepted is not None
    assert accepted.to_stage == "sal"
    lost = lifecycle.on_feedback("sql", "lost", "budget")
    assert lost is not None
    assert (lost.to_stage, lost.reason) == ("recycled", "budget")
    # Recycled: back to MQL only on engagement earned since (not on the score it had).
    assert lifecycle.on_score("recycled", 120, full, model) is None
    assert lifecycle.on_score("recycled", 120, full, model, fresh=60) is None
    again = lifecycle.on_score("recycled", 150, full, model, fresh=100)
    assert again is not None
    assert (again.from_stage, again.to_stage) == ("recycled", "mql")
    with pytest.raises(lifecycle.TransitionError):
        lifecycle.on_feedback("mql", "maybe", None)
    with pytest.raises(lifecycle.TransitionError, match="reason"):
        lifecycle.manual("mql", "disqualified", None)
    assert lifecycle.has_trait({"company.name": "X"}, "company")
