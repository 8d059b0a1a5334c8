"""Token buckets per write key (pure: the clock is passed in)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenBucket:
    rate: float  # tokens per second
    burst: float
    tokens: float = field(default=-1.0)
    updated: float = 0.0

    def take(self, amount: float, now: float) -> float:
        """Take ``amount`` tokens; return 0 on success, else seconds until they would be there
        (``math.inf`` when ``amount`` exceeds the burst: waiting can never help)."""
        if self.tokens < 0:
            self.tokens, self.updated = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if amount <= self.tokens:
            self.tokens -= amount
            return 0.0
        if amount > self.burst:
            return math.inf
        return (amount - self.tokens) / self.rate


def retry_after_seconds(wait: float) -> int:
    return max(1, math.ceil(wait))
