"""Pure parts of the platform library: envelope codec, settings, tokens."""

from __future__ import annotations

import ssl
import uuid
from datetime import UTC, datetime

import faust
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError

from leadwerk_platform.caching import short_key_cache
from leadwerk_platform.envelope import (
    EVENT_ID_NAMESPACE,
    Envelope,
    InvalidMessageError,
    decode,
    derive_event_id,
    encode,
)
from leadwerk_platform.kafka.config import consumer_options, producer_options
from leadwerk_platform.kafka.consumer import ConsumerRuntime
from leadwerk_platform.kafka.producer import Publisher
from leadwerk_platform.kafka.streams import faust_credentials
from leadwerk_platform.settings import PlatformSettings
from leadwerk_platform.tokens import EmailToken, InvalidTokenError, TokenKind, TokenSigner


def test_envelope_round_trip_and_major_version() -> None:
    moment = datetime(2026, 11, 21, 9, 30, tzinfo=UTC)
    envelope = Envelope(id=str(uuid.uuid4()), type="tracking.track.v1", workspace="dev",
                        occurred_at=moment, received_at=moment, producer="test",
                        data={"a": 1}, correlation_id="c")
    decoded = decode(encode(envelope))
    assert decoded == envelope
    assert decoded.major_version == 1


@pytest.mark.parametrize("payload", [None, b"", b"[]", b'{"id": 1}', b"\xff",
                                     b'{"id": "x", "type": "t.v1", "workspace": "w", '
                                     b'"occurred_at": "now", "received_at": "now", '
                                     b'"producer": "p", "data": {}}'])
def test_malformed_messages_are_invalid(payload: bytes | None) -> None:
    with pytest.raises(InvalidMessageError):
        decode(payload)


def test_event_ids_are_deterministic_per_workspace() -> None:
    assert derive_event_id("dev", "m1") == derive_event_id("dev", "m1")
    assert derive_event_id("dev", "m1") != derive_event_id("other", "m1")


def test_production_refuses_default_or_short_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEADWERK_ENV", "production")
    with pytest.raises(ValueError, match="LEADWERK_SECRET_KEY"):
        PlatformSettings()
    monkeypatch.setenv("LEADWERK_SECRET_KEY", "s" * 40)
    monkeypatch.setenv("LEADWERK_ADMIN_TOKEN", "short")
    with pytest.raises(ValueError, match="LEADWERK_ADMIN_TOKEN"):
        PlatformSettings()
    monkeypatch.setenv("LEADWERK_ADMIN_TOKEN", "a" * 40)
    settings = PlatformSettings()
    assert "s" * 40 not in repr(settings)  # secrets never show up in logs or reprs


@pytest.mark.parametrize(("env", "problem"), [
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "KAFKA_SASL_USERNAME"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_USERNAME": "u"},
     "KAFKA_SASL_PASSWORD"),
    ({"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"}, "use SASL_SSL"),
    ({"KAFKA_SSL_CAFILE": "/ca.pem"}, "use SSL or SASL_SSL"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CERTFILE": "/c.pem"}, "go together"),
    ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "GSSAPI",
      "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"}, "KAFKA_SASL_MECHANISM"),
])
def test_kafka_security_settings_that_cannot_work_are_refused(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], problem: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=problem):
        PlatformSettings()


def test_kafka_security_settings_reach_every_client_and_hide_the_password(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "leadwerk")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "kafka-secret-value")
    settings = PlatformSettings()
    assert "kafka-secret-value" not in repr(settings)
    for options in (producer_options(settings, "p"), consumer_options(settings, "g", "c")):
        assert options["security_protocol"] == "SASL_SSL"
        assert options["sasl_mechanism"] == "SCRAM-SHA-256"
        assert options["sasl_plain_password"] == "kafka-secret-value"
        assert options["ssl_context"].verify_mode == ssl.CERT_REQUIRED
        assert options["ssl_context"].check_hostname
    credentials = faust_credentials(settings)
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.protocol.value == "SASL_SSL"
    assert credentials.mechanism.value == "SCRAM-SHA-256"
    assert "kafka-secret-value" not in repr(credentials)


def test_tokens_round_trip_and_refuse_tampering() -> None:
    signer = TokenSigner("k" * 40)
    token = EmailToken(kind=TokenKind.CLICK, workspace="dev", contact_id="c",
                       message_id="m", url="https://example.com/x", link_id="l")
    text = signer.sign(token)
    verified = signer.verify(TokenKind.CLICK, text)
    assert (verified.contact_id, verified.url, verified.link_id) == ("c", "https://example.com/x",
                                                                     "l")
    for bad in (text + "x", text.replace(".", "..", 1), "x" * len(text)):
        with pytest.raises(InvalidTokenError):
            signer.verify(TokenKind.CLICK, bad)
    with pytest.raises(InvalidTokenError):
        signer.verify(TokenKind.OPEN, text)  # purposes are not interchangeable
    with pytest.raises(InvalidTokenError):
        TokenSigner("other" * 10).verify(TokenKind.CLICK, text)
    javascript = signer.sign(EmailToken(kind=TokenKind.CLICK, workspace="dev", contact_id="c",
                                        url="javascript:alert(1)"))
    with pytest.raises(InvalidTokenError):
        signer.verify(TokenKind.CLICK, javascript)


def test_fast_event_id_equals_uuid5() -> None:
    for workspace, message_id in (("dev", "m1"), ("shop", "ä-🙂"), ("w", "")):
        assert derive_event_id(workspace, message_id) == str(
            uuid.uuid5(EVENT_ID_NAMESPACE, f"{workspace}\x1f{message_id}"))


async def test_a_commit_lost_to_a_rebalance_is_not_fatal() -> None:
    class Reassigned:
        calls = 0

        async def commit(self, offsets: object) -> None:
            self.calls += 1
            raise CommitFailedError("partition reassigned")

    async def handler(message: object) -> None:
        return None

    settings = PlatformSettings()
    runtime = ConsumerRuntime(settings, group_id="g", topics={"t": "t-dlq"}, handler=handler,
                              dead_letter_publisher=Publisher(settings, "x"))
    consumer = Reassigned()
    runtime._consumer = consumer  # the seam under test (the runtime types it loosely)
    await runtime._commit(TopicPartition("t", 0), 5)
    assert consumer.calls == 1


def test_short_key_cache_keeps_only_short_keys() -> None:
    calls: list[str] = []

    @short_key_cache(maxsize=8, max_key_length=4)
    def upper(key: str) -> str:
        calls.append(key)
        return key.upper()

    assert [upper("ab"), upper("ab"), upper("abcdef"), upper("abcdef")] == [
        "AB", "AB", "ABCDEF", "ABCDEF"]
    assert calls == ["ab", "abcdef", "abcdef"]  # the long key is never kept
