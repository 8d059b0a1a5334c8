"""Typed settings shared by every service.

Each service subclasses :class:`PlatformSettings` with its own fields. Values come from the
environment (and an optional ``.env`` file); nothing is read at import time.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Placeholder secrets accepted only when ``LEADWERK_ENV=development``.
DEVELOPMENT_SECRET_KEY = "leadwerk-development-secret-key-do-not-use-in-production"  # noqa: S105
DEVELOPMENT_ADMIN_TOKEN = "leadwerk-development-admin-token"  # noqa: S105
_MIN_SECRET_LENGTH = 32


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class KafkaSecurityProtocol(StrEnum):
    """How the Kafka clients connect (Kafka's own names)."""

    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"


class KafkaSaslMechanism(StrEnum):
    PLAIN = "PLAIN"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    SCRAM_SHA_512 = "SCRAM-SHA-512"


class LogFormat(StrEnum):
    JSON = "json"
    CONSOLE = "console"


def repository_root() -> Path:
    """The checkout this library lives in (used for the default config and schema folders)."""
    return Path(__file__).resolve().parents[3]


def config_entries(config_dir: Path, file: str, key: str) -> list[dict[str, Any]]:
    """The list under ``key`` in an optional YAML file of the configuration folder (e.g.
    ``workspaces.yaml``'s ``workspaces``, which several services read their part of)."""
    path = config_dir / file
    document = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    entries: list[dict[str, Any]] = document.get(key) or []
    return entries


class PlatformSettings(BaseSettings):
    """Settings every Leadwerk service reads."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    environment: Environment = Field(Environment.DEVELOPMENT, alias="LEADWERK_ENV")
    database_url: SecretStr | None = Field(None, alias="DATABASE_URL")
    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", alias="KAFKA_BOOTSTRAP_SERVERS")
    #: TLS and SASL for managed or secured Kafka (MSK, Confluent Cloud, Aiven, Strimzi with
    #: TLS or SCRAM listeners); see docs/decisions/0018-kafka-tls-and-sasl.md.
    kafka_security_protocol: KafkaSecurityProtocol = Field(
        KafkaSecurityProtocol.PLAINTEXT, alias="KAFKA_SECURITY_PROTOCOL")
    kafka_sasl_mechanism: KafkaSaslMechanism = Field(KafkaSaslMechanism.SCRAM_SHA_512,
                                                     alias="KAFKA_SASL_MECHANISM")
    kafka_sasl_username: str | None = Field(None, alias="KAFKA_SASL_USERNAME")
    kafka_sasl_password: SecretStr | None = Field(None, alias="KAFKA_SASL_PASSWORD")
    #: CA bundle that signed the brokers' certificates (default: the system's trust store).
    kafka_ssl_cafile: Path | None = Field(None, alias="KAFKA_SSL_CAFILE")
    #: Client certificate and key for mutual TLS (e.g. a Strimzi KafkaUser with tls auth).
    kafka_ssl_certfile: Path | None = Field(None, alias="KAFKA_SSL_CERTFILE")
    kafka_ssl_keyfile: Path | None = Field(None, alias="KAFKA_SSL_KEYFILE")
    #: Idempotent producer (and, where used, transactions). On for real Kafka; the embedded
    #: broker supports neither, so the local stack turns it off.
    kafka_idempotence: bool = Field(True, alias="LEADWERK_KAFKA_IDEMPOTENCE")
    #: Consumer-group session timeout. The embedded broker (tansu) delays group joins by about
    #: this long, so the local stack and tests run with a short one.
    kafka_session_timeout_ms: int = Field(30_000, alias="LEADWERK_KAFKA_SESSION_TIMEOUT_MS")
    #: Prepended to every topic name from the registry (e.g. ``staging.``); tests use it to
    #: isolate themselves on one broker.
    kafka_topic_prefix: str = Field("", alias="LEADWERK_KAFKA_TOPIC_PREFIX")
    config_dir: Path = Field(default_factory=lambda: repository_root() / "config",
                             alias="LEADWERK_CONFIG_DIR")
    schemas_dir: Path = Field(default_factory=lambda: repository_root() / "schemas",
                              alias="LEADWERK_SCHEMAS_DIR")
    admin_token: SecretStr = Field(SecretStr(DEVELOPMENT_ADMIN_TOKEN), alias="LEADWERK_ADMIN_TOKEN")
    secret_key: SecretStr = Field(SecretStr(DEVELOPMENT_SECRET_KEY), alias="LEADWERK_SECRET_KEY")
    log_level: str = Field("INFO", alias="LEADWERK_LOG_LEVEL")
    log_format: LogFormat = Field(LogFormat.JSON, alias="LEADWERK_LOG_FORMAT")
    host: str = Field("0.0.0.0", alias="LEADWERK_HOST")  # noqa: S104 - containers listen on all interfaces

    @property
    def kafka_tls(self) -> bool:
        """Whether the Kafka clients connect over TLS."""
        return self.kafka_security_protocol in {KafkaSecurityProtocol.SSL,
                                                KafkaSecurityProtocol.SASL_SSL}

    @property
    def kafka_sasl(self) -> bool:
        """Whether the Kafka clients log in with SASL (then username and password are set)."""
        return self.kafka_security_protocol in {KafkaSecurityProtocol.SASL_PLAINTEXT,
                                                KafkaSecurityProtocol.SASL_SSL}

    @model_validator(mode="after")
    def _check_kafka_security(self) -> Self:
        protocol, tls, sasl = self.kafka_security_protocol, self.kafka_tls, self.kafka_sasl
        files = (self.kafka_ssl_cafile, self.kafka_ssl_certfile, self.kafka_ssl_keyfile)
        if not tls and any(files):
            msg = (f"KAFKA_SSL_* files are set but KAFKA_SECURITY_PROTOCOL is {protocol}: "
                   "use SSL or SASL_SSL")
            raise ValueError(msg)
        if (self.kafka_ssl_certfile is None) != (self.kafka_ssl_keyfile is None):
            msg = "KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE go together (mutual TLS)"
            raise ValueError(msg)
        if sasl and not (self.kafka_sasl_username and self.kafka_sasl_password):
            msg = f"{protocol} needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"
            raise ValueError(msg)
        if not sasl and (self.kafka_sasl_username or self.kafka_sasl_password):
            msg = (f"KAFKA_SASL_* credentials are set but KAFKA_SECURITY_PROTOCOL is "
                   f"{protocol}: use SASL_SSL (or SASL_PLAINTEXT)")
            raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> Self:
        if self.environment is Environment.PRODUCTION:
            for name, value, default in (
                ("LEADWERK_SECRET_KEY", self.secret_key, DEVELOPMENT_SECRET_KEY),
                ("LEADWERK_ADMIN_TOKEN", self.admin_token, DEVELOPMENT_ADMIN_TOKEN),
            ):
                secret = value.get_secret_value()
                if secret == default or len(secret) < _MIN_SECRET_LENGTH:
                    msg = (f"{name} must be set to a random value of at least "
                           f"{_MIN_SECRET_LENGTH} characters outside development")
                    raise ValueError(msg)
        return self

    def topic(self, name: str) -> str:
        """The broker-side name of a registry topic."""
        return f"{self.kafka_topic_prefix}{name}"
