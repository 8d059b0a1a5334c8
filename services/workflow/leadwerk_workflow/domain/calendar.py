"""Local-time rules for contacts: business-hour windows and quiet hours (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
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
