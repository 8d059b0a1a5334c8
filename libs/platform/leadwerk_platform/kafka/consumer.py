"""The consumer loop every plain-aiokafka consumer runs.

Policy (see docs/decisions/0004-consumer-commit-policy.md):

* offsets are committed manually, after the handler returned for every message of a batch, so
  effects are durable before the offset moves (at-least-once; handlers are idempotent);
* a message that can never be processed (:class:`InvalidMessageError`) is copied to the topic's
  dead-letter topic with its origin in ``x-leadwerk-dlq-*`` headers, and the loop goes on;
  more than ``dead_letter_limit`` dead letters within ``dead_letter_window`` seconds stop the
  consumer instead (something is systematically wrong);
* any other exception is transient: retried with exponential back-off, then the consumer stops
  without committing the failed message, so a restart picks it up again;
* :meth:`ConsumerRuntime.stop` (wired to SIGTERM) finishes the message in hand, commits what
  is done and leaves the group;
* with a ``batch_handler``, the messages of one fetched partition batch are first offered to it
  together (one database transaction instead of one per message); if it raises, nothing of the
  batch counts and the messages go one by one through ``handler`` with the policy above.

Metrics (``leadwerk_consumer_*``, :class:`~leadwerk_platform.metrics.ConsumerMetrics`): records
processed and dead-lettered, dead-letter publishes, handler errors and durations per group and
topic, counted where the loop already counts; the lag per assigned partition is measured by a
task of its own every ``lag_interval`` seconds (:func:`report_lag`), never on the hot path.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError
from aiokafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry

from leadwerk_platform.envelope import Envelope, InvalidMessageError, decode, format_timestamp
from leadwerk_platform.kafka.config import consumer_options
from leadwerk_platform.kafka.producer import OutgoingMessage, Publisher, PublishError
from leadwerk_platform.metrics import ConsumerMetrics, GroupMetrics
from leadwerk_platform.settings import PlatformSettings

logger = logging.getLogger(__name__)

DLQ_HEADER_PREFIX = "x-leadwerk-dlq-"


class DeadLetterLimitExceededError(RuntimeError):
    """Too many dead letters in too short a time: stop rather than dead-letter everything."""


@dataclass(frozen=True, slots=True)
class ConsumedMessage:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]
    envelope: Envelope


Handler = Callable[[ConsumedMessage], Awaitable[None]]
BatchHandler = Callable[[Sequence[ConsumedMessage]], Awaitable[None]]


@dataclass(frozen=True)
class ConsumerPolicy:
    dead_letter_limit: int = 100
    dead_letter_window: float = 60.0
    max_retries: int = 5
    retry_backoff: float = 0.2
    retry_backoff_max: float = 10.0
    #: Seconds between two lag measurements (end offsets and committed offsets).
    lag_interval: float = 10.0


class ConsumerRuntime:
    """Runs ``handler`` over ``topics`` (registry names) for one consumer group."""

    def __init__(
        self,
        settings: PlatformSettings,
        *,
        group_id: str,
        topics: dict[str, str],
        handler: Handler,
        dead_letter_publisher: Publisher,
        policy: ConsumerPolicy | None = None,
        client_id: str | None = None,
        batch_handler: BatchHandler | None = None,
        metrics: ConsumerMetrics | None = None,
    ) -> None:
        """``topics`` maps each consumed registry topic to its dead-letter topic; ``metrics``
        is the service's (on its registry); without it the counts go nowhere."""
        self._batch_handler = batch_handler
        self._settings = settings
        self._group_id = group_id
        self._dead_letter_topics = {settings.topic(t): settings.topic(d) for t, d in topics.items()}
        self._handler = handler
        self._policy = policy or ConsumerPolicy()
        self._client_id = client_id or group_id
        self._stopping = asyncio.Event()
        self._metrics = (metrics or ConsumerMetrics(CollectorRegistry())).group(group_id)
        self._metrics.declare(self._dead_letter_topics)
        self._dead_letters = DeadLetters(dead_letter_publisher, self._policy, group_id,
                                         self._dead_letter_topics, self._metrics)
        self._consumer: AIOKafkaConsumer | None = None
        self.processed = 0
        self.dead_lettered = 0

    def stop(self) -> None:
        """Ask the loop to finish the message in hand, commit and leave (safe from a signal)."""
        self._stopping.set()

    @property
    def running(self) -> bool:
        return self._consumer is not None

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(
            *self._dead_letter_topics,
            **consumer_options(self._settings, self._group_id, self._client_id),
        )
        await consumer.start()
        self._consumer = consumer
        self._metrics.set_running(True)
        lag = asyncio.create_task(report_lag(ConsumerOffsets(consumer), self._metrics,
                                             self._policy.lag_interval))
        try:
            while not self._stopping.is_set():
                batch = await consumer.getmany(timeout_ms=200)
                for partition, records in batch.items():
                    done = await self._process(partition, records)
                    if done is not None:
                        await self._commit(partition, done)
        finally:
            lag.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lag
            self._metrics.set_running(False)
            self._metrics.set_lag({})  # no longer measured here: not reported as if it were
            self._consumer = None
            await consumer.stop()  # leaves the group

    async def _process(self, partition: TopicPartition,
                       records: list[ConsumerRecord[bytes, bytes]]) -> int | None:
        """Handle records in order; return the last offset whose effects are durable."""
        started = time.perf_counter()
        try:
            return await self._process_in_order(partition, records)
        finally:
            self._metrics.handled(partition.topic, time.perf_counter() - started)

    async def _process_in_order(self, partition: TopicPartition,
                                records: list[ConsumerRecord[bytes, bytes]]) -> int | None:
        if self._batch_handler is not None and len(records) > 1 and \
                not self._stopping.is_set() and await self._handle_batch(records):
            return int(records[-1].offset)
        last_done: int | None = None
        for record in records:
            if self._stopping.is_set():
                break  # the rest stays uncommitted for whoever owns the partition next
            try:
                await self._handle_or_dead_letter(record)
            except BaseException:
                if last_done is not None:
                    await self._commit(partition, last_done)
                raise
            last_done = record.offset
        return last_done

    async def _commit(self, partition: TopicPartition, offset: int) -> None:
        """Commit up to ``offset``; losing the partition to a rebalance is not an error."""
        if self._consumer is None:
            return
        try:
            await self._consumer.commit({partition: OffsetAndMetadata(offset + 1, "")})
        except (CommitFailedError, IllegalStateError) as error:
            # The partition moved to another member, which re-reads what was not committed;
            # handlers are idempotent, so the only cost is some repeated work.
            logger.warning("commit refused after a rebalance; the new owner re-reads",
                           extra={"topic": partition.topic, "partition": partition.partition,
                                  "error": repr(error)})

    async def _handle_batch(self, records: list[ConsumerRecord[bytes, bytes]]) -> bool:
        """The fast path: ``True`` when the batch handler took every record."""
        assert self._batch_handler is not None  # noqa: S101 - checked by the caller
        try:
            messages = [ConsumedMessage(
                topic=r.topic, partition=r.partition, offset=r.offset, key=r.key,
                value=r.value, headers=list(r.headers), envelope=decode(r.value))
                for r in records]
            await self._batch_handler(messages)
        except Exception as error:  # noqa: BLE001 - any failure: one by one, with the policy
            logger.info("batch of %d from %s fell back to one by one: %r", len(records),
                        records[0].topic, error)
            self._metrics.handler_error(records[0].topic, "batch")
            return False
        self.processed += len(records)
        self._metrics.processed(records[0].topic, len(records))
        return True

    async def _handle_or_dead_letter(self, record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            await self._handle_with_retries(record)
        except InvalidMessageError as error:
            await self._dead_letter(record, error)

    async def _handle_with_retries(self, record: ConsumerRecord[bytes, bytes]) -> None:
        message = ConsumedMessage(
            topic=record.topic, partition=record.partition, offset=record.offset,
            key=record.key, value=record.value, headers=list(record.headers),
            envelope=decode(record.value),
        )

        async def attempt() -> None:
            try:
                await self._handler(message)
            except InvalidMessageError:
                raise  # counted when it is dead-lettered
            except Exception:
                self._metrics.handler_error(record.topic, "transient")
                raise

        await retry_transient(attempt, self._policy,
                              what=f"handler of {record.topic}@{record.offset}")
        self.processed += 1
        self._metrics.processed(record.topic)

    async def _dead_letter(self, record: ConsumerRecord[bytes, bytes], error: Exception) -> None:
        self._metrics.handler_error(record.topic, "invalid")
        await self._dead_letters.send(record, error)
        self.dead_lettered += 1


class RecordLike(Protocol):
    """What dead-lettering needs of a consumed record (aiokafka's and faust's both have it)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Any: ...


def _header_list(headers: Any) -> list[tuple[str, bytes]]:
    if not headers:
        return []
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(str(k), bytes(v)) for k, v in items]


class DeadLetters:
    """Copies unprocessable messages to their topic's dead-letter topic, origin in headers;
    more than ``dead_letter_limit`` within ``dead_letter_window`` raises
    :class:`DeadLetterLimitExceededError` (something is systematically wrong: stop)."""

    def __init__(self, publisher: Publisher, policy: ConsumerPolicy, group_id: str,
                 dead_letter_topics: dict[str, str], metrics: GroupMetrics) -> None:
        """``dead_letter_topics`` maps broker-side topic names to their dead-letter topics."""
        self._publisher = publisher
        self._policy = policy
        self._group_id = group_id
        self._topics = dead_letter_topics
        self._metrics = metrics
        self._recent: collections.deque[float] = collections.deque()

    async def send(self, record: RecordLike, error: Exception) -> None:
        """Dead-letter ``record`` (an aiokafka record or a faust message) because of ``error``."""
        topic = record.topic
        now = time.monotonic()
        self._recent.append(now)
        while self._recent and now - self._recent[0] > self._policy.dead_letter_window:
            self._recent.popleft()
        if len(self._recent) > self._policy.dead_letter_limit:
            raise DeadLetterLimitExceededError(
                f"more than {self._policy.dead_letter_limit} dead letters within "
                f"{self._policy.dead_letter_window}s on {topic}; stopping")
        origin = {
            "topic": topic, "partition": str(record.partition), "offset": str(record.offset),
            "group": self._group_id, "error": str(error)[:1000],
            "failed-at": format_timestamp(datetime.now(UTC)),
        }
        message = OutgoingMessage(
            self._topics[topic], record.key, record.value or b"",
            [*_header_list(record.headers),
             *((DLQ_HEADER_PREFIX + k, v.encode()) for k, v in origin.items())])

        async def publish() -> None:
            try:
                await self._publisher.publish([message])
            except PublishError:
                self._metrics.dead_letter_publish(topic, "failed")
                raise
            self._metrics.dead_letter_publish(topic, "published")

        await retry_transient(publish, self._policy, (PublishError,), what="dead-letter publish")
        self._metrics.dead_lettered(topic)
        logger.warning("message dead-lettered", extra={k: v for k, v in origin.items()
                                                       if k != "failed-at"})


async def retry_transient(operation: Callable[[], Awaitable[None]], policy: ConsumerPolicy,
                          transient: tuple[type[BaseException], ...] = (Exception,), *,
                          what: str = "handler") -> None:
    """Run ``operation``; retry ``transient`` failures with exponential back-off up to
    ``policy.max_retries`` times, then let the last one propagate.
    :class:`InvalidMessageError` is never retried."""
    delay = policy.retry_backoff
    for attempt in range(policy.max_retries + 1):
        try:
            await operation()
        except InvalidMessageError:
            raise
        except transient as error:
            if attempt == policy.max_retries:
                logger.exception("%s failed, giving up", what)
                raise
            logger.warning("%s failed, retrying", what,
                           extra={"attempt": attempt + 1, "error": repr(error)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, policy.retry_backoff_max)
        else:
            return


class PartitionOffsets(Protocol):
    """What a lag measurement asks of a consumer (partitions are ``(topic, partition)``
    named tuples: aiokafka's ``TopicPartition``, faust's ``TP``)."""

    def assignment(self) -> Collection[Any]: ...
    def highwater(self, partition: Any) -> int | None: ...
    async def end_offsets(self, partitions: list[Any]) -> Mapping[Any, int]: ...
    async def committed(self, partitions: list[Any]) -> Mapping[Any, int | None]: ...
    async def beginning_offsets(self, partitions: list[Any]) -> Mapping[Any, int]: ...


class ConsumerOffsets:
    """:class:`PartitionOffsets` of a plain aiokafka consumer (all public API); faust's
    consumer shares the assignment and high-water calls (``streams``)."""

    def __init__(self, consumer: Any) -> None:
        self._consumer = consumer

    def assignment(self) -> Collection[Any]:
        assigned: Collection[Any] = self._consumer.assignment()
        return assigned

    def highwater(self, partition: Any) -> int | None:
        highwater: int | None = self._consumer.highwater(partition)
        return highwater

    async def end_offsets(self, partitions: list[Any]) -> Mapping[Any, int]:
        ends: Mapping[Any, int] = await self._consumer.end_offsets(partitions)
        return ends

    async def committed(self, partitions: list[Any]) -> Mapping[Any, int | None]:
        offsets = await asyncio.gather(*(self._consumer.committed(tp) for tp in partitions))
        return dict(zip(partitions, offsets, strict=True))

    async def beginning_offsets(self, partitions: list[Any]) -> Mapping[Any, int]:
        starts: Mapping[Any, int] = await self._consumer.beginning_offsets(partitions)
        return starts


async def measure_lag(offsets: PartitionOffsets) -> dict[tuple[str, int], int]:
    """Per assigned partition: end offset minus the group's committed offset (where the group
    never committed: minus the beginning offset, as consumers start at the earliest).

    The end offset is the larger of the broker's answer to ListOffsets(latest) and the high
    watermark of the last fetch: on Kafka the former is always the newer, the embedded broker
    (tansu) answers it with an offset inside the last record batch (ADR 0017)."""
    partitions = sorted(offsets.assignment())
    if not partitions:
        return {}
    ends = await offsets.end_offsets(partitions)
    committed = await offsets.committed(partitions)
    never = [tp for tp in partitions if committed.get(tp) is None]
    starts = await offsets.beginning_offsets(never) if never else {}
    lags: dict[tuple[str, int], int] = {}
    for tp in partitions:
        done = committed.get(tp)
        if done is None:
            done = starts.get(tp)
        end = max((o for o in (ends.get(tp), offsets.highwater(tp)) if o is not None),
                  default=None)
        if end is not None and done is not None:
            lags[(tp.topic, tp.partition)] = max(0, end - done)
    return lags


async def report_lag(offsets: PartitionOffsets, metrics: GroupMetrics, interval: float) -> None:
    """Measure the lag every ``interval`` seconds until cancelled; until partitions are
    assigned, look again sooner. A failed measurement is logged and tried again: lag reporting
    never stops a consumer."""
    while True:
        pause = interval
        try:
            async with asyncio.timeout(max(interval, 5.0)):
                lags = await measure_lag(offsets)
        except Exception as error:  # noqa: BLE001 - a measurement never stops a consumer
            logger.info("consumer lag of %s not measured: %r", metrics.group, error)
        else:
            metrics.set_lag(lags)
            if not lags:  # no partitions (yet): the group is probably still joining
                pause = min(interval, 0.5)
        await asyncio.sleep(pause)


async def run_until_signalled(runtime: ConsumerRuntime,
                              signals: tuple[signal.Signals, ...] = (signal.SIGTERM,
                                                                     signal.SIGINT)) -> None:
    """Run ``runtime``; SIGTERM/SIGINT make it finish the message in hand, commit, leave."""
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, runtime.stop)
    try:
        await runtime.run()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
