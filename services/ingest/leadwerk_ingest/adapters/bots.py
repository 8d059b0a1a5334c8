"""Known-bot detection from the maintained crawler list of ``crawlerdetect``."""

from __future__ import annotations

from functools import lru_cache

from crawlerdetect import CrawlerDetect


class BotDetector:
    def __init__(self, cache_size: int = 4096) -> None:
        detector = CrawlerDetect()

        @lru_cache(maxsize=cache_size)
        def is_bot(user_agent: str) -> bool:
            return bool(detector.isCrawler(user_agent))

        self._is_bot = is_bot

    def is_bot(self, user_agent: str | None) -> bool:
        """Empty user agents are not flagged: server-side SDKs legitimately send none."""
        if not user_agent:
            return False
        return self._is_bot(user_agent[:512])
