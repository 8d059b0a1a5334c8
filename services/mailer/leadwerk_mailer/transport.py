"""SMTP delivery: a pool of connections per relay (aiosmtplib), TLS and auth from the URL,
rate limits, and the answer classified as sent, temporary or permanent."""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib

from leadwerk_platform.ratelimit import RateLimit

_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass(frozen=True)
class Outcome:
    kind: Literal["sent", "temporary", "permanent"]
    code: int | None
    status: str | None  # RFC 3463 enhanced status, e.g. "5.1.1"
    response: str


def enhanced_status(code: int | None, text: str) -> str | None:
    """The RFC 3463 status in an SMTP answer, else one derived from the basic code."""
    match = _STATUS.search(text)
    if match:
        return ".".join(match.groups())
    if code is None:
        return None
    return f"{code // 100}.0.0"


@dataclass(frozen=True)
class RelayConfig:
    host: str
    port: int
    username: str | None
    password: str | None
    use_tls: bool
    start_tls: bool | None

    @classmethod
    def from_url(cls, url: str) -> RelayConfig:
        parts = urlsplit(url)
        if parts.scheme not in {"smtp", "smtps"} or not parts.hostname:
            raise ValueError("SMTP URL: smtp://[user:password@]host[:port][?starttls=true] "
                             "or smtps://…")
        query = parse_qs(parts.query)
        starttls = query.get("starttls", [None])[0]
        return cls(host=parts.hostname, port=parts.port or (465 if parts.scheme == "smtps"
                                                            else 25),
                   username=unquote(parts.username) if parts.username else None,
                   password=unquote(parts.password) if parts.password else None,
                   use_tls=parts.scheme == "smtps",
                   start_tls=None if starttls is None else starttls.lower() == "true")


class Relay:
    """One SMTP relay: a pool of open connections, reused across messages."""

    def __init__(self, config: RelayConfig, *, size: int, timeout: float,
                 limit: RateLimit) -> None:
        self._config = config
        self._timeout = timeout
        self._limit = limit
        self._idle: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue()
        self._slots = asyncio.Semaphore(size)

    async def _connect(self) -> aiosmtplib.SMTP:
        c = self._config
        client = aiosmtplib.SMTP(hostname=c.host, port=c.port, use_tls=c.use_tls,
                                 start_tls=c.start_tls, timeout=self._timeout)
        await client.connect()
        if c.username and c.password:
            await client.login(c.username, c.password)
        return client

    async def send(self, sender: str, recipient: str, raw: bytes) -> Outcome:
        await self._limit.acquire()
        async with self._slots:
            client = None
            try:
                client = self._idle.get_nowait() if not self._idle.empty() else None
                if client is None or not client.is_connected:
                    client = await self._connect()
                errors, response = await client.sendmail(sender, [recipient], raw)
                if errors:
                    code, text = next(iter(errors.values()))
                    return self._answer(code, text)
                return Outcome("sent", 250, enhanced_status(250, response) or "2.0.0",
                               response)
            except aiosmtplib.SMTPRecipientsRefused as error:
                refused = error.recipients[0]
                return self._answer(refused.code, refused.message)
            except aiosmtplib.SMTPResponseException as error:
                return self._answer(error.code, error.message)
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
                await self._discard(client)
                client = None
                return Outcome("temporary", None, None, f"{type(error).__name__}: {error}")
            finally:
                if client is not None and client.is_connected:
                    self._idle.put_nowait(client)

    @staticmethod
    def _answer(code: int, text: str) -> Outcome:
        """An SMTP answer (the connection stays usable and goes back to the pool)."""
        kind: Literal["temporary", "permanent"] = "permanent" if code >= 500 else "temporary"
        return Outcome(kind, code, enhanced_status(code, text), f"{code} {text}")

    async def _discard(self, client: aiosmtplib.SMTP | None) -> None:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    async def close(self) -> None:
        while not self._idle.empty():
            client = self._idle.get_nowait()
            with contextlib.suppress(Exception):
                await client.quit()
