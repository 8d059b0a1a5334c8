"""Durable timers kept in Postgres rows, fired without polling on an interval.

A :class:`DueTimer` handles whatever is due (``run_due``), asks when the next thing falls due
(``next_due``) and sleeps exactly until then, or until :meth:`wake` says something new may be
due earlier (a row was just written).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import datetime, timedelta

logger = logging.getLogger(__name__)


class DueTimer(ABC):
    def __init__(self, clock: Callable[[], datetime], *, batch: int,
                 max_sleep: float = 60.0, retry_after: float = 5.0) -> None:
        """``batch``: the most ``run_due`` handles per call (a full batch runs again at once);
        ``max_sleep`` bounds a sleep, so rows written by other processes are seen in time."""
        self._clock = clock
        self._batch = batch
        self._max_sleep = max_sleep
        self._retry_after = retry_after
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    @abstractmethod
    async def run_due(self) -> int:
        """Handle what is due now (at most ``batch``); return how many."""

    @abstractmethod
    async def next_due(self) -> datetime | None:
        """The earliest moment something falls due, or ``None``."""

    async def run(self) -> None:
        while True:
            try:
                while await self.run_due() >= self._batch:
                    pass
                delay = await self._delay()
            except Exception:
                logger.exception("%s failed; retrying", type(self).__name__)
                delay = self._retry_after
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _delay(self) -> float:
        due = await self.next_due()
        if due is None:
            return self._max_sleep
        seconds: float = (due - self._clock()) / timedelta(seconds=1)
        return min(max(seconds, 0.01), self._max_sleep)
