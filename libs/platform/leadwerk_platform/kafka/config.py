"""Client settings derived from :class:`PlatformSettings`, in one place."""

from __future__ import annotations

from typing import Any

from leadwerk_platform.settings import PlatformSettings


def producer_options(settings: PlatformSettings, client_id: str) -> dict[str, Any]:
    """aiokafka producer keyword arguments.

    ``acks=all`` always; the idempotent producer only where the broker supports it (real Kafka),
    see docs/decisions/0003-embedded-broker-client-settings.md.
    """
    return {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "client_id": client_id,
        "acks": "all",
        "enable_idempotence": settings.kafka_idempotence,
        "linger_ms": 0,
        "request_timeout_ms": 10_000,
        "retry_backoff_ms": 100,
    }


def consumer_options(settings: PlatformSettings, group_id: str, client_id: str) -> dict[str, Any]:
    """aiokafka consumer keyword arguments: manual commits, read committed where supported."""
    return {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "client_id": client_id,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed" if settings.kafka_idempotence else "read_uncommitted",
        "max_poll_records": 500,
        "session_timeout_ms": settings.kafka_session_timeout_ms,
        "heartbeat_interval_ms": max(100, settings.kafka_session_timeout_ms // 10),
        "rebalance_timeout_ms": max(settings.kafka_session_timeout_ms, 10_000),
    }
