"""Local-time rules for contacts: business-hour windows and quiet hours (pure)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from leadwerk_workflow.domain.journey import WEEKDAYS, QuietHours, Window

DEFAULT_TIMEZONE = "Europe/Berlin"


def zone(name: object, default: str = DEFAULT_TIMEZONE) -> ZoneInfo:
    """The contact's time zone (trait ``timezone``), else the default."""
    if isinstance(name, str) and name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    return ZoneInfo(default)


def _at(value: str) -> time:
    hours, minutes = value.split(":")
    return time(int(hours), int(minutes))


def next_in_window(now: datetime, window: Window, tz: ZoneInfo) -> datetime:
    """``now`` when it is inside the window, else the window's next start (UTC)."""
    local = now.astimezone(tz)
    start, end = _at(window.start), _at(window.end)
    allowed = {WEEKDAYS.index(d) for d in window.days}
    for offset in range(8):
        day = (local + timedelta(days=offset)).date()
        if day.weekday() not in allowed:
            continue
        opens = datetime.combine(day, start, tzinfo=tz)
        closes = datetime.combine(day, end, tzinfo=tz)
        if offset == 0 and opens <= local < closes:
            return now
        if opens > local:
            return opens.astimezone(UTC)
    msg = "no window day within a week"  # unreachable: days is never empty
    raise ValueError(msg)


def quiet_until(now: datetime, quiet: QuietHours, tz: ZoneInfo) -> datetime | None:
    """When the quiet hours around ``now`` end (UTC), or ``None`` outside them."""
    local = now.astimezone(tz)
    start, end = _at(quiet.start), _at(quiet.end)
    moment = local.time()
    inside = (start <= moment < end) if start < end else (moment >= start or moment < end)
    if not inside:
        return None
    day = local.date() if moment < end else local.date() + timedelta(days=1)
    return datetime.combine(day, end, tzinfo=tz).astimezone(UTC)


def business_deadline(start: datetime, duration: timedelta, window: Window | None,
                      tz: ZoneInfo) -> datetime:
    """``start`` plus ``duration`` counted only inside ``window`` (around the clock when
    ``None``): one business hour from Friday 16:30 is Monday 09:30."""
    if window is None:
        return start + duration
    remaining, moment = duration, start
    while True:
        moment = next_in_window(moment, window, tz)
        local = moment.astimezone(tz)
        closes = datetime.combine(local.date(), _at(window.end), tzinfo=tz).astimezone(UTC)
        if moment + remaining <= closes:
            return moment + remaining
        remaining -= closes - moment
        moment = closes


def date_value(value: object, at: str, tz: ZoneInfo) -> datetime | None:
    """A date trait as a moment (UTC): ``2026-12-01`` is ``at`` o'clock that day in ``tz``;
    an ISO timestamp without a zone is UTC. ``None`` for anything else."""
    if not isinstance(value, str) or not value:
        return None
    try:
        if len(value) == len("YYYY-MM-DD"):
            return datetime.combine(date.fromisoformat(value), _at(at),
                                    tzinfo=tz).astimezone(UTC)
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
