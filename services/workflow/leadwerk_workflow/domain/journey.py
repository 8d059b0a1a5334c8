"""Journey documents: trigger, steps, settings; validation that names every mistake (pure).

A journey is a small graph: ``start`` names the first step, every step names where to go next.
Waiting steps (``wait``, ``wait_for``) are where an enrollment rests durably; every other step
runs immediately. Validation refuses unknown step references, unreachable steps, cycles that
pass no waiting step, split percentages that do not add up to 100 and templates that do not
exist (when the template list is known).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from leadwerk_platform.conditions import Condition, all_hold, parse_period


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _duration(value: str) -> str:
    parse_period(value)
    return value


def _optional_duration(value: str | None) -> str | None:
    return None if value is None else _duration(value)


class EventMatch(_Strict):
    """Matches a contact activity: its kind (``page``, ``track``, ``email_opened`` …), the
    track event's or page's name, and conditions on its flattened properties."""

    kind: str
    name: Condition | None = None
    where: dict[str, Condition] = Field(default_factory=dict)

    def matches(self, kind: str, name: Any, properties: Mapping[str, Any]) -> bool:
        if kind != self.kind:
            return False
        if self.name is not None and not self.name.test(name):
            return False
        return all_hold(self.where, properties)


class DateTrigger(_Strict):
    """Enter at a date the contact carries as a trait (e.g. ``trial_end``), shifted ``before``
    or ``after`` it. A date without a time means ``at`` o'clock in the contact's time zone."""

    trait: str
    before: str | None = None
    after: str | None = None
    at: str = "09:00"
    _check = field_validator("before", "after")(_optional_duration)

    @model_validator(mode="after")
    def _one_shift(self) -> DateTrigger:
        _clock_time(self.at)
        if self.before is not None and self.after is not None:
            raise ValueError("a date trigger shifts either before or after the date")
        return self

    @property
    def shift(self) -> timedelta:
        if self.before is not None:
            return -parse_period(self.before)
        return parse_period(self.after) if self.after is not None else timedelta(0)


TRIGGERS = ("event", "form", "stage", "score_at_least", "segment", "date", "inactive_for")


class Trigger(_Strict):
    """Exactly one of: an event, a form, a stage change, a score threshold, a segment-style
    condition on the contact becoming true, a date trait, a silence of the contact for a
    duration (``inactive_for``), or manual enrollment only."""

    event: EventMatch | None = None
    form: str | None = None  # form id (a form_submitted activity)
    stage: str | None = None  # the stage the contact moved to
    score_at_least: float | None = None  # crossing this score upwards
    #: Conditions on the contact (traits, score, grade, rating, stage) that become true.
    segment: dict[str, Condition] | None = Field(None, min_length=1)
    date: DateTrigger | None = None
    #: No activity of the contact's own (visits, events, opens, clicks, forms) for this long.
    inactive_for: str | None = None
    manual: bool = False

    _inactive = field_validator("inactive_for")(_optional_duration)

    @model_validator(mode="after")
    def _exactly_one(self) -> Trigger:
        chosen = [name for name in TRIGGERS
                  if getattr(self, name) is not None] + (["manual"] if self.manual else [])
        if len(chosen) != 1:
            raise ValueError(f"a trigger names exactly one of {', '.join(TRIGGERS)}, manual "
                             f"(got {', '.join(chosen) or 'none'})")
        return self

    @property
    def timed(self) -> bool:
        """Date and silence triggers fire from durable timers, not from a message."""
        return self.date is not None or self.inactive_for is not None

    @property
    def armed_at_activation(self) -> bool:
        """Triggers that timers fire for the contacts already known when the journey becomes
        active: date and silence, and a segment's current members (they will not come to
        match: they match already)."""
        return self.timed or self.segment is not None


class Sender(_Strict):
    """Who a journey's mail comes from: the contact's owner unless the step says otherwise
    (the seed documents want every automated mail from the assigned rep); the mailer falls
    back to the workspace's sender for a contact without an owner. ``default``: always the
    workspace's sender; ``fixed``: ``address``."""

    kind: Literal["fixed", "owner", "default"] = "owner"
    address: str | None = None

    @model_validator(mode="after")
    def _fixed_needs_address(self) -> Sender:
        if self.kind == "fixed" and not self.address:
            raise ValueError("a fixed sender needs an address")
        return self


