"""Ingest settings (environment variables; see README "Configuration")."""

from __future__ import annotations

from pydantic import Field

from leadwerk_platform.settings import PlatformSettings


class IngestSettings(PlatformSettings):
    port: int = Field(8080, alias="LEADWERK_INGEST_PORT")
    #: Extra write keys for the default workspace, comma-separated.
    write_keys: str = Field("", alias="LEADWERK_WRITE_KEYS")
    default_workspace: str = Field("dev", alias="LEADWERK_DEFAULT_WORKSPACE")
    #: How long a request may wait for the broker's acks before answering 503.
    produce_timeout: float = Field(3.0, alias="LEADWERK_INGEST_PRODUCE_TIMEOUT")
    retry_after_seconds: int = Field(5, alias="LEADWERK_INGEST_RETRY_AFTER")
    max_event_bytes: int = Field(32 * 1024, alias="LEADWERK_INGEST_MAX_EVENT_BYTES")
    max_batch_bytes: int = Field(500 * 1024, alias="LEADWERK_INGEST_MAX_BATCH_BYTES")
    #: Proxies whose X-Forwarded-For is trusted (uvicorn's forwarded_allow_ips).
    forwarded_allow_ips: str = Field("127.0.0.1", alias="LEADWERK_FORWARDED_ALLOW_IPS")

    def extra_write_keys(self) -> list[str]:
        return [key.strip() for key in self.write_keys.split(",") if key.strip()]
