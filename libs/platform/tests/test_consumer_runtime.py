"""The consumer loop against the real (embedded) broker: commits, dead letters, retries, stop."""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from leadwerk_platform.envelope import Envelope, encode
from leadwerk_platform.kafka.consumer import (
    DLQ_HEADER_PREFIX,
    ConsumedMessage,
    ConsumerPolicy,
    ConsumerRuntime,
    DeadLetterLimitExceededError,
)
from leadwerk_platform.kafka.producer import OutgoingMessage, Publisher
from leadwerk_platform.settings import PlatformSettings
from leadwerk_platform.testing.helpers import read_topic

pytestmark = pytest.mark.integration
TOPIC, DLQ = "tracking-events", "tracking-events-dlq"


def event(n: int) -> bytes:
    now = datetime.now(UTC)
    return encode(Envelope(id=str(uuid.uuid4()), type="tracking.track.v1", workspace="dev",
                           occurred_at=now, received_at=now, producer="test", data={"n": n}))


async def publish(settings: PlatformSettings, values: list[bytes]) -> None:
    publisher = Publisher(settings, "test")
    await publisher.start(wait=5)
    try:
        await publisher.publish([OutgoingMessage(settings.topic(TOPIC), b"k", v) for v in values])
    finally:
        await publisher.stop()


async def run_until(runtime: ConsumerRuntime, done: Callable[[], bool],
                    timeout: float = 20) -> None:
    task = asyncio.create_task(runtime.run())
    try:
        async with asyncio.timeout(timeout):
            while not done():
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
    finally:
        runtime.stop()
        await task


async def committed(settings: PlatformSettings, group: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        total = 0
        for partition in range(6):
            offset = await consumer.committed(TopicPartition(settings.topic(TOPIC), partition))
            total += offset or 0
        return total
    finally:
        await consumer.stop()


def runtime_for(settings: PlatformSettings, publisher: Publisher,
                handler: Callable[[ConsumedMessage], Awaitable[None]], group: str,
                policy: ConsumerPolicy | None = None) -> ConsumerRuntime:
    return ConsumerRuntime(settings, group_id=group, topics={TOPIC: DLQ}, handler=handler,
                           dead_letter_publisher=publisher, policy=policy)


async def test_valid_messages_are_handled_then_committed_and_bad_ones_dead_lettered(
        topics: str) -> None:
    settings = PlatformSettings()
    await publish(settings, [event(1), b"{not json", event(2), orjson.dumps({"id": "x"})])
    seen: list[int] = []

    async def handler(message: ConsumedMessage) -> None:
        seen.append(message.envelope.data["n"])

    publisher = Publisher(settings, "dlq")
    await publisher.start(wait=5)
    runtime = runtime_for(settings, publisher, handler, "test.ok")
    await run_until(runtime, lambda: runtime.processed + runtime.dead_lettered == 4)
    await publisher.stop()
    assert seen == [1, 2]
    assert await committed(settings, "test.ok") == 4
    dead = await read_topic(settings.kafka_bootstrap_servers, settings.topic(DLQ), 2)
    assert [r.value for r in dead] == [b"{not json", orjson.dumps({"id": "x"})]
    headers = dict(dead[0].headers)
    assert headers[DLQ_HEADER_PREFIX + "topic"] == settings.topic(TOPIC).encode()
    assert headers[DLQ_HEADER_PREFIX + "group"] == b"test.ok"
    assert b"not JSON" in headers[DLQ_HEADER_PREFIX + "error"]
    assert headers[DLQ_HEADER_PREFIX + "offset"] == b"1"


async def test_a_batch_handler_takes_whole_batches_and_a_bad_one_goes_one_by_one(
        topics: str) -> None:
    settings = PlatformSettings()
    await publish(settings, [event(1), event(2), event(3)])
    await publish(settings, [event(4), b"{not json", event(5)])
    batches: list[list[int]] = []
    single: list[int] = []

    async def batch(messages: Sequence[ConsumedMessage]) -> None:
        batches.append([m.envelope.data["n"] for m in messages])

    async def handler(message: ConsumedMessage) -> None:
        single.append(message.envelope.data["n"])

    publisher = Publisher(settings, "dlq")
    await publisher.start(wait=5)
    runtime = ConsumerRuntime(settings, group_id="test.batch", topics={TOPIC: DLQ},
                              handler=handler, batch_handler=batch,
                              dead_letter_publisher=publisher)
    await run_until(runtime, lambda: runtime.processed + runtime.dead_lettered == 6)
    await publisher.stop()
    # Whatever the fetches grouped: every valid event handled once, in order, either in a
    # batch or (a batch holding the bad record fell back) one by one; the bad one is dead.
    handled = [n for b in batches for n in b] + single
    assert sorted(handled) == [1, 2, 3, 4, 5]
    assert 4 not in {n for b in batches for n in b} or 5 not in single
    assert runtime.dead_lettered == 1
    assert await committed(settings, "test.batch") == 6


async def test_transient_failures_are_retried_and_a_restart_resumes_uncommitted(
        topics: str) -> None:
    settings = PlatformSettings()
    await publish(settings, [event(1), event(2)])
    attempts: dict[int, int] = {}

    async def flaky(message: ConsumedMessage) -> None:
        n = message.envelope.data["n"]
        attempts[n] = attempts.get(n, 0) + 1
        if n == 2:
            raise ConnectionError("database unavailable")

    publisher = Publisher(settings, "dlq")
    await publisher.start(wait=5)
    policy = ConsumerPolicy(max_retries=2, retry_backoff=0.01)
    runtime = runtime_for(settings, publisher, flaky, "test.retry", policy)
    with pytest.raises(ConnectionError):
        await run_until(runtime, lambda: False)
    assert attempts == {1: 1, 2: 3}
    assert await committed(settings, "test.retry") == 1  # the failed message stays uncommitted

    seen: list[int] = []

    async def healthy(message: ConsumedMessage) -> None:
        seen.append(message.envelope.data["n"])

    restarted = runtime_for(settings, publisher, healthy, "test.retry")
    await run_until(restarted, lambda: seen == [2])
    await publisher.stop()
    assert await committed(settings, "test.retry") == 2


async def test_too_many_dead_letters_stop_the_consumer(topics: str) -> None:
    settings = PlatformSettings()
    await publish(settings, [b"junk"] * 5)

    async def handler(message: ConsumedMessage) -> None:
        raise AssertionError("never called for junk")

    publisher = Publisher(settings, "dlq")
    await publisher.start(wait=5)
    runtime = runtime_for(settings, publisher, handler, "test.limit",
                          ConsumerPolicy(dead_letter_limit=2, dead_letter_window=60))
    with pytest.raises(DeadLetterLimitExceededError):
        await run_until(runtime, lambda: False)
    await publisher.stop()
    assert runtime.dead_lettered == 2
    assert await committed(settings, "test.limit") == 2


async def test_sigterm_finishes_the_batch_commits_and_exits(topics: str) -> None:
    settings = PlatformSettings()
    await publish(settings, [event(n) for n in range(50)])
    script = Path(__file__).with_name("sigterm_consumer.py")
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), stdout=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    first = await asyncio.wait_for(process.stdout.readline(), 30)
    assert first.startswith(b"handled")
    process.send_signal(signal.SIGTERM)
    output, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    lines = [first.decode(), *output.decode().splitlines()]
    assert lines[-1] == "stopped cleanly"
    handled = len([line for line in lines if line.startswith("handled")])
    assert 1 <= handled < 50  # it stopped early …
    assert await committed(settings, "test.sigterm") == handled  # … and committed exactly that
