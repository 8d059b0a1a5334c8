"""The request bodies every load generator sends (wrk's Lua script and the Python generators).

One event template with three placeholders, filled per event so that every request carries a
fresh ``messageId`` (unique per run), one of ``visitors`` anonymous ids, and the current time:

* ``@@MID@@`` message id, ``<run tag>-<thread>-<counter>``
* ``@@AID@@`` anonymous id (UUID-shaped, drawn from a pool of visitors → spread over partitions)
* ``@@TS@@``  ISO-8601 UTC timestamp (``timestamp`` and ``sentAt``)

The event is what analytics.js (analytics-next) sends for a ``track`` call from a desktop
browser on a page reached through a newsletter link.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import orjson

WRITE_KEY = "dev-write-key"
#: ``Authorization`` header value: Basic auth, write key as user name, empty password.
AUTHORIZATION = "Basic ZGV2LXdyaXRlLWtleTo="  # base64("dev-write-key:")

_PAGE_QUERY = "?utm_source=newsletter&utm_medium=email&utm_campaign=spring_launch&utm_content=cta"
_EVENT = {
    "type": "track",
    "event": "Pricing Plan Selected",
    "messageId": "@@MID@@",
    "anonymousId": "@@AID@@",
    "timestamp": "@@TS@@",
    "sentAt": "@@TS@@",
    "properties": {"plan": "business", "billing": "annual", "seats": 25, "currency": "EUR",
                   "value": 1490.0, "source_section": "comparison-table"},
    "context": {
        "library": {"name": "analytics.js", "version": "npm:next-1.72.0"},
        "locale": "de-DE",
        "timezone": "Europe/Berlin",
        "page": {"path": "/pricing", "referrer": "https://mail.google.com/",
                 "search": _PAGE_QUERY, "title": "Preise – Leadwerk",  # noqa: RUF001 - real-world UTF-8
                 "url": f"https://www.example.com/pricing{_PAGE_QUERY}"},
        "userAgent": ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
                      "(KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"),
        "campaign": {"source": "newsletter", "medium": "email", "name": "spring_launch",
                     "content": "cta"},
        "screen": {"width": 1920, "height": 1080, "density": 1},
    },
    "integrations": {},
}
EVENT_TEMPLATE = orjson.dumps(_EVENT).decode()


def write_template(path: Path) -> Path:
    path.write_text(EVENT_TEMPLATE, encoding="utf-8")
    return path


def anonymous_id(visitor: int) -> str:
    return f"{visitor:08x}-5e1f-4c2a-9b7d-{visitor:012d}"


class BodyFactory:
    """Python twin of ``wrk_events.lua``: builds single-event or batch bodies."""

    def __init__(self, template: str, batch: int, tag: str, worker: int, visitors: int) -> None:
        self.template = template
        self.batch = batch
        self.prefix = f"{tag}-{worker}-"
        self.visitors = visitors
        self.counter = 0
        self._second = -1
        self._stamp = ""
        self._random = random.Random(worker)  # noqa: S311 - load generation, not security

    def _now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(second))
        return self._stamp

    def event(self) -> str:
        self.counter += 1
        stamp = self._now()
        return (self.template.replace("@@MID@@", f"{self.prefix}{self.counter}")
                .replace("@@AID@@", anonymous_id(self._random.randint(1, self.visitors)))
                .replace("@@TS@@", stamp))

    def body(self) -> bytes:
        if self.batch <= 1:
            return self.event().encode()
        events = ",".join(self.event() for _ in range(self.batch))
        return f'{{"sentAt":"{self._now()}","batch":[{events}]}}'.encode()
