"""An outbound rate limit shared by the services that call other systems (SMTP relays, CRM
APIs): it waits, it never drops."""

from __future__ import annotations

import asyncio
import time
from collections import deque


class RateLimit:
    """At most ``per_second`` calls (smoothly spaced) and at most ``window`` calls in any
    ``window_seconds`` (rolling), e.g. SMTP's per hour or HubSpot's 100 per 10 seconds. Zero
    turns a limit off. One instance per process and destination."""

    def __init__(self, per_second: float = 0.0, window: int = 0,
                 window_seconds: float = 3600.0) -> None:
        self._interval = 1.0 / per_second if per_second else 0.0
        self._window = window
        self._window_seconds = window_seconds
        self._next = 0.0
        self._recent: deque[float] = deque()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            now = time.monotonic()
            if self._interval:
                wait = self._next - now
                if wait > 0:
                    await asyncio.sleep(wait)
                    now = time.monotonic()
                self._next = max(now, self._next) + self._interval
            if self._window:
                while self._recent and self._recent[0] <= now - self._window_seconds:
                    self._recent.popleft()
                if len(self._recent) >= self._window:
                    await asyncio.sleep(self._recent[0] + self._window_seconds - now)
                    self._recent.popleft()
                self._recent.append(time.monotonic())
