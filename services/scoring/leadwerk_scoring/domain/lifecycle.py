"""Lead lifecycle stages and their transitions (pure).

visitor → lead (identified) → MQL (score threshold + required traits) → SAL (sales accepted)
→ SQL (sales qualified) → customer; side paths: recycled (rejected or lost, reason kept, back
to nurturing) and disqualified. An MQL whose engagement decays below the lower threshold goes
back to lead (hysteresis: the two thresholds differ, so it does not flap).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from leadwerk_scoring.domain.model import ScoringModel

STAGES = ("visitor", "lead", "mql", "sal", "sql", "customer", "recycled", "disqualified")
_RANK = {"visitor": 0, "lead": 1, "recycled": 1, "mql": 2, "sal": 3, "sql": 4, "customer": 5,
         "disqualified": 1}

#: CRM feedback status → stage (the crm-events contract, ``crm.lead_feedback.v1``).
FEEDBACK_STAGES = {
    "accepted": "sal", "qualified": "sql", "won": "customer",
    "rejected": "recycled", "lost": "recycled", "disqualified": "disqualified",
    "reopened": "lead",
}
_REASON_REQUIRED = frozenset({"recycled", "disqualified"})


class TransitionError(ValueError):
    """A stage change that is not allowed (the API answers 409/422)."""


@dataclass(frozen=True, slots=True)
class Transition:
    from_stage: str
    to_stage: str
    cause: str  # identified | score | decay | crm | api | merge
    reason: str | None = None


def on_identified(stage: str) -> Transition | None:
    return Transition(stage, "lead", "identified") if stage == "visitor" else None


def on_score(stage: str, score: float, traits: Mapping[str, Any], model: ScoringModel, *,
             fresh: float | None = None) -> Transition | None:
    """MQL when the score reaches the threshold with the required traits; back to lead when it
    has decayed below the lower threshold. The score reaches the threshold when it does as
    shown (two decimals, like the API and the bands): 100 points earned a second apart have
    decayed to 99.9999 by the last event, and a lead showing 100 is an MQL.

    A recycled contact (sales rejected it, or the deal was lost) went back to nurturing with
    its score as it was; it becomes an MQL again only on engagement earned since:
    ``fresh``, the points since the recycle as they count now, must reach the threshold too
    (``None``: not known, no promotion)."""
    mql = model.lifecycle.mql
    if stage in {"lead", "recycled"} and qualifies(score, traits, model) and (
            stage == "lead" or (fresh is not None and round(fresh, 2) >= mql.score_at_least)):
        return Transition(stage, "mql", "score")
    if stage == "mql" and score < mql.downgrade_below:
        return Transition(stage, "lead", "decay",
                          f"engagement fell below {mql.downgrade_below:g}")
    return None


def qualifies(score: float, traits: Mapping[str, Any], model: ScoringModel) -> bool:
    """The score as shown reaches the MQL threshold and the required traits are there."""
    mql = model.lifecycle.mql
    return round(score, 2) >= mql.score_at_least and all(
        has_trait(traits, name) for name in mql.required_traits)


def has_trait(traits: Mapping[str, Any], name: str) -> bool:
    """``company`` is present as a plain trait or as any ``company.*`` trait."""
    if traits.get(name) not in (None, ""):
        return True
    prefix = f"{name}."
    return any(key.startswith(prefix) and value not in (None, "")
               for key, value in traits.items())


def on_feedback(stage: str, status: str, reason: str | None) -> Transition | None:
    """Sales' verdict from the CRM. Raises :class:`TransitionError` for an unknown status."""
    target = FEEDBACK_STAGES.get(status)
    if target is None:
        raise TransitionError(f"unknown CRM status {status!r}; "
                              f"expected one of {', '.join(sorted(FEEDBACK_STAGES))}")
    if target == stage:
        return None
    return Transition(stage, target, "crm", reason)


def manual(stage: str, target: str, reason: str | None) -> Transition | None:
    """A stage set through the API."""
    if target not in STAGES or target == "visitor":
        raise TransitionError(f"stage must be one of {', '.join(STAGES[1:])}")
    if stage == "visitor":
        raise TransitionError("an anonymous visitor has no lifecycle stage to change")
    if target in _REASON_REQUIRED and not reason:
        raise TransitionError(f"moving a contact to {target} needs a reason")
    if target == stage:
        return None
    return Transition(stage, target, "api", reason)


def further(a: str, b: str) -> str:
    """The more advanced of two stages (merging two contacts keeps the further one)."""
    return a if _RANK.get(a, 0) >= _RANK.get(b, 0) else b
