"""Kafka over TLS (with client certificates) and SASL/SCRAM over TLS, end to end.

The embedded broker speaks neither, so a gateway in front of it does, the way a secured
Kafka listener does: it terminates TLS with a certificate from a test CA (requiring a client
certificate when asked), and for SASL it answers ``SaslHandshake`` and ``SaslAuthenticate``
itself with a real SCRAM server (RFC 5802/7677) before it forwards anything but
``ApiVersions``. The broker advertises the gateway's port, so every connection a client opens
(bootstrap, coordinator, partition leaders) goes through it. The clients are the platform's
own: topic provisioning (admin), the publisher (producer), a plain consumer with the platform's
options and a faust stream processor, configured only through the documented settings.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import os
import ssl
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaConnectionError
from aiokafka.protocol.admin import (
    SaslAuthenticateResponse_v0,
    SaslAuthenticateResponse_v1,
    SaslHandShakeResponse_v0,
    SaslHandShakeResponse_v1,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from leadwerk_platform.embedded import EmbeddedBroker, free_port
from leadwerk_platform.envelope import Envelope, decode, encode
from leadwerk_platform.kafka.config import consumer_options
from leadwerk_platform.kafka.producer import OutgoingMessage, Publisher
from leadwerk_platform.kafka.streams import Rejected, StreamMessage, StreamProcessor
from leadwerk_platform.kafka.topics import provision_topics
from leadwerk_platform.registry import ContractRegistry
from leadwerk_platform.settings import PlatformSettings

SCRAM_USER, SCRAM_PASSWORD = "leadwerk-ingest", "correct horse battery staple"
_SASL_HANDSHAKE, _SASL_AUTHENTICATE, _API_VERSIONS = 17, 36, 18
_SASL_AUTHENTICATION_FAILED = 58


# -- certificates ----------------------------------------------------------------------------

def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, Any] | None,
                 *, ca: bool = False, server: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = (x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer[0])]),
                               issuer[1]) if issuer else (name, key)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        import ipaddress  # noqa: PLC0415 - only here

        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, *items: x509.Certificate | ec.EllipticCurvePrivateKey) -> Path:
    pem = b""
    for item in items:
        pem += (item.public_bytes(serialization.Encoding.PEM)
                if isinstance(item, x509.Certificate) else
                item.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    path.write_bytes(pem)
    return path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing the gateway shows


def make_pki(folder: Path) -> Pki:
    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca = _certificate("Leadwerk test CA", ca_key, None, ca=True)
    server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    issuer = ("Leadwerk test CA", ca_key)
    return Pki(
        ca=_write(folder / "ca.pem", ca),
        server_cert=_write(folder / "server.pem",
                           _certificate("127.0.0.1", server_key, issuer, server=True)),
        server_key=_write(folder / "server-key.pem", server_key),
        client_cert=_write(folder / "client.pem",
                           _certificate("leadwerk-scoring", client_key, issuer)),
        client_key=_write(folder / "client-key.pem", client_key),
        other_ca=_write(folder / "other-ca.pem",
                        _certificate("Somebody else's CA", other_key, None, ca=True)))


# -- SCRAM server ------------------------------------------------------------------------------

class ScramServer:
    """The server side of one SCRAM-SHA-256/512 exchange (RFC 5802), for one known user."""

    def __init__(self, mechanism: str, users: dict[str, str]) -> None:
        self.digest = "sha512" if mechanism.endswith("512") else "sha256"
        self.users = users
        self.salt, self.iterations = os.urandom(16), 4096
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        self.first_bare = self.server_first = ""
        self.salted = b""
        self.user: str | None = None

    def _hmac(self, key: bytes, data: bytes) -> bytes:
        return hmac.new(key, data, self.digest).digest()

    def step(self, message: bytes) -> tuple[bool, bytes]:
        """(ok, answer) for the client's next message."""
        text = message.decode()
        if not self.first_bare:
            self.first_bare = text.split(",", 2)[2]  # drop the GS2 header "n,,"
            fields = dict(part.split("=", 1) for part in self.first_bare.split(","))
            self.user = fields["n"]
            password = self.users.get(self.user, "")
            self.salted = hashlib.pbkdf2_hmac(self.digest, password.encode(), self.salt,
                                              self.iterations)
            self.server_first = (f"r={fields['r']}{self.nonce},"
                                 f"s={base64.b64encode(self.salt).decode()},"
                                 f"i={self.iterations}")
            return True, self.server_first.encode()
        without_proof, _, proof = text.rpartition(",p=")
        auth_message = f"{self.first_bare},{self.server_first},{without_proof}".encode()
        client_key = self._hmac(self.salted, b"Client Key")
        stored = hashlib.new(self.digest, client_key).digest()
        signature = self._hmac(stored, auth_message)
        recovered = bytes(a ^ b for a, b in zip(base64.b64decode(proof), signature,
                                                 strict=True))
        if (self.user not in self.users
                or hashlib.new(self.digest, recovered).digest() != stored):
            return False, b"e=invalid-proof"
        server_signature = self._hmac(self._hmac(self.salted, b"Server Key"), auth_message)
        return True, b"v=" + base64.b64encode(server_signature)