class WaitStep(_Strict):
    type: Literal["wait"]
    duration: str
    next: str
    _check = field_validator("duration")(_duration)


WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def _workdays() -> list[Weekday]:
    return ["mon", "tue", "wed", "thu", "fri"]


def _clock_time(value: str) -> str:
    hours, _, minutes = value.partition(":")
    if not (hours.isdigit() and minutes.isdigit() and int(hours) < 24 and int(minutes) < 60):
        raise ValueError(f"time {value!r}: use HH:MM")
    return value


class Window(_Strict):
    """Weekdays and a time of day, in the contact's time zone (trait ``timezone``)."""

    days: list[Weekday] = Field(default_factory=_workdays, min_length=1)
    start: str = "09:00"
    end: str = "17:00"
    _times = field_validator("start", "end")(_clock_time)

    @model_validator(mode="after")
    def _ordered(self) -> Window:
        if self.start >= self.end:
            raise ValueError("a window's start must be before its end (same day)")
        return self


class WaitWindowStep(_Strict):
    """Wait until the contact's local time is inside a window (e.g. business hours)."""

    type: Literal["wait_window"]
    window: Window = Field(default_factory=Window)
    next: str


class QuietHours(_Strict):
    """No marketing email between ``start`` and ``end`` (local time; may span midnight)."""

    start: str = "20:00"
    end: str = "08:00"
    _times = field_validator("start", "end")(_clock_time)


class WaitForStep(_Strict):
    type: Literal["wait_for"]
    event: EventMatch
    timeout: str
    on_event: str
    on_timeout: str
    _check = field_validator("timeout")(_duration)


class ConditionStep(_Strict):
    type: Literal["condition"]
    when: dict[str, Condition]  # on the contact: traits by name, score, grade, rating, stage
    then: str
    otherwise: str = Field(alias="else")


class Branch(_Strict):
    name: str
    percent: int = Field(ge=0, le=100)
    next: str


class SplitStep(_Strict):
    type: Literal["split"]
    branches: list[Branch] = Field(min_length=2)


class SendEmailStep(_Strict):
    type: Literal["send_email"]
    template: str
    sender: Sender = Field(default_factory=Sender)
    transactional: bool = False
    next: str


class NotifyStep(_Strict):
    """An internal alert: to the contact's ``owner``, the owner's ``manager`` (from the
    teams configuration) or an address."""

    type: Literal["notify"]
    template: str
    to: str = "owner"
    next: str


class Sla(_Strict):
    """Speed to lead: sales should respond within ``within``, counted in ``business_hours``
    (the sales team's window in ``timezone``; ``null`` counts around the clock). A response
    is a stage sales sets (accepted, qualified, won, rejected …). Without one in time the
    enrollment goes to ``on_breach`` (escalation steps), or on to ``next`` when none is set."""

    within: str = "1h"
    business_hours: Window | None = Field(default_factory=Window)
    timezone: str = "Europe/Berlin"
    on_breach: str | None = None
    _check = field_validator("within")(_duration)


class HandoffStep(_Strict):
    """Hand the contact to sales (a CRM command) and start the speed-to-lead clock; the
    enrollment rests here until sales responds or the SLA passes (``sla: null``: go on)."""

    type: Literal["handoff"]
    reason: str = "hand-off to sales"
    sla: Sla | None = Field(default_factory=Sla)
    next: str


