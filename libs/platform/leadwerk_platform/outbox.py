"""Transactional outbox: messages written in the same Postgres transaction as the effect they
announce, published afterwards by :class:`OutboxRelay`.

A processor writes its effects, its "processed event X" record and its outgoing messages in one
transaction, then flushes the outbox before acknowledging its input. If it dies in between, the
input is redelivered, recognised as processed, and the flush publishes what is still waiting.
Published messages carry deterministic event ids, so a message published twice (crash after
the broker's ack, before the delete) deduplicates downstream.

Each service creates the table in its own schema with :data:`OUTBOX_TABLE_SQL` (a migration).
Rows are published in id order under an advisory lock per stream, so the messages about one
entity (whose writers serialise on that entity's row) leave in the order they were written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Sequence
from typing import Any

from leadwerk_platform.kafka.producer import OutgoingMessage, Publisher

logger = logging.getLogger(__name__)

OUTBOX_TABLE_SQL = """
CREATE TABLE outbox (
    id bigserial PRIMARY KEY,
    stream text NOT NULL,
    topic text NOT NULL,
    key bytea,
    value bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_stream_id ON outbox (stream, id);
"""

#: The idempotent consumer's record: which event ids a consumer has applied (written in the
#: transaction with the effects, so a redelivered event is recognised and skipped).
PROCESSED_TABLE_SQL = """
CREATE TABLE processed (
    consumer text NOT NULL,
    event_id uuid NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
"""


async def add_to_outbox(connection: Any, stream: str,
                        messages: Sequence[OutgoingMessage]) -> None:
    """Queue ``messages`` inside the caller's transaction (``connection``: asyncpg)."""
    if messages:
        await connection.executemany(
            "INSERT INTO outbox (stream, topic, key, value) VALUES ($1, $2, $3, $4)",
            [(stream, m.topic, m.key, m.value) for m in messages])


class OutboxRelay:
    """Publishes one stream of a service's outbox, oldest first, and deletes what was acked."""

    def __init__(self, pool: Any, publisher: Publisher, *, schema: str, stream: str,
                 batch_size: int = 2000) -> None:
        self._pool = pool
        self._publisher = publisher
        self._stream = stream
        self._batch_size = batch_size
        self._lock_key = zlib.crc32(f"outbox:{schema}:{stream}".encode())
        self._wanted = asyncio.Event()
        self.published = 0

    async def flush(self) -> int:
        """Publish everything waiting; return how many messages went out.

        Raises :class:`~leadwerk_platform.kafka.producer.PublishError` when the broker does not
        acknowledge; the rows stay and the next flush retries them.
        """
        total = 0
        async with self._pool.acquire() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", self._lock_key)
            while True:
                rows = await connection.fetch(
                    "SELECT id, topic, key, value FROM outbox WHERE stream = $1 "
                    "ORDER BY id LIMIT $2", self._stream, self._batch_size)
                if not rows:
                    break
                await self._publisher.publish(
                    [OutgoingMessage(r["topic"], r["key"], r["value"]) for r in rows])
                await connection.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])",
                                         [r["id"] for r in rows])
                total += len(rows)
                if len(rows) < self._batch_size:
                    break
        self.published += total
        return total

    def request(self) -> None:
        """Ask the background loop (:meth:`sweep`) to flush soon. Writers whose input may be
        acknowledged once their transaction committed use this: many requests coalesce into
        one flush, and rows are never lost, since they are in the database already."""
        self._wanted.set()

    async def sweep(self, interval: float = 5.0) -> None:
        """Flush whenever asked (:meth:`request`), and every ``interval`` seconds anyway: the
        safety net for rows whose writer died before they were published."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wanted.wait(), interval)
            self._wanted.clear()
            try:
                await self.flush()
            except Exception:  # the rows stay; the next round retries
                logger.warning("outbox flush failed; retrying", exc_info=True)
                await asyncio.sleep(min(interval, 1.0))