# -- the gateway -------------------------------------------------------------------------------

def _string(data: bytes, at: int) -> tuple[str, int]:
    (length,) = struct.unpack_from(">h", data, at)
    return data[at + 2:at + 2 + max(length, 0)].decode(), at + 2 + max(length, 0)


@dataclass
class Gateway:
    """TLS and/or SASL/SCRAM in front of the embedded broker, on its own thread and loop."""

    upstream: int
    tls: ssl.SSLContext | None = None
    scram_users: dict[str, str] | None = None
    port: int = field(default_factory=free_port)
    client_subjects: list[str] = field(default_factory=list)
    authenticated: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                  ssl=self.tls)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert")
        if peer:
            self.client_subjects.append(dict(x[0] for x in peer["subject"])["commonName"])
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return
        try:
            if self.scram_users is None or await self._authenticate(reader, writer, up_reader,
                                                                    up_writer):
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            for w in (writer, up_writer):
                with contextlib.suppress(Exception):
                    w.close()

    async def _authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            up_reader: asyncio.StreamReader,
                            up_writer: asyncio.StreamWriter) -> bool:
        """Answer the SASL exchange; True once the client proved the password."""
        assert self.scram_users is not None
        scram: ScramServer | None = None
        while True:
            frame = await _read_frame(reader)
            api_key, version, correlation = struct.unpack_from(">hhi", frame)
            _, body_at = _string(frame, 8)  # client id
            if api_key == _API_VERSIONS:
                up_writer.write(struct.pack(">i", len(frame)) + frame)
                answer = await _read_frame(up_reader)
                writer.write(struct.pack(">i", len(answer)) + answer)
                continue
            if api_key == _SASL_HANDSHAKE:
                mechanism, _ = _string(frame, body_at)
                known = ["SCRAM-SHA-256", "SCRAM-SHA-512"]
                scram = ScramServer(mechanism, self.scram_users) if mechanism in known else None
                response: Any = (SaslHandShakeResponse_v1 if version else
                                 SaslHandShakeResponse_v0)(0 if scram else 33, known)
                _answer(writer, correlation, response.encode())
                continue
            if api_key == _SASL_AUTHENTICATE and scram is not None:
                (length,) = struct.unpack_from(">i", frame, body_at)
                ok, reply = scram.step(frame[body_at + 4:body_at + 4 + length])
                code, text = (0, None) if ok else (_SASL_AUTHENTICATION_FAILED,
                                                   "authentication failed")
                fields: tuple[Any, ...] = (code, text, reply) + ((0,) if version else ())
                response = (SaslAuthenticateResponse_v1 if version else
                            SaslAuthenticateResponse_v0)(*fields)
                _answer(writer, correlation, response.encode())
                await writer.drain()
                if not ok:
                    self.refused.append(scram.user or "")
                    return False
                if reply.startswith(b"v="):
                    self.authenticated.append(scram.user or "")
                    return True
                continue
            return False  # anything else before authentication: hang up, as Kafka does


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = struct.unpack(">i", await reader.readexactly(4))
    return await reader.readexactly(size)


def _answer(writer: asyncio.StreamWriter, correlation: int, body: bytes) -> None:
    writer.write(struct.pack(">ii", len(body) + 4, correlation) + body)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65_536):
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(Exception):
            writer.close()


def _server_tls(pki: Pki, *, client_certificates: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    if client_certificates:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki.ca)
    return context


@dataclass(frozen=True)
class Secured:
    pki: Pki
    mtls: Gateway
    scram: Gateway


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """Two brokers: one behind TLS with client certificates, one behind SASL/SCRAM over TLS."""
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    gateways = [Gateway(0, _server_tls(pki, client_certificates=True)),
                Gateway(0, _server_tls(pki, client_certificates=False),
                        scram_users={SCRAM_USER: SCRAM_PASSWORD})]
    brokers = []
    try:
        for gateway in gateways:
            broker = EmbeddedBroker(free_port(), advertised_port=gateway.port)
            brokers.append(broker)
            broker.start()
            gateway.upstream = broker.port
            gateway.start()
        yield Secured(pki, *gateways)
    finally:
        for gateway in gateways:
            with contextlib.suppress(Exception):
                gateway.stop()
        for broker in brokers:
            broker.stop()


def _settings(monkeypatch: pytest.MonkeyPatch, gateway: Gateway, **env: str) -> PlatformSettings:
    for name in list(os.environ):
        if name.startswith("KAFKA_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{gateway.port}")
    monkeypatch.setenv("LEADWERK_KAFKA_IDEMPOTENCE", "false")
    monkeypatch.setenv("LEADWERK_KAFKA_SESSION_TIMEOUT_MS", "2000")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return PlatformSettings()