class ChangeStageStep(_Strict):
    type: Literal["change_stage"]
    stage: Literal["lead", "mql", "sal", "sql", "customer", "recycled", "disqualified"]
    reason: str | None = None
    next: str

    @model_validator(mode="after")
    def _reason(self) -> ChangeStageStep:
        if self.stage in {"recycled", "disqualified"} and not self.reason:
            raise ValueError(f"moving a contact to {self.stage} needs a reason")
        return self


class AdjustScoreStep(_Strict):
    type: Literal["adjust_score"]
    points: float
    reason: str
    next: str


class SetTraitStep(_Strict):
    type: Literal["set_trait"]
    traits: dict[str, Any] = Field(min_length=1)
    next: str


class TagStep(_Strict):
    type: Literal["tag"]
    add: list[str] = Field(default_factory=list)
    remove: list[str] = Field(default_factory=list)
    next: str


class WebhookStep(_Strict):
    """Call a webhook through the crm-bridge (signed; private addresses refused there)."""

    type: Literal["webhook"]
    url: str = Field(pattern=r"^https?://")
    event: str = "journey.step"
    next: str


class Territory(_Strict):
    when: dict[str, Condition]  # on the contact (traits such as country, postal code)
    owner: str


class AssignOwnerStep(_Strict):
    """Give the contact an owner: the first matching territory rule, else the strategy
    (``fixed``: ``owner``; ``round_robin``: the next of the reps; ``fair``: the rep with the
    fewest leads over ``period``, and among those the one whose average rating this lead
    balances best). The reps are ``reps`` or the members of ``team`` (teams configuration:
    sales reps or partners). ``exclude_current`` skips the present owner (reassignment).
    The owner becomes the contact's ``owner`` trait (through scoring) and the sender of owner
    mails."""

    type: Literal["assign_owner"]
    territories: list[Territory] = Field(default_factory=list)
    strategy: Literal["fixed", "round_robin", "fair"] = "fixed"
    owner: str | None = None
    reps: list[str] = Field(default_factory=list)
    team: str | None = None
    period: str = "30d"
    exclude_current: bool = False
    next: str
    _check = field_validator("period")(_duration)

    @model_validator(mode="after")
    def _complete(self) -> AssignOwnerStep:
        if self.strategy == "fixed" and not self.owner:
            raise ValueError("a fixed assignment needs an owner")
        if self.strategy != "fixed" and not self.reps and not self.team:
            raise ValueError(f"{self.strategy} needs reps or a team")
        if self.reps and self.team:
            raise ValueError("name either reps or a team, not both")
        return self


class EndStep(_Strict):
    type: Literal["end"]


Step = Annotated[WaitStep | WaitWindowStep | WaitForStep | ConditionStep | SplitStep | SendEmailStep
                 | NotifyStep | HandoffStep | ChangeStageStep | AdjustScoreStep | SetTraitStep
                 | TagStep | WebhookStep | AssignOwnerStep | EndStep,
                 Field(discriminator="type")]
#: Steps that ask scoring to change the contact (through ``contact-commands``).
CONTACT_CHANGES = (ChangeStageStep, AdjustScoreStep, SetTraitStep, TagStep)


def rests(step: Any) -> bool:
    """Steps that always rest: waits, waits for an event, hand-offs with an SLA. A
    ``wait_window`` does not count: inside its window it goes on at once, so a loop through
    it alone could spin."""
    return isinstance(step, WaitStep | WaitForStep) or (
        isinstance(step, HandoffStep) and step.sla is not None)


class Settings(_Strict):
    #: "never", "always" or a cool-down duration such as "30d".
    reentry: str = "never"
    exit_on_unsubscribe: bool = True
    #: A step due longer ago than this (after an outage) follows ``stale_policy``.
    stale_after: str = "1d"
    stale_policy: Literal["run", "skip", "end"] = "skip"
    #: Marketing email that falls into these hours waits until they end.
    quiet_hours: QuietHours | None = None

    @field_validator("reentry")
    @classmethod
    def _reentry(cls, value: str) -> str:
        if value not in {"never", "always"}:
            parse_period(value)
        return value

    _check = field_validator("stale_after")(_duration)

    @property
    def cooldown(self) -> timedelta | None:
        return None if self.reentry in {"never", "always"} else parse_period(self.reentry)


