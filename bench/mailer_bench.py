"""Mailer throughput benchmark (``make bench``).

Measured in one run on this machine, against the same local SMTP sink (aiosmtpd in its own
process, accepting and discarding):

* baseline - pre-rendered messages sent by a bare aiosmtplib loop (as many connections as the
  mailer's pool);
* the mailer, one process (``python -m leadwerk_mailer``): N email commands from the broker
  (``--emails``, default 5,000), each personalised from the shipped welcome template (MJML,
  layout, dynamic block), links tracked, DKIM-signed, consent checked, logged, handed to the
  sink; from the first command accepted to the last one sent.

Target (issue 5): 70% of the baseline, and at least 1,000 emails per second.
Writes ``docs/benchmarks-mailer.md``. Run: ``uv run python -m bench.mailer_bench``.
"""
# A measuring script: it prints, asserts its own bookkeeping and polls on purpose.
# ruff: noqa: T201, S603, S101, ASYNC220

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import aiosmtplib
import asyncpg
from aiokafka import AIOKafkaProducer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.ingest_bench import machine_facts  # noqa: E402
from leadwerk_mailer.domain.message import Envelope as Header  # noqa: E402
from leadwerk_mailer.domain.message import build  # noqa: E402
from leadwerk_mailer.domain.templates import Renderer, Template  # noqa: E402
from leadwerk_mailer.templates import shipped_templates  # noqa: E402
from leadwerk_platform.embedded import EmbeddedBroker, EmbeddedPostgres, free_port  # noqa: E402
from leadwerk_platform.envelope import Envelope, encode  # noqa: E402
from leadwerk_platform.kafka.topics import provision_topics  # noqa: E402
from leadwerk_platform.registry import ContractRegistry  # noqa: E402
from leadwerk_platform.settings import PlatformSettings  # noqa: E402
from leadwerk_platform.testing.helpers import create_database, migrate  # noqa: E402

DOC = ROOT / "docs" / "benchmarks-mailer.md"
POOL = 4
SINK = """
import asyncio, sys
from aiosmtpd.controller import Controller
class Discard:
    async def handle_DATA(self, server, session, envelope):
        return "250 2.0.0 Ok"
controller = Controller(Discard(), hostname="127.0.0.1", port=int(sys.argv[1]))
controller.start()
print("ready", flush=True)
sys.stdin.read()
"""


def prerendered(count: int) -> list[bytes]:
    """The baseline's messages: the welcome template rendered beforehand."""
    shipped = {d["id"]: Template.model_validate(d)
               for _, d in shipped_templates(ROOT / "config" / "templates")}
    out = Renderer().render(shipped["welcome"], shipped["default"],
                            {"first_name": "Anna", "grade": "A"})
    message = build(Header("x@leadwerk.bench", "Leadwerk <no-reply@leadwerk.bench>",
                           "lead@example.de", out.subject, datetime.now(UTC)),
                    out.html, out.text)
    raw = message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
    return [raw] * count


async def baseline(port: int, messages: list[bytes]) -> float:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for raw in messages:
        queue.put_nowait(raw)

    async def worker() -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await client.connect()
        try:
            while not queue.empty():
                raw = queue.get_nowait()
                await client.sendmail("no-reply@leadwerk.bench", ["lead@example.de"], raw)
        finally:
            await client.quit()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(POOL)))
    return len(messages) / (time.perf_counter() - start)


def dkim_key() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption()).decode()