def _event(n: int) -> Envelope:
    now = dt.datetime.now(dt.UTC)
    return Envelope(id=f"00000000-0000-4000-8000-{n:012d}", type="tracking.track.v1",
                    workspace="dev", occurred_at=now, received_at=now, producer="test",
                    data={"n": n})


async def _round_trip(settings: PlatformSettings, registry: ContractRegistry) -> None:
    """Provision, publish three events, read them with a plain consumer and with faust."""
    await provision_topics(settings, registry, replication_factor=1)
    topic = settings.topic("tracking-events")
    publisher = Publisher(settings, "test-secured")
    await publisher.start(wait=15)
    assert publisher.ready
    try:
        await publisher.publish([OutgoingMessage(topic, b"k", encode(_event(n)))
                                 for n in range(3)])
        consumer = AIOKafkaConsumer(topic, **consumer_options(settings, "secured-plain",
                                                              "test"))
        await consumer.start()
        try:
            seen: list[int] = []
            async with asyncio.timeout(30):
                while len(seen) < 3:
                    for records in (await consumer.getmany(timeout_ms=500)).values():
                        seen += [decode(r.value).data["n"] for r in records if r.value]
        finally:
            await consumer.stop()
        assert sorted(seen) == [0, 1, 2]

        streamed: list[int] = []
        done = asyncio.Event()

        async def handler(batch: Any) -> list[Rejected]:
            streamed.extend(m.envelope.data["n"] for m in batch if isinstance(m, StreamMessage))
            if len(streamed) >= 3:
                done.set()
            return []

        failed: list[BaseException] = []
        processor = StreamProcessor(settings, group_id="secured-faust",
                                    topics={"tracking-events": "tracking-events-dlq"},
                                    handler=handler, publisher=publisher,
                                    on_fatal=failed.append)
        await processor.start()
        try:
            async with asyncio.timeout(60):
                await done.wait()
        finally:
            await processor.stop()
        assert sorted(streamed) == [0, 1, 2]
        assert not failed
    finally:
        await publisher.stop()


async def _connects(settings: PlatformSettings) -> bool:
    """Whether a publisher gets a connection within two seconds."""
    publisher = Publisher(settings, "test-refused", reconnect_interval=0.2)
    await publisher.start(wait=2)
    try:
        return publisher.ready
    finally:
        await publisher.stop()


async def test_clients_speak_tls_with_client_certificates(
        secured: Secured, contract_registry: ContractRegistry,
        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(monkeypatch, secured.mtls, KAFKA_SECURITY_PROTOCOL="SSL",
                         KAFKA_SSL_CAFILE=str(secured.pki.ca),
                         KAFKA_SSL_CERTFILE=str(secured.pki.client_cert),
                         KAFKA_SSL_KEYFILE=str(secured.pki.client_key),
                         LEADWERK_KAFKA_TOPIC_PREFIX="mtls.")
    await _round_trip(settings, contract_registry)
    # Every connection (admin, producer, both consumers, faust's) showed the client cert.
    assert len(secured.mtls.client_subjects) >= 4
    assert set(secured.mtls.client_subjects) == {"leadwerk-scoring"}


async def test_tls_refuses_a_broker_certificate_from_another_ca(
        secured: Secured, contract_registry: ContractRegistry,
        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(monkeypatch, secured.mtls, KAFKA_SECURITY_PROTOCOL="SSL",
                         KAFKA_SSL_CAFILE=str(secured.pki.other_ca),
                         KAFKA_SSL_CERTFILE=str(secured.pki.client_cert),
                         KAFKA_SSL_KEYFILE=str(secured.pki.client_key))
    assert not await _connects(settings)
    with pytest.raises(KafkaConnectionError):
        await provision_topics(settings, contract_registry, replication_factor=1)


async def test_clients_authenticate_with_scram_over_tls(
        secured: Secured, contract_registry: ContractRegistry,
        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(monkeypatch, secured.scram, KAFKA_SECURITY_PROTOCOL="SASL_SSL",
                         KAFKA_SSL_CAFILE=str(secured.pki.ca),
                         KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
                         KAFKA_SASL_USERNAME=SCRAM_USER, KAFKA_SASL_PASSWORD=SCRAM_PASSWORD,
                         LEADWERK_KAFKA_TOPIC_PREFIX="scram.")
    await _round_trip(settings, contract_registry)
    assert len(secured.scram.authenticated) >= 4
    assert set(secured.scram.authenticated) == {SCRAM_USER}
    assert not secured.scram.refused


async def test_scram_refuses_a_wrong_password(
        secured: Secured, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(monkeypatch, secured.scram, KAFKA_SECURITY_PROTOCOL="SASL_SSL",
                         KAFKA_SSL_CAFILE=str(secured.pki.ca),
                         KAFKA_SASL_MECHANISM="SCRAM-SHA-256",
                         KAFKA_SASL_USERNAME=SCRAM_USER, KAFKA_SASL_PASSWORD="wrong")
    assert not await _connects(settings)
    assert SCRAM_USER in secured.scram.refused
