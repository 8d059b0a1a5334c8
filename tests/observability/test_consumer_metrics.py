"""The consumer runtime's metrics against the real (embedded) broker: lag while a handler is
stuck and after it caught up, dead letters, and nothing left behind once the consumer stops."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from leadwerk_platform.envelope import Envelope, encode
from leadwerk_platform.kafka.consumer import ConsumedMessage, ConsumerPolicy, ConsumerRuntime
from leadwerk_platform.kafka.producer import OutgoingMessage, Publisher
from leadwerk_platform.metrics import ConsumerMetrics
from leadwerk_platform.settings import PlatformSettings
from leadwerk_platform.testing.helpers import eventually

from .exposition import parse_exposition

pytestmark = pytest.mark.integration
TOPIC, DLQ = "tracking-events", "tracking-events-dlq"


def event() -> bytes:
    now = datetime.now(UTC)
    return encode(Envelope(id=str(uuid.uuid4()), type="tracking.track.v1", workspace="dev",
                           occurred_at=now, received_at=now, producer="test", data={}))


def lag(registry: CollectorRegistry) -> dict[str, float]:
    """Partition → lag, as the exposition shows it."""
    exposition = parse_exposition(generate_latest(registry).decode())
    return {s.labels["partition"]: s.value for s in exposition.samples
            if s.name == "leadwerk_consumer_lag_records"}


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return parse_exposition(generate_latest(registry).decode()).value(name, **labels)


async def test_lag_grows_while_the_handler_is_stuck_and_drains_after(topics: str) -> None:
    settings = PlatformSettings()
    registry = CollectorRegistry()
    publisher = Publisher(settings, "test")
    await publisher.start(wait=5)
    released = asyncio.Event()

    async def handler(message: ConsumedMessage) -> None:
        await released.wait()

    runtime = ConsumerRuntime(settings, group_id=f"{topics}test.lag", topics={TOPIC: DLQ},
                              handler=handler, dead_letter_publisher=publisher,
                              metrics=ConsumerMetrics(registry),
                              policy=ConsumerPolicy(lag_interval=0.2))
    task = asyncio.create_task(runtime.run())
    try:
        # One key: every record on one partition, the first one blocks the rest.
        await publisher.publish([OutgoingMessage(settings.topic(TOPIC), b"k", event())
                                 for _ in range(5)] +
                                [OutgoingMessage(settings.topic(TOPIC), b"k", b"{not json")])

        async def stuck() -> bool:
            return max(lag(registry).values(), default=0) == 6

        await eventually(stuck)
        assert len(lag(registry)) == 6  # every assigned partition of the topic, the idle at 0
        assert value(registry, "leadwerk_consumer_running", group=f"{topics}test.lag") == 1
        released.set()

        async def drained() -> bool:
            lags = lag(registry)
            return runtime.processed + runtime.dead_lettered == 6 and bool(lags) \
                and max(lags.values()) == 0

        await eventually(drained)
        topic = settings.topic(TOPIC)
        assert value(registry, "leadwerk_consumer_records_processed_total", topic=topic) == 5
        assert value(registry, "leadwerk_consumer_records_dead_lettered_total",
                     topic=topic) == 1
        assert value(registry, "leadwerk_consumer_handler_errors_total", topic=topic,
                     kind="invalid") == 1
        assert value(registry, "leadwerk_consumer_handler_duration_seconds_count",
                     topic=topic) >= 1
    finally:
        released.set()
        runtime.stop()
        await task
        await publisher.stop()
    # A stopped consumer measures nothing any more and says so.
    assert lag(registry) == {}
    assert value(registry, "leadwerk_consumer_running", group=f"{topics}test.lag") == 0


async def test_transient_failures_are_counted_per_attempt(topics: str) -> None:
    settings = PlatformSettings()
    registry = CollectorRegistry()
    publisher = Publisher(settings, "test")
    await publisher.start(wait=5)
    failures = 2

    async def handler(message: ConsumedMessage) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise ConnectionError("database went away")

    runtime = ConsumerRuntime(settings, group_id=f"{topics}test.retry", topics={TOPIC: DLQ},
                              handler=handler, dead_letter_publisher=publisher,
                              metrics=ConsumerMetrics(registry),
                              policy=ConsumerPolicy(retry_backoff=0.01))
    task = asyncio.create_task(runtime.run())
    try:
        await publisher.publish([OutgoingMessage(settings.topic(TOPIC), b"k", event())])

        async def handled() -> bool:
            return runtime.processed == 1

        await eventually(handled)
    finally:
        runtime.stop()
        await task
        await publisher.stop()
    assert value(registry, "leadwerk_consumer_handler_errors_total", kind="transient") == 2
    assert value(registry, "leadwerk_consumer_records_processed_total") == 1
