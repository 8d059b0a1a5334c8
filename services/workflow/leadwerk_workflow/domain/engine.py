"""Running a journey for one enrollment (pure): from where it rests to where it rests next.

The adapter calls :func:`advance` when an enrollment starts, when its timer falls due and when
the event it waits for arrives; it stores the new position and sends the commands through the
outbox in the same transaction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from leadwerk_platform.conditions import all_hold, parse_period
from leadwerk_workflow.domain.calendar import (
    business_deadline,
    next_in_window,
    quiet_until,
    zone,
)
from leadwerk_workflow.domain.journey import (
    CONTACT_CHANGES,
    AdjustScoreStep,
    AssignOwnerStep,
    Branch,
    ChangeStageStep,
    ConditionStep,
    EndStep,
    HandoffStep,
    Journey,
    NotifyStep,
    SendEmailStep,
    SetTraitStep,
    SplitStep,
    TagStep,
    WaitForStep,
    WaitStep,
    WaitWindowStep,
    WebhookStep,
)

_MAX_STEPS = 200  # validation forbids loops without a wait; this is a second fence
#: Stages only sales sets (CRM feedback or a person): each answers a hand-off's SLA.
SALES_RESPONSES = frozenset({"sal", "sql", "customer", "recycled", "disqualified"})
#: What a hand-off with an SLA waits for (``Position.waiting_for``).
SALES_RESPONSE = "sales_response"


@dataclass
class ContactState:
    """What the workflow knows of a contact (its projection of contact changes)."""

    contact_id: str
    traits: dict[str, Any] = field(default_factory=dict)
    score: float | None = None
    grade: str | None = None
    rating: str | None = None
    stage: str | None = None

    def values(self) -> dict[str, Any]:
        return {**self.traits, "score": self.score, "grade": self.grade,
                "rating": self.rating, "stage": self.stage}


@dataclass(frozen=True)
class Command:
    kind: Literal["email", "notify", "handoff", "contact", "webhook", "assign"]
    step_id: str
    visit: int
    step: Any


@dataclass
class EmailCap:
    """At most ``limit`` marketing emails per contact within ``window``, across journeys;
    ``sent`` holds the recent send times. A capped send waits (``delay``) or is dropped."""

    limit: int
    window: timedelta
    sent: list[datetime] = field(default_factory=list)
    policy: Literal["delay", "drop"] = "delay"

    def free_at(self, now: datetime) -> datetime | None:
        """``None`` when a send is allowed now, else when the window frees a slot."""
        recent = sorted(t for t in self.sent if t > now - self.window)
        if len(recent) < self.limit:
            return None
        return recent[len(recent) - self.limit] + self.window


@dataclass(frozen=True)
class Entry:
    step_id: str
    action: str
    reason: str


@dataclass
class Position:
    step: str | None = None
    due_at: datetime | None = None
    waiting_for: str | None = None  # the activity kind a wait_for step waits for
    state: Literal["active", "completed", "exited"] = "active"
    visits: dict[str, int] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    position: Position
    commands: list[Command] = field(default_factory=list)
    history: list[Entry] = field(default_factory=list)


def bucket(enrollment_id: str, step_id: str) -> int:
    """A stable 0 to 99 per enrollment and split (the same contact always takes the same path)."""
    digest = hashlib.sha256(f"{enrollment_id}\x1f{step_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100


def advance(journey: Journey, position: Position, contact: ContactState, now: datetime, *,
            enrollment_id: str, via: str | None = None, suppress: bool = False,
            cap: EmailCap | None = None) -> Outcome:
    """Run from the start (``via=None``) or out of the resting step along edge ``via``
    (``next`` after a wait, ``on_event`` / ``on_timeout`` after a wait_for, ``self`` to retry
    a send the frequency cap delayed) until the next resting step or the end. With
    ``suppress``, effects are recorded as skipped (stale)."""
    outcome = Outcome(Position(visits=dict(position.visits), branches=dict(position.branches)))
    history = outcome.history
    current = _entry_step(journey, position, via)
    for _ in range(_MAX_STEPS):
        step = journey.step(current)
        visit = outcome.position.visits.get(current, 0) + 1
        outcome.position.visits[current] = visit
        match step:
            case WaitStep():
                due = now + parse_period(step.duration)
                history.append(Entry(current, "wait", f"until {due.isoformat()}"))
                outcome.position.step, outcome.position.due_at = current, due
                return outcome
            case WaitWindowStep():
                due = next_in_window(now, step.window, zone(contact.traits.get("timezone")))
                if due <= now:
                    history.append(Entry(current, "wait_window", "inside the window"))
                    current = step.next
                    continue
                history.append(Entry(current, "wait_window", f"until {due.isoformat()}"))
                outcome.position.step, outcome.position.due_at = current, due
                return outcome
            case WaitForStep():
                due = now + parse_period(step.timeout)
                history.append(Entry(current, "wait_for",
                                     f"{step.event.kind} until {due.isoformat()}"))
                outcome.position.step, outcome.position.due_at = current, due
                outcome.position.waiting_for = step.event.kind
                return outcome
            case ConditionStep():
                holds = all_hold(step.when, contact.values())
                shown = ", ".join(f"{k}={contact.values().get(k)!r}" for k in step.when)
                history.append(Entry(current, "condition",
                                     f"{'then' if holds else 'else'} ({shown})"))
                current = step.then if holds else step.otherwise
            case SplitStep():
                value = bucket(enrollment_id, current)
                chosen = _branch(step, value)
                outcome.position.branches[current] = chosen.name
                history.append(Entry(current, "split", f"branch {chosen.name} (bucket {value})"))
                current = chosen.next
            case (SendEmailStep() | NotifyStep() | HandoffStep() | ChangeStageStep()
                  | AdjustScoreStep() | SetTraitStep() | TagStep() | WebhookStep()
                  | AssignOwnerStep()):
                if _act(journey, step, outcome, contact, current=current, visit=visit,
                        now=now, suppress=suppress, cap=cap):
                    return outcome  # rests at this step
                current = step.next
            case EndStep():
                history.append(Entry(current, "end", "journey complete"))
                outcome.position.step, outcome.position.state = current, "completed"
                return outcome
    msg = f"journey {journey.id} ran {_MAX_STEPS} steps without resting"
    raise RuntimeError(msg)


def _entry_step(journey: Journey, position: Position, via: str | None) -> str:
    if via is None:
        return journey.start
    assert position.step is not None  # noqa: S101 - only resting enrollments resume
    if via == "self":
        return position.step
    step = journey.step(position.step)
    if via == "on_breach":  # a hand-off's SLA passed: escalate, or go on without escalation
        return str(step.sla.on_breach or step.next)
    target: str = getattr(step, via)
    return target


def _act(journey: Journey, step: Any, outcome: Outcome, contact: ContactState, *,
         current: str, visit: int, now: datetime, suppress: bool,
         cap: EmailCap | None) -> bool:
    """Run a step with an effect; ``True`` when the enrollment rests at it (quiet hours,
    the frequency cap, a hand-off waiting on its SLA)."""
    history, quiet = outcome.history, journey.settings.quiet_hours
    hold = quiet_until(now, quiet, zone(contact.traits.get("timezone"))) \
        if quiet is not None and isinstance(step, SendEmailStep) \
        and not step.transactional and not suppress else None
    if hold is not None:
        history.append(Entry(current, "quiet_hours", f"delayed until {hold.isoformat()}"))
        outcome.position.step, outcome.position.due_at = current, hold
        return True
    if _effect(step, current, visit, outcome, now, suppress=suppress, cap=cap):
        return True  # delayed by the frequency cap
    if isinstance(step, HandoffStep) and step.sla is not None and not suppress:
        sla = step.sla
        due = business_deadline(now, parse_period(sla.within), sla.business_hours,
                                zone(sla.timezone))
        history.append(Entry(current, "sla", f"sales to respond by {due.isoformat()} "
                                             f"({sla.within})"))
        outcome.position.step, outcome.position.due_at = current, due
        outcome.position.waiting_for = SALES_RESPONSE
        return True
    return False


def _effect(step: Any, current: str, visit: int, outcome: Outcome, now: datetime, *,
            suppress: bool, cap: EmailCap | None) -> bool:
    """Emit (or skip, or cap) one command; ``True`` when the cap makes the enrollment rest."""
    kind: Literal["email", "notify", "handoff", "contact", "webhook", "assign"] = (
        "email" if isinstance(step, SendEmailStep)
        else "notify" if isinstance(step, NotifyStep)
        else "webhook" if isinstance(step, WebhookStep)
        else "assign" if isinstance(step, AssignOwnerStep)
        else "contact" if isinstance(step, CONTACT_CHANGES) else "handoff")
    marketing = isinstance(step, SendEmailStep) and not step.transactional
    free_at = cap.free_at(now) if cap is not None and marketing and not suppress else None
    if free_at is not None and cap is not None:
        if cap.policy == "delay":
            outcome.history.append(Entry(current, "capped",
                                         f"frequency cap: delayed until {free_at.isoformat()}"))
            outcome.position.step, outcome.position.due_at = current, free_at
            return True
        outcome.history.append(Entry(current, "capped", "frequency cap: dropped"))
        return False
    if suppress:
        outcome.history.append(Entry(current, "skipped", f"{kind}: stale after an outage"))
        return False
    outcome.commands.append(Command(kind, current, visit, step))
    what = (getattr(step, "template", None) or getattr(step, "reason", None)
            or getattr(step, "url", None) or step.type)
    action = ("transactional_email" if kind == "email" and not marketing
              else step.type if kind == "contact" else kind)
    outcome.history.append(Entry(current, action, str(what)))
    if marketing and cap is not None:
        cap.sent.append(now)
    return False


def _branch(step: SplitStep, value: int) -> Branch:
    total = 0
    for branch in step.branches:
        total += branch.percent
        if value < total:
            return branch
    return step.branches[-1]


def territory_owner(step: AssignOwnerStep, contact: ContactState) -> str | None:
    """The owner of the first territory rule the contact matches."""
    for territory in step.territories:
        if all_hold(territory.when, contact.values()):
            return territory.owner
    return None


#: Points of a grade letter in a rating such as "B1" (the digit is the engagement band).
_GRADE_POINTS = {"A": 4, "B": 3, "C": 2, "D": 1}


def rating_value(rating: str | None) -> float:
    """A rating as a number to average: grade points plus the band above 1 (A3 = 6, D1 = 1);
    0 without a rating."""
    if not rating:
        return 0.0
    band = int(rating[1:]) if rating[1:].isdigit() else 1
    return float(_GRADE_POINTS.get(rating[0].upper(), 0) + max(band - 1, 0))


@dataclass(frozen=True)
class Load:
    """A rep's leads over the fairness period: how many, and the sum of their rating values."""

    count: int = 0
    total: float = 0.0


def fair_choice(reps: Sequence[str], loads: Mapping[str, Load], value: float) -> tuple[str, str]:
    """The rep to give a lead of rating ``value``, and why. Counts first: only the reps with
    the fewest leads are eligible. Among them a lead at or above the overall average goes to
    the rep whose leads have been weakest, a lead below it to the one whose leads have been
    strongest, so both the numbers and the average ratings converge. Ties: the order of
    ``reps``."""
    counts = {rep: loads.get(rep, Load()).count for rep in reps}
    fewest = min(counts.values())
    eligible = [rep for rep in reps if counts[rep] == fewest]
    assigned = sum(counts.values())
    overall = sum(loads.get(rep, Load()).total for rep in reps) / assigned if assigned else value

    def average(rep: str) -> float:
        load = loads.get(rep, Load())
        return load.total / load.count if load.count else overall

    chosen = (min if value >= overall else max)(eligible, key=average)
    return chosen, (f"fair: {fewest} leads in the period (fewest of {len(reps)}), "
                    f"average rating {average(chosen):.2f} against {overall:.2f} overall, "
                    f"this lead {value:g}")