async def run(args: argparse.Namespace, work: Path) -> dict[str, float]:
    broker = EmbeddedBroker(free_port())
    bootstrap = broker.start()
    postgres = EmbeddedPostgres(work / "pg")
    admin_url = postgres.start()
    smtp_port = free_port()
    sink = subprocess.Popen([sys.executable, "-c", SINK, str(smtp_port)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert sink.stdout is not None
    sink.stdout.readline()
    mailer: subprocess.Popen[bytes] | None = None
    try:
        baseline_rate = await baseline(smtp_port, prerendered(args.emails))
        print(f"[baseline] {baseline_rate:,.0f} messages/s")
        database = await create_database(admin_url, "bench")
        await migrate(database, "mailer")
        settings = PlatformSettings(KAFKA_BOOTSTRAP_SERVERS=bootstrap,
                                    LEADWERK_KAFKA_TOPIC_PREFIX="mail.")
        await provision_topics(settings, ContractRegistry.load(ROOT / "schemas"),
                               replication_factor=1)
        pool = await asyncpg.create_pool(database, server_settings={"search_path": "mailer"})
        contacts = [uuid.uuid4() for _ in range(args.emails)]
        now = datetime.now(UTC)
        await pool.executemany(
            "INSERT INTO consent_log (workspace, contact_id, purpose, action, source, at) "
            "VALUES ('dev', $1, 'marketing', 'confirmed', 'bench', $2)",
            [(c, now) for c in contacts])
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        await producer.start()
        for n, contact in enumerate(contacts):
            command = Envelope(
                id=str(uuid.uuid4()), type="email.send_requested.v1", workspace="dev",
                occurred_at=now, received_at=now, producer="bench",
                data={"contact_id": str(contact), "template": "welcome", "class": "marketing",
                      "to": f"lead.{n}@example.de", "sender": {"kind": "owner"},
                      "personalization": {"first_name": f"Anna {n}", "grade": "AB"[n % 2],
                                          "owner": "anna.berger@example.de"},
                      "origin": {"journey_id": "bench"}})
            await producer.send("mail.email-commands", encode(command),
                                key=f"dev:{contact}".encode())
        await producer.flush()
        await producer.stop()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LEADWERK_", "KAFKA_", "DATABASE_"))}
        env.update({"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "DATABASE_URL": database,
                    "LEADWERK_KAFKA_IDEMPOTENCE": "false",
                    "LEADWERK_KAFKA_SESSION_TIMEOUT_MS": "3000",
                    "LEADWERK_KAFKA_TOPIC_PREFIX": "mail.", "LEADWERK_LOG_LEVEL": "WARNING",
                    "LEADWERK_MAILER_PORT": str(free_port()),
                    "LEADWERK_SMTP_URL": f"smtp://127.0.0.1:{smtp_port}",
                    "LEADWERK_SMTP_POOL_SIZE": str(POOL),
                    "LEADWERK_DKIM_DOMAIN": "leadwerk.bench",
                    "LEADWERK_DKIM_PRIVATE_KEY": dkim_key()})
        with (work / "mailer.log").open("ab") as log:
            mailer = subprocess.Popen([sys.executable, "-m", "leadwerk_mailer"], env=env,
                                      stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        deadline = time.monotonic() + 30 + args.emails / 20
        while (sent := await pool.fetchval(
                "SELECT count(*) FROM messages WHERE state = 'sent'")) < args.emails:
            if mailer.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{sent} of {args.emails} sent; see {work / 'mailer.log'}")
            await asyncio.sleep(0.5)
        span = await pool.fetchval("SELECT extract(epoch FROM max(sent_at) - min(created_at)) "
                                   "FROM messages")
        await pool.close()
        rate = args.emails / float(span)
        print(f"[mailer] {rate:,.0f} emails/s")
        return {"baseline": baseline_rate, "mailer": rate}
    finally:
        if mailer is not None and mailer.poll() is None:
            os.killpg(mailer.pid, signal.SIGTERM)
            mailer.wait(30)
        sink.kill()
        sink.wait()
        broker.stop()
        postgres.stop()


def render(results: dict[str, float], args: argparse.Namespace) -> str:
    facts = machine_facts()
    share = results["mailer"] / results["baseline"]
    verdict = "PASS" if share >= 0.7 and results["mailer"] >= 1000 else "FAIL"
    return "\n".join([
        "# Mailer benchmark",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `make bench` "
        f"(`python -m bench.mailer_bench`), commit {facts['commit']}, on {facts['nproc']} "
        f"cores ({facts['cpu']}); embedded Postgres and broker, and the SMTP sink (aiosmtpd, "
        "its own process), on the same machine.",
        "",
        f"{args.emails:,} emails of the shipped welcome template (MJML in the house layout, a "
        f"dynamic block, tracked links, open pixel, DKIM RSA-2048), {POOL} SMTP connections.",
        "",
        "| measurement | emails per second |",
        "|---|---:|",
        f"| baseline: pre-rendered messages, bare aiosmtplib loop | "
        f"{results['baseline']:,.0f} |",
        f"| mailer, one process: command to SMTP 250, with consent check and message log | "
        f"{results['mailer']:,.0f} |",
        "",
        f"The mailer reaches {share:.0%} of the baseline (target: 70% and at least 1,000 "
        f"emails/s): {verdict}.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--emails", type=int, default=5_000)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="leadwerk-mailer-bench-"))
    try:
        results = asyncio.run(run(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = render(results, args)
    DOC.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
