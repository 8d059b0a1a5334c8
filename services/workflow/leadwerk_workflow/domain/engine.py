"""Running a journey for one enrollment (pure): from where it rests to where it rests next.

The adapter calls :func:`advance` when an enrollment starts, when its timer falls due and when
the event it waits for arrives; it stores the new position and sends the commands through the
outbox in the same transaction.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from leadwerk_platform.conditions import all_hold, parse_period
from leadwerk_workflow.domain.calendar import next_in_window, quiet_until, zone
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
                quiet = journey.settings.quiet_hours
                hold = quiet_until(now, quiet, zone(contact.traits.get("timezone"))) \
                    if quiet is not None and isinstance(step, SendEmailStep) \
                    and not step.transactional and not suppress else None
                if hold is not None:
                    history.append(Entry(current, "quiet_hours",
                                         f"delayed until {hold.isoformat()}"))
                    outcome.position.step, outcome.position.due_at = current, hold
                    return outcome
                if _effect(step, current, visit, outcome, now, suppress=suppress, cap=cap):
                    return outcome  # delayed by the frequency cap: rests at this step
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
    target: str = getattr(journey.step(position.step), via)
    return target


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
