"""A publisher that survives a broker that is down at start and reports readiness."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError

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
        self._delivery_timeout = delivery_timeout
        self._reconnect_interval = reconnect_interval
        self._producer: AIOKafkaProducer | None = None
        self._connector: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        # (deadline, futures of one publish call), in deadline order: the deadline is constant.
        self._in_flight: collections.deque[tuple[float, list[asyncio.Future[Any]]]] = (
            collections.deque())

    @property
    def ready(self) -> bool:
        return self._producer is not None

    async def start(self, wait: float | None = None) -> None:
        """Begin connecting; with ``wait``, block up to that many seconds for a connection."""
        self._connector = asyncio.create_task(self._connect(), name="publisher-connect")
        self._watchdog = asyncio.create_task(self._expire(), name="publisher-deadlines")
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

    async def _expire(self, interval: float = 0.1) -> None:
        """Fail acks that are overdue. aiokafka expires unacknowledged batches after
        ``request_timeout_ms`` only without the idempotent producer (with it, it retries
        forever), so the deadline is enforced here, by one sweep for all calls, instead of a
        timer per call (a timer per call cost a fifth of ingest's produce path)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            while self._in_flight and self._in_flight[0][0] <= now:
                _, futures = self._in_flight.popleft()
                for future in futures:
                    if not future.done():  # aiokafka checks done() before resolving
                        future.set_exception(KafkaTimeoutError(
                            f"not acknowledged within {self._delivery_timeout}s"))

    async def stop(self) -> None:
        for task in (self._connector, self._watchdog):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._producer is not None:
            try:  # flushing waits on the broker: bounded, as every other wait here
                async with asyncio.timeout(self._delivery_timeout):
                    await self._producer.stop()
            except TimeoutError:
                logger.warning("producer stopped without every ack (callers got errors; "
                               "their retries deduplicate)")
            self._producer = None

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        """Send every message and wait for all acks; raise :class:`PublishError` otherwise.

        Every wait is bounded by ``delivery_timeout``: aiokafka's ``request_timeout_ms`` bounds
        the waits for metadata and buffer space, :meth:`_expire` the wait for acks. On a failure
        some messages may still reach the broker: callers rely on deterministic event ids so
        that a retry deduplicates downstream.
        """
        producer = self._producer
        if producer is None:
            raise PublishError("broker not connected")
        try:
            futures = [await producer.send(m.topic, m.value, key=m.key,
                                           headers=list(m.headers) or None) for m in messages]
        except KafkaError as error:
            raise PublishError(f"broker refused or timed out: {error!r}") from error
        self._in_flight.append((asyncio.get_running_loop().time() + self._delivery_timeout,
                                futures))
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
