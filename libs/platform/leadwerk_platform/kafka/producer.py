"""A publisher that survives a broker that is down at start and reports readiness."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from leadwerk_platform.kafka.config import producer_options
from leadwerk_platform.settings import PlatformSettings

logger = logging.getLogger(__name__)

Headers = Sequence[tuple[str, bytes]]


class PublishError(Exception):
    """The broker did not acknowledge in time (or is unreachable); nothing can be promised."""


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    topic: str
    key: bytes | None
    value: bytes
    headers: Headers = ()


class Publisher:
    """Owns one aiokafka producer.

    ``start()`` never fails because the broker is down: it keeps trying in the background and
    :attr:`ready` says whether publishing can work. :meth:`publish` awaits the broker's ack for
    every message, bounded by a deadline.
    """

    def __init__(self, settings: PlatformSettings, client_id: str,
                 reconnect_interval: float = 1.0) -> None:
        self._options = producer_options(settings, client_id)
        self._reconnect_interval = reconnect_interval
        self._producer: AIOKafkaProducer | None = None
        self._connector: asyncio.Task[None] | None = None
        self._started = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self._producer is not None

    async def start(self, wait: float | None = None) -> None:
        """Begin connecting; with ``wait``, block up to that many seconds for a connection."""
        self._connector = asyncio.create_task(self._connect(), name="publisher-connect")
        if wait:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._started.wait(), wait)

    async def _connect(self) -> None:
        while True:
            producer = AIOKafkaProducer(**self._options)
            try:
                await producer.start()
            except KafkaError as error:
                logger.warning("broker not reachable yet, retrying", extra={"error": str(error)})
                with contextlib.suppress(Exception):
                    await producer.stop()
                await asyncio.sleep(self._reconnect_interval)
                continue
            self._producer = producer
            self._started.set()
            return

    async def stop(self) -> None:
        if self._connector is not None:
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connector
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def publish(self, messages: Iterable[OutgoingMessage], timeout: float) -> None:
        """Send every message and wait for all acks; raise :class:`PublishError` otherwise.

        On a timeout some messages may still reach the broker later: callers rely on
        deterministic event ids so that a retry deduplicates downstream.
        """
        producer = self._producer
        if producer is None:
            raise PublishError("broker not connected")
        try:
            async with asyncio.timeout(timeout):
                futures = [
                    await producer.send(m.topic, m.value, key=m.key, headers=list(m.headers))
                    for m in messages
                ]
                await asyncio.gather(*futures)
        except TimeoutError as error:
            raise PublishError(f"broker did not acknowledge within {timeout}s") from error
        except KafkaError as error:
            raise PublishError(f"broker refused: {error}") from error

    async def check(self, timeout: float = 2.0) -> bool:
        """Readiness probe: connected and cluster metadata fresh enough to publish."""
        producer = self._producer
        if producer is None:
            return False
        client: Any = producer.client
        try:
            async with asyncio.timeout(timeout):
                return bool(await client.force_metadata_update())
        except (TimeoutError, KafkaError):
            return False