class Journey(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    name: str
    version: int = 0
    trigger: Trigger
    start: str
    steps: dict[str, Step]
    settings: Settings = Field(default_factory=Settings)
    #: Leave the journey, wherever the contact is, once this holds for the contact
    #: (traits by name, score, grade, rating, stage).
    goal: dict[str, Condition] | None = None

    def step(self, step_id: str) -> Any:
        return self.steps[step_id]


@dataclass(frozen=True)
class Problem:
    location: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"location": self.location, "message": self.message}


def successors(step: Any) -> Iterator[tuple[str, str]]:
    """(field, target step) for every edge leaving ``step``."""
    for name in ("next", "then", "on_event", "on_timeout"):
        target = getattr(step, name, None)
        if target is not None:
            yield name, target
    if isinstance(step, HandoffStep) and step.sla is not None and step.sla.on_breach:
        yield "sla.on_breach", step.sla.on_breach
    if isinstance(step, ConditionStep):
        yield "else", step.otherwise
    if isinstance(step, SplitStep):
        for index, branch in enumerate(step.branches):
            yield f"branches.{index}.next", branch.next


def parse(document: Mapping[str, Any], templates: set[str] | None = None,
          teams: set[str] | None = None) -> tuple[Journey | None, list[Problem]]:
    """Parse and validate; the journey only when there is no problem at all. ``templates``
    and ``teams``, when known, are the names steps may refer to."""
    try:
        journey = Journey.model_validate(document)
    except ValidationError as error:
        return None, [Problem(".".join(str(p) for p in e["loc"]) or "(document)", e["msg"])
                      for e in error.errors()]
    problems = check(journey, templates, teams)
    return (None if problems else journey), problems


def check(journey: Journey, templates: set[str] | None = None,
          teams: set[str] | None = None) -> list[Problem]:
    problems: list[Problem] = []
    if journey.start not in journey.steps:
        problems.append(Problem("start", f"unknown step {journey.start!r}"))
    for step_id, step in journey.steps.items():
        for field, target in successors(step):
            if target not in journey.steps:
                problems.append(Problem(f"steps.{step_id}.{field}",
                                        f"unknown step {target!r}"))
        if isinstance(step, SplitStep) and sum(b.percent for b in step.branches) != 100:
            problems.append(Problem(f"steps.{step_id}.branches",
                                    "branch percentages must add up to 100"))
        if templates is not None and isinstance(step, SendEmailStep | NotifyStep) \
                and step.template not in templates:
            problems.append(Problem(f"steps.{step_id}.template",
                                    f"missing template {step.template!r}"))
        if teams is not None and isinstance(step, AssignOwnerStep) and step.team \
                and step.team not in teams:
            problems.append(Problem(f"steps.{step_id}.team", f"unknown team {step.team!r}"))
    if problems:
        return problems
    reachable = _reachable(journey)
    problems += [Problem(f"steps.{s}", "unreachable from start")
                 for s in journey.steps if s not in reachable]
    cycle = _cycle_without_wait(journey)
    if cycle:
        problems.append(Problem(f"steps.{cycle[0]}",
                                "cycle without a wait: " + " → ".join([*cycle, cycle[0]])))
    return problems


def _reachable(journey: Journey) -> set[str]:
    seen: set[str] = set()
    todo = [journey.start]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo += [t for _, t in successors(journey.steps[current])]
    return seen


def _cycle_without_wait(journey: Journey) -> list[str] | None:
    """A loop through immediate steps only would run forever in one go."""
    immediate = {s for s, step in journey.steps.items() if not rests(step)}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for _, target in successors(journey.steps[node]):
            if target not in immediate:
                continue
            if state.get(target) == 1:
                return path[path.index(target):]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(immediate):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None
