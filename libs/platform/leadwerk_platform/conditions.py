"""Declarative conditions on values, shared by every rule language (scoring rules, journey
triggers and branches): ``{prefix: /karriere}``, ``{gte: 50000000}``, or a bare scalar for
equality."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class Condition(BaseModel):
    """One test on a value; a bare scalar in YAML means ``equals``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    equals: Any = None
    in_: list[Any] | None = Field(None, alias="in")
    prefix: str | None = None
    contains: str | None = None
    gte: float | None = None
    gt: float | None = None
    lte: float | None = None
    lt: float | None = None
    exists: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _scalar(cls, value: Any) -> Any:
        return value if isinstance(value, dict) else {"equals": value}

    def test(self, value: Any) -> bool:  # noqa: PLR0911 - one early exit per operator
        if self.exists is not None and (value is not None) != self.exists:
            return False
        if value is None:
            return self.exists is True or self.exists is False
        if self.equals is not None and value != self.equals:
            return False
        if self.in_ is not None and value not in self.in_:
            return False
        if self.prefix is not None and not str(value).startswith(self.prefix):
            return False
        if self.contains is not None and self.contains.lower() not in str(value).lower():
            return False
        bounds = (self.gte, self.gt, self.lte, self.lt)
        if any(b is not None for b in bounds):
            number = _number(value)
            if number is None:
                return False
            gte, gt, lte, lt = bounds
            return ((gte is None or number >= gte) and (gt is None or number > gt)
                    and (lte is None or number <= lte) and (lt is None or number < lt))
        return True


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value).replace("_", ""))
    except ValueError:
        return None


def all_hold(conditions: Mapping[str, Condition], values: Mapping[str, Any]) -> bool:
    """Every condition holds for the value of its (dotted) field name."""
    return all(condition.test(values.get(name)) for name, condition in conditions.items())


def parse_period(text: str) -> timedelta:
    """``90s``, ``30m``, ``12h``, ``3d``, ``2w`` → a duration."""
    try:
        value = timedelta(seconds=float(text[:-1]) * _UNITS[text[-1]])
    except (KeyError, ValueError, IndexError, TypeError) as error:
        msg = f"duration {text!r}: use a number and s, m, h, d or w (e.g. 3d)"
        raise ValueError(msg) from error
    if value <= timedelta(0):
        raise ValueError(f"duration {text!r} must be positive")
    return value
