"""crm-bridge settings (environment variables; see README "Configuration")."""

from __future__ import annotations

from pydantic import Field, SecretStr

from leadwerk_platform.settings import PlatformSettings


class BridgeSettings(PlatformSettings):
    port: int = Field(8084, alias="LEADWERK_CRM_BRIDGE_PORT")
    default_workspace: str = Field("dev", alias="LEADWERK_DEFAULT_WORKSPACE")
    database_pool_size: int = Field(10, alias="LEADWERK_CRM_BRIDGE_DB_POOL_SIZE")
    #: Standard Webhooks secrets (``whsec_…``, space-separated; two during a rotation) that
    #: sign outgoing webhooks. Empty in development: one derived from LEADWERK_SECRET_KEY.
    webhook_secrets: SecretStr = Field(SecretStr(""), alias="LEADWERK_WEBHOOK_SECRETS")
    #: Our secrets CRMs sign inbound webhooks with (same specification).
    inbound_secrets: SecretStr = Field(SecretStr(""), alias="LEADWERK_INBOUND_WEBHOOK_SECRETS")
    #: Attempts before a delivery is dead-lettered, and the back-off's first step (doubling,
    #: with jitter, at most ``retry_max_seconds``).
    retry_attempts: int = Field(10, alias="LEADWERK_CRM_RETRY_ATTEMPTS", ge=1)
    retry_base_seconds: float = Field(1.0, alias="LEADWERK_CRM_RETRY_BASE_SECONDS", gt=0)
    retry_max_seconds: float = Field(3600.0, alias="LEADWERK_CRM_RETRY_MAX_SECONDS", gt=0)
    request_timeout: float = Field(10.0, alias="LEADWERK_CRM_TIMEOUT", gt=0)
    #: Batches (requests) a worker sends at once.
    parallel: int = Field(16, alias="LEADWERK_CRM_PARALLEL", gt=0)
    #: Circuit breaker per endpoint: open after this many failed requests in a row, for a
    #: cool-down that starts here and doubles while probes keep failing (at most 5 minutes).
    breaker_failures: int = Field(5, alias="LEADWERK_CRM_BREAKER_FAILURES", gt=0)
    breaker_cooldown_seconds: float = Field(5.0, alias="LEADWERK_CRM_BREAKER_COOLDOWN_SECONDS",
                                            gt=0)
    #: The bridge's public base URL as CRMs call it (HubSpot signs the full URL); default:
    #: the URL of the request as it arrives.
    public_url: str | None = Field(None, alias="LEADWERK_CRM_BRIDGE_PUBLIC_URL")
