"""The declarative scoring model and the pure scoring arithmetic.

A model (YAML in ``config/scoring-model.yaml``, replaceable through the API, versioned) has:

* engagement rules: which activity earns (or loses) how many points, with an optional cap per
  period; points decay with a half-life, computed exactly from the time they were earned;
* bands that cut the engagement score (1, 2, 3 …) and fit rules that grade the profile (A, B,
  C …) from traits; the rating combines both ("B1");
* the lifecycle thresholds: MQL at a score with required traits, back to lead (hysteresis)
  when decay brings the score below a lower threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from leadwerk_platform.conditions import Condition, all_hold, parse_period

VISIT = "visit"  # the virtual activity type of a session's first event



class Cap(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    times: int = Field(gt=0)
    per: str = "1d"

    @field_validator("per")
    @classmethod
    def _valid_period(cls, value: str) -> str:
        parse_period(value)
        return value

    @property
    def period(self) -> timedelta:
        return parse_period(self.per)


class EngagementRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    description: str = ""
    type: str  # activity kind: page, track, form_submitted, email_clicked …, or "visit"
    event: Condition | None = None  # the track event's (or page's) name
    where: dict[str, Condition] = Field(default_factory=dict)  # dotted fields of the activity
    points: float
    cap: Cap | None = None

    def matches(self, activity: Mapping[str, Any]) -> bool:
        if activity.get("type") != self.type:
            return False
        if self.event is not None and not self.event.test(activity.get("event")):
            return False
        return all_hold(self.where, activity)


class Band(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    band: int
    below: float | None = None  # the last band has no upper limit


class FitRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    grade: str = Field(pattern=r"^[A-Z]$")
    when: dict[str, Condition]  # all must hold (traits by dotted name)


class Engagement(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    half_life_days: float | None = Field(None, gt=0)
    rules: list[EngagementRule]

    @field_validator("rules")
    @classmethod
    def _unique_ids(cls, rules: list[EngagementRule]) -> list[EngagementRule]:
        ids = [rule.id for rule in rules]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"rule ids must be unique: {', '.join(duplicates)}")
        return rules


class Fit(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    default_grade: str = Field("C", pattern=r"^[A-Z]$")
    rules: list[FitRule] = Field(default_factory=list)  # first match wins


class Mql(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    score_at_least: float = 100
    required_traits: list[str] = Field(default_factory=lambda: ["email"])
    downgrade_below: float = 50

    @model_validator(mode="after")
    def _hysteresis(self) -> Mql:
        if self.downgrade_below >= self.score_at_least:
            raise ValueError("downgrade_below must be lower than score_at_least (hysteresis)")
        return self


class Lifecycle(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    mql: Mql = Field(default_factory=Mql)


class ScoringModel(BaseModel):
    """A whole model; ``version`` is assigned when it is stored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = 0
    engagement: Engagement
    bands: list[Band]
    fit: Fit = Field(default_factory=Fit)
    lifecycle: Lifecycle = Field(default_factory=Lifecycle)

    @field_validator("bands")
    @classmethod
    def _ordered_bands(cls, bands: list[Band]) -> list[Band]:
        if not bands or bands[-1].below is not None:
            raise ValueError("the last band must have no 'below' (it takes every higher score)")
        limits = [b.below for b in bands[:-1]]
        if any(limit is None for limit in limits) or limits != sorted(limits):  # type: ignore[type-var]
            raise ValueError("bands must be ordered by 'below', ascending")
        return bands

    def band(self, score: float) -> int:
        for band in self.bands:
            if band.below is None or score < band.below:
                return band.band
        return self.bands[-1].band  # pragma: no cover - the validator guarantees a last band

    def grade(self, traits: Mapping[str, Any]) -> str:
        for rule in self.fit.rules:
            if all_hold(rule.when, traits):
                return rule.grade
        return self.fit.default_grade

    @property
    def half_life(self) -> timedelta | None:
        days = self.engagement.half_life_days
        return timedelta(days=days) if days else None


def rating(grade: str, band: int) -> str:
    return f"{grade}{band}"


def decayed(value: float, since: datetime, until: datetime, half_life: timedelta | None) -> float:
    """``value`` earned at ``since``, as it counts at ``until`` (exact exponential decay)."""
    if half_life is None or value == 0:
        return value
    elapsed = (until - since) / half_life
    return value * math.pow(0.5, elapsed)


def add_points(score: float, score_at: datetime | None, points: float, at: datetime,
               half_life: timedelta | None) -> tuple[float, datetime]:
    """Add ``points`` earned at ``at`` to a score kept as (value, as-of time).

    The result is as of the later of the two times, so events arriving out of order give the
    same score as in order.
    """
    if score_at is None:
        return points, at
    if at >= score_at:
        return decayed(score, score_at, at, half_life) + points, at
    return score + decayed(points, at, score_at, half_life), score_at


def falls_below_at(score: float, score_at: datetime, threshold: float,
                   half_life: timedelta | None) -> datetime | None:
    """When decay brings ``score`` under ``threshold`` (``None``: never, or already under)."""
    if half_life is None or score < threshold or threshold <= 0:
        return None
    return score_at + half_life * math.log2(score / threshold) + timedelta(microseconds=1)


def cap_window(rule: EngagementRule, at: datetime) -> datetime | None:
    """Start of the fixed cap window ``at`` falls into (windows aligned to the epoch)."""
    if rule.cap is None:
        return None
    period = rule.cap.period.total_seconds()
    start = math.floor(at.timestamp() / period) * period
    return datetime.fromtimestamp(start, tz=at.tzinfo)


Stage = Literal["visitor", "lead", "mql", "sal", "sql", "customer", "recycled", "disqualified"]
