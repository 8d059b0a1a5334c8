"""Mailer settings (environment variables; see README "Configuration")."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr

from leadwerk_platform.settings import PlatformSettings


class MailerSettings(PlatformSettings):
    port: int = Field(8083, alias="LEADWERK_MAILER_PORT")
    default_workspace: str = Field("dev", alias="LEADWERK_DEFAULT_WORKSPACE")
    database_pool_size: int = Field(10, alias="LEADWERK_MAILER_DB_POOL_SIZE")
    #: The marketing transport: smtp://user:password@host:587?starttls=true, smtps://… for
    #: implicit TLS. ``make run`` points it at the local capture server.
    smtp_url: SecretStr = Field(SecretStr("smtp://127.0.0.1:8025"), alias="LEADWERK_SMTP_URL")
    #: A separate relay for transactional and internal mail; empty: the same as marketing.
    smtp_transactional_url: SecretStr = Field(SecretStr(""),
                                              alias="LEADWERK_SMTP_TRANSACTIONAL_URL")
    smtp_pool_size: int = Field(4, alias="LEADWERK_SMTP_POOL_SIZE", gt=0)
    smtp_timeout: float = Field(30.0, alias="LEADWERK_SMTP_TIMEOUT", gt=0)
    #: Per transport: messages per second (0: no limit) and per rolling hour (0: no limit).
    smtp_rate_per_second: float = Field(0, alias="LEADWERK_SMTP_RATE_PER_SECOND", ge=0)
    smtp_rate_per_hour: int = Field(0, alias="LEADWERK_SMTP_RATE_PER_HOUR", ge=0)
    #: Sender of mail without an owner or fixed sender, and the domain of Message-IDs.
    default_sender: str = Field("Leadwerk <no-reply@leadwerk.localhost>",
                                alias="LEADWERK_MAILER_FROM")
    #: Where links in emails point: ingest's public base URL (click, open, unsubscribe).
    ingest_public_url: str = Field("http://127.0.0.1:8080", alias="LEADWERK_INGEST_PUBLIC_URL")
    #: DKIM: the signing domain, the selector and the PEM private key (or a file holding it).
    dkim_domain: str = Field("", alias="LEADWERK_DKIM_DOMAIN")
    dkim_selector: str = Field("leadwerk", alias="LEADWERK_DKIM_SELECTOR")
    dkim_private_key: SecretStr = Field(SecretStr(""), alias="LEADWERK_DKIM_PRIVATE_KEY")
    dkim_private_key_file: Path | None = Field(None, alias="LEADWERK_DKIM_PRIVATE_KEY_FILE")
    #: Temporary failures are retried this often, waiting base · 2^attempt seconds.
    retry_attempts: int = Field(6, alias="LEADWERK_MAILER_RETRY_ATTEMPTS", ge=0)
    retry_base_seconds: float = Field(60.0, alias="LEADWERK_MAILER_RETRY_BASE_SECONDS", gt=0)
    #: A command accepted but neither sent nor refused this long ago was left by a killed
    #: mailer: the retry worker delivers it. Longer than rendering one message takes.
    abandoned_after_seconds: float = Field(30.0, alias="LEADWERK_MAILER_ABANDONED_AFTER_SECONDS",
                                           gt=0)
    #: Marketing email only to contacts whose marketing consent is recorded (and confirmed
    #: where double opt-in applies). Off only for tests of other parts.
    require_consent: bool = Field(True, alias="LEADWERK_MAILER_REQUIRE_CONSENT")
    #: Marketing mail for a contact with no consent on record waits this long for one: the
    #: form that gives consent also starts journeys, and their mail can overtake the consent.
    consent_grace_seconds: float = Field(300.0, alias="LEADWERK_MAILER_CONSENT_GRACE_SECONDS",
                                         ge=0)

    def dkim_key(self) -> bytes | None:
        if self.dkim_private_key_file is not None:
            return self.dkim_private_key_file.read_bytes()
        key = self.dkim_private_key.get_secret_value()
        return key.encode() if key else None
