"""Helpers for integration tests: read what landed on a topic, serve an app on a real port,
wait for an asynchronous outcome."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import orjson
import uvicorn
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from leadwerk_platform.embedded import free_port
from leadwerk_platform.migrations import upgrade
from leadwerk_platform.services import SERVICES


async def read_topic(bootstrap: str, topic: str, count: int, timeout: float = 10.0,
                     idle: float = 0.0) -> list[ConsumerRecord[bytes, bytes]]:
    """Read ``count`` records from the start of ``topic`` (all partitions); with ``idle``, keep
    reading that long after the last record to prove nothing more arrives."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        await consumer._client.force_metadata_update()
        partitions = consumer.partitions_for_topic(topic) or set()
    consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
    await consumer.seek_to_beginning()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=100)
            for items in batch.values():
                records.extend(items)
                last = time.monotonic()
            if len(records) >= count and time.monotonic() - last >= idle:
                break
    finally:
        await consumer.stop()
    return records


def values(records: list[ConsumerRecord[bytes, bytes]]) -> list[dict[str, Any]]:
    return [orjson.loads(r.value) for r in records if r.value is not None]


@contextlib.asynccontextmanager
async def serve_app(app: Any, port: int | None = None) -> AsyncIterator[str]:
    """Run ``app`` under a real uvicorn server on a (free) loopback port; yield its base URL."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                            access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def create_database(admin_url: str, prefix: str = "test") -> str:
    """A fresh, empty database on the server ``admin_url`` points at; its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base, _, query = admin_url.partition("?")
    return base.rsplit("/", 1)[0] + "/" + name + (f"?{query}" if query else "")


async def migrate(database_url: str, service: str) -> None:
    """Apply ``service``'s migrations to ``database_url`` (as the bootstrap command does)."""
    spec = next(s for s in SERVICES if s.name == service)
    if spec.migrations is None:
        msg = f"{service} has no migrations"
        raise ValueError(msg)
    await asyncio.to_thread(upgrade, database_url, spec.schema, spec.migrations)


async def eventually(probe: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    """Poll ``probe`` until it returns something truthy (the pipeline is asynchronous); fail
    after ``timeout`` seconds with the last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"not reached within {timeout}s: {result!r}")
        await asyncio.sleep(0.1)
