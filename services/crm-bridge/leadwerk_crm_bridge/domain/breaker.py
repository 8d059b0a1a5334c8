"""A circuit breaker per endpoint (pure; the caller passes the time): after ``threshold``
failures in a row the endpoint is left alone for a cool-down (doubling while it keeps failing,
up to ``longest``), then one request probes it; a success closes the circuit."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Breaker:
    threshold: int = 5
    cooldown: float = 5.0
    longest: float = 300.0
    failures: int = 0
    open_until: float | None = None
    probing: bool = False
    _pause: float = 0.0

    def wait(self, now: float) -> float:
        """Seconds until a request may go to the endpoint (0: now). A half-open circuit
        lets exactly one probe through."""
        if self.open_until is None:
            return 0.0
        if now < self.open_until:
            return self.open_until - now
        if self.probing:
            return self.cooldown
        self.probing = True
        return 0.0

    def record(self, ok: bool, now: float) -> None:
        if ok:
            self.failures, self.open_until, self.probing, self._pause = 0, None, False, 0.0
            return
        self.failures += 1
        if self.probing or self.failures >= self.threshold:
            self._pause = min(self.longest, self._pause * 2 if self._pause else self.cooldown)
            self.open_until = now + self._pause
            self.probing = False

    @property
    def is_open(self) -> bool:
        return self.open_until is not None
