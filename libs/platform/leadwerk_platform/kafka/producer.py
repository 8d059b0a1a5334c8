"""A publisher that survives a broker that is down at start and reports readiness."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
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

    def __init__(self, settings: PlatformSettings, client_id: str, *,
                 delivery_timeout: float = 10.0, reconnect_interval: float = 1.0) -> None:
        """``delivery_timeout``: how long :meth:`publish` may wait for the broker's acks."""
        self._options = {**producer_options(settings, client_id),
                         "request_timeout_ms": int(delivery_timeout * 1000)}
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

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        """Send every message and wait for all acks; raise :class:`PublishError` otherwise.

        The deadline is the producer's own ``request_timeout_ms`` (``delivery_timeout``): aiokafka
        fails a send that waits longer for metadata, buffer space or the ack, so no timer is
        armed per call (it cost a fifth of ingest's produce path). On a failure some messages
        may still reach the broker: callers rely on deterministic event ids so that a retry
        deduplicates downstream.
        """
        producer = self._producer
        if producer is None:
            raise PublishError("broker not connected")
        try:
            if len(messages) == 1:
                message = messages[0]
                await (await producer.send(message.topic, message.value, key=message.key,
                                           headers=list(message.headers) or None))
                return
            futures = [await producer.send(m.topic, m.value, key=m.key,
                                           headers=list(m.headers) or None) for m in messages]
        except KafkaError as error:
            raise PublishError(f"broker refused or timed out: {error!r}") from error
        failure: KafkaError | None = None
        for future in futures:  # all are in flight already; awaiting in order is cheapest
            try:
                await future
            except KafkaError as error:
                failure = failure or error
        if failure is not None:
            raise PublishError(f"broker refused or timed out: {failure!r}") from failure

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
