"""Client settings derived from :class:`PlatformSettings`, in one place."""

from __future__ import annotations

import random
import ssl
from typing import Any

from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import murmur2

from leadwerk_platform.caching import short_key_cache
from leadwerk_platform.settings import PlatformSettings


def _positive_murmur2(key: bytes) -> int:
    return int(murmur2(key)) & 0x7FFFFFFF


class CachedPartitioner:
    """Kafka's default partitioning (murmur2 of the key, as the Java client does), with the hash
    cached per key: aiokafka's murmur2 is pure Python (~6 µs) and keys repeat (one visitor sends
    many events). Same partitions as the default partitioner, so mixed producers agree."""

    def __init__(self, cache_size: int = 65_536) -> None:
        # Keys come from clients: only short ones are kept (see short_key_cache).
        self._hash = short_key_cache(cache_size, 256)(_positive_murmur2)

    def __call__(self, key: bytes | None, all_partitions: list[int],
                 available: list[int]) -> int:
        if key is None:
            return random.choice(available or all_partitions)  # noqa: S311 - not crypto
        partition: int = all_partitions[self._hash(key) % len(all_partitions)]
        return partition


#: How long a fetch may wait at the broker for new data. A broker that does not answer a
#: waiting fetch early when data arrives (the embedded tansu) adds up to this much latency per
#: hop; real Kafka answers as soon as data is there, so a short wait costs only a few idle
#: fetch requests per second. Used by plain consumers and by the faust stream processors.
FETCH_MAX_WAIT_MS = 100


def ssl_context(settings: PlatformSettings) -> ssl.SSLContext | None:
    """The TLS context for SSL and SASL_SSL (certificates verified, host names checked; the
    system's trust store unless ``KAFKA_SSL_CAFILE`` names one); None without TLS."""
    if not settings.kafka_tls:
        return None
    context: ssl.SSLContext = create_ssl_context(
        cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None,
        certfile=str(settings.kafka_ssl_certfile) if settings.kafka_ssl_certfile else None,
        keyfile=str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None)
    return context


def connection_options(settings: PlatformSettings) -> dict[str, Any]:
    """Where and how every aiokafka client (producer, consumer, admin) connects."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol.value,
    }
    context = ssl_context(settings)
    if context is not None:
        options["ssl_context"] = context
    if settings.kafka_sasl and settings.kafka_sasl_password is not None:
        options.update(sasl_mechanism=settings.kafka_sasl_mechanism.value,
                       sasl_plain_username=settings.kafka_sasl_username,
                       sasl_plain_password=settings.kafka_sasl_password.get_secret_value())
    return options


def producer_options(settings: PlatformSettings, client_id: str) -> dict[str, Any]:
    """aiokafka producer keyword arguments.

    ``acks=all`` always; the idempotent producer only where the broker supports it (real Kafka),
    see docs/decisions/0003-embedded-broker-client-settings.md.
    """
    return {
        **connection_options(settings),
        "client_id": client_id,
        "acks": "all",
        "enable_idempotence": settings.kafka_idempotence,
        "linger_ms": 0,
        # 128 KiB record batches (aiokafka's default is 16 KiB): under load fewer, fuller
        # batches per produce request cut ingest's CPU per batched event by ~15 %
        # (docs/decisions/0006-ingest-performance.md); far below the broker's 1 MiB limit.
        "max_batch_size": 131_072,
        "request_timeout_ms": 10_000,
        "retry_backoff_ms": 100,
        "partitioner": CachedPartitioner(),
    }


def consumer_options(settings: PlatformSettings, group_id: str, client_id: str) -> dict[str, Any]:
    """aiokafka consumer keyword arguments: manual commits, read committed where supported."""
    return {
        **connection_options(settings),
        "client_id": client_id,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed" if settings.kafka_idempotence else "read_uncommitted",
        "max_poll_records": 500,
        "fetch_max_wait_ms": FETCH_MAX_WAIT_MS,
        "session_timeout_ms": settings.kafka_session_timeout_ms,
        "heartbeat_interval_ms": max(100, settings.kafka_session_timeout_ms // 10),
        "rebalance_timeout_ms": max(settings.kafka_session_timeout_ms, 10_000),
    }
