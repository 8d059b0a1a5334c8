"""Stream processors on faust-streaming, under the same commit policy as :mod:`.consumer`.

faust runs the consumer group, assignment and offset commits; this module decides *when* an
offset may be committed. Events are taken in batches with ``noack_take`` and acknowledged only
after the batch handler returned, i.e. after its effects (and outbox) are durable. faust commits
acknowledged offsets only, so a crash anywhere before that redelivers the batch, and handlers
recognise what they already processed (docs/decisions/0007-scoring-stream-processing.md).

* An envelope that does not decode, or an event the handler rejects, is dead-lettered (the same
  :class:`~.consumer.DeadLetters` as the plain consumer) and then acknowledged.
* Any other failure is retried with back-off; when retries are exhausted the batch is *not*
  acknowledged and ``on_fatal`` is called: the process stops and a restart re-reads the batch.

The metrics are the plain consumer's (``leadwerk_consumer_*``, same names and labels), so one
dashboard panel or alert covers both kinds of consumer group; the lag comes from faust's
consumer (end offsets through its consumer thread, committed offsets as faust tracks them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from prometheus_client import CollectorRegistry

from leadwerk_platform.envelope import Envelope, InvalidMessageError, decode
from leadwerk_platform.kafka.config import FETCH_MAX_WAIT_MS, ssl_context
from leadwerk_platform.kafka.consumer import (
    ConsumerOffsets,
    ConsumerPolicy,
    DeadLetters,
    report_lag,
    retry_transient,
)
from leadwerk_platform.kafka.producer import Publisher
from leadwerk_platform.metrics import ConsumerMetrics
from leadwerk_platform.settings import PlatformSettings

logger = logging.getLogger(__name__)


def faust_credentials(settings: PlatformSettings) -> faust.types.auth.CredentialsT | None:
    """The platform's TLS and SASL settings as faust's broker credentials (the same
    connection as :func:`~.config.connection_options` gives the plain clients)."""
    context = ssl_context(settings)
    if settings.kafka_sasl and settings.kafka_sasl_password is not None:
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.get_secret_value(),
            mechanism=settings.kafka_sasl_mechanism.value, ssl_context=context)
    return faust.SSLCredentials(context) if context is not None else None


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        # faust hard-codes a 1.5 s fetch wait; ours is the platform's (see FETCH_MAX_WAIT_MS).
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # private, but read only at start()
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> Any:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _FaustOffsets(ConsumerOffsets):
    """:class:`~.consumer.PartitionOffsets` of a faust consumer: its assignment and high
    waters as aiokafka's, end offsets fetched by its consumer thread, and the committed
    offsets faust keeps (read at assignment, updated on each commit)."""

    async def end_offsets(self, partitions: list[Any]) -> Mapping[Any, int]:
        # faust calls them high waters; its consumer thread asks ListOffsets(latest).
        ends: Mapping[Any, int] = await self._consumer.highwaters(*partitions)
        return ends

    async def committed(self, partitions: list[Any]) -> Mapping[Any, int | None]:
        # faust has no public getter; this map is what it commits from (next offset to read).
        # The admin client's list_consumer_group_offsets would be public, but aiokafka 0.14
        # cannot read the embedded broker's (tansu 0.6) OffsetFetch answer to it.
        committed = self._consumer._committed_offset
        return {tp: committed.get(tp) for tp in partitions}

    async def beginning_offsets(self, partitions: list[Any]) -> Mapping[Any, int]:
        starts: Mapping[Any, int] = await self._consumer.earliest_offsets(*partitions)
        return starts


@dataclass(slots=True)
class StreamMessage:
    """One decoded input message of a batch."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    envelope: Envelope
    source: Any = field(repr=False)  # the faust message, for dead-lettering


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message the handler could not process and will never be able to (dead-letter it)."""

    message: StreamMessage
    reason: str


BatchHandler = Callable[[Sequence[StreamMessage]], Awaitable[Sequence[Rejected]]]


@dataclass(frozen=True)
class StreamPolicy(ConsumerPolicy):
    batch_size: int = 500
    batch_within: float = 0.05


class StreamProcessor:
    """One faust app = one consumer group running ``handler`` over registry ``topics``."""

    def __init__(self, settings: PlatformSettings, *, group_id: str, topics: dict[str, str],
                 handler: BatchHandler, publisher: Publisher,
                 on_fatal: Callable[[BaseException], None],
                 policy: StreamPolicy | None = None,
                 metrics: ConsumerMetrics | None = None) -> None:
        """``topics`` maps each consumed registry topic to its dead-letter topic; ``metrics``
        is the service's (on its registry); without it the counts go nowhere."""
        self._policy = policy or StreamPolicy()
        self._handler = handler
        self._on_fatal = on_fatal
        self.group_id = settings.kafka_topic_prefix + group_id
        dead_letter_topics = {settings.topic(t): settings.topic(d) for t, d in topics.items()}
        self._metrics = (metrics or ConsumerMetrics(CollectorRegistry())).group(self.group_id)
        self._metrics.declare(dead_letter_topics)
        self._dead_letters = DeadLetters(publisher, self._policy, self.group_id,
                                         dead_letter_topics, self._metrics)
        session = settings.kafka_session_timeout_ms / 1000
        self.app = faust.App(
            self.group_id,
            broker=[f"kafka://{server.strip()}"
                    for server in settings.kafka_bootstrap_servers.split(",")],
            broker_credentials=faust_credentials(settings),
            store="memory://",
            # faust makes a data folder even with the memory store: not in the working folder
            # (the checkout, or a read-only root in a pod) but the temporary one.
            datadir=str(Path(tempfile.gettempdir()) / "leadwerk-faust-{conf.name}"),
            autodiscover=False,
            web_enabled=False,
            topic_allow_declare=False,  # topics come from the registry (bootstrap)
            topic_disable_leader=True,
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=session,
            broker_heartbeat_interval=max(0.1, session / 10),
            broker_rebalance_timeout=max(session, 10.0),
            broker_commit_interval=0.5,
            broker_commit_every=self._policy.batch_size,
            producer_acks=-1,
            stream_buffer_maxsize=self._policy.batch_size * 4,
            processing_guarantee="at_least_once",
        )
        # This app's transport only (an instance attribute), not faust's class.
        self.app.transport.Consumer = _Consumer  # type: ignore[misc]
        channel = self.app.topic(*dead_letter_topics, value_serializer="raw",
                                 key_serializer="raw")
        self.app.agent(channel, name=f"{group_id}.agent")(self._agent)
        self.processed = 0
        self.dead_lettered = 0
        self.failed: BaseException | None = None
        self._lag: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.app.start()
        self._metrics.set_running(True)
        self._lag = asyncio.create_task(report_lag(
            _FaustOffsets(self.app.consumer), self._metrics, self._policy.lag_interval))

    async def stop(self) -> None:
        if self._lag is not None:
            self._lag.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag
        self._metrics.set_running(False)
        self._metrics.set_lag({})
        await self.app.stop()

    async def _agent(self, stream: Any) -> None:
        async for events in stream.noack_take(self._policy.batch_size,
                                              within=self._policy.batch_within):
            try:
                await self._process(events)
            except BaseException as error:  # noqa: BLE001 - never acknowledge a failed batch
                self.failed = error
                self._metrics.set_running(False)
                self._on_fatal(error)
                await asyncio.Event().wait()  # hold the batch unacknowledged until stopped
            for event in events:
                await stream.ack(event)

    async def _process(self, events: Sequence[Any]) -> None:
        started = time.perf_counter()
        counts: dict[str, int] = {}  # decoded records per topic
        try:
            await self._process_batch(events, counts)
        finally:
            seconds = time.perf_counter() - started
            for topic in counts:
                self._metrics.handled(topic, seconds)

    async def _process_batch(self, events: Sequence[Any], counts: dict[str, int]) -> None:
        batch: list[StreamMessage] = []
        for event in events:
            message = event.message
            try:
                envelope = decode(message.value)
            except InvalidMessageError as error:
                self._metrics.handler_error(message.topic, "invalid")
                await self._dead_letters.send(message, error)
                self.dead_lettered += 1
                continue
            counts[message.topic] = counts.get(message.topic, 0) + 1
            batch.append(StreamMessage(message.topic, message.partition, message.offset,
                                       message.key, envelope, message))
        if not batch:
            return
        rejected: Sequence[Rejected] = ()

        async def handle() -> None:
            nonlocal rejected
            try:
                rejected = await self._handler(batch)
            except Exception as error:
                kind = "invalid" if isinstance(error, InvalidMessageError) else "transient"
                for topic in counts:
                    self._metrics.handler_error(topic, kind)
                raise

        await retry_transient(handle, self._policy, what=f"{self.group_id} batch")
        accepted = dict(counts)
        for item in rejected:
            self._metrics.handler_error(item.message.topic, "invalid")
            await self._dead_letters.send(item.message.source, InvalidMessageError(item.reason))
            self.dead_lettered += 1
            accepted[item.message.topic] -= 1
        self.processed += len(batch)
        for topic, count in accepted.items():
            if count:
                self._metrics.processed(topic, count)
