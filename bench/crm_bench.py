"""crm-bridge throughput benchmark (``make bench``).

Measured in one run on this machine, against the same local webhook receiver (uvicorn in its
own process, counting every activity id it accepts):

* baseline - a bare httpx POST loop: one activity per request, as many concurrent requests as
  the bridge sends (``LEADWERK_CRM_PARALLEL``, 16);
* the bridge, one process (``python -m leadwerk_crm_bridge``): N ``contact.activity.v1``
  events from the broker (``--activities``, default 20,000, spread over a quarter as many
  contacts), each matched against the activity rules, remembered for the hand-off summary,
  queued, batched (100 per request, a contact at most once per request so its activities stay
  in order), signed (Standard Webhooks) and delivered; from the first delivery queued to the
  last one delivered;
* a fault run: the same with the receiver answering 20% of requests with 503 and taking 5%
  but answering only after the bridge's timeout (1 s); every activity must arrive, none
  lost; repeats of what the receiver already took are counted (it deduplicates on the ids).

Target (issue 6): 1,000 activities per second or more per process.
Writes ``docs/benchmarks-crm.md``. Run: ``uv run python -m bench.crm_bench``.
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
from typing import Any

import asyncpg
import httpx
import orjson
import yaml
from aiokafka import AIOKafkaProducer

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.ingest_bench import machine_facts  # noqa: E402
from bench.summary import Figure, record  # noqa: E402
from leadwerk_platform.embedded import EmbeddedBroker, EmbeddedPostgres, free_port  # noqa: E402
from leadwerk_platform.envelope import Envelope, encode  # noqa: E402
from leadwerk_platform.kafka.topics import provision_topics  # noqa: E402
from leadwerk_platform.registry import ContractRegistry  # noqa: E402
from leadwerk_platform.settings import PlatformSettings  # noqa: E402
from leadwerk_platform.testing.helpers import create_database, migrate  # noqa: E402

DOC = ROOT / "docs" / "benchmarks-crm.md"
PARALLEL = 16
RECEIVER = """
import asyncio, random, sys, orjson, uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
seen, stats = set(), {"requests": 0, "items": 0, "repeats": 0, "failed": 0, "slow": 0}
faults = sys.argv[2] == "faults"
async def take(request):
    body = orjson.loads(await request.body())
    stats["requests"] += 1
    if faults:
        roll = random.random()
        if roll < 0.20:
            stats["failed"] += 1
            return Response(status_code=503)
    items = body["data"]["items"] if body["type"] == "contact.activities" else [body]
    for item in items:
        key = item.get("id") or item["data"]["event_id"]
        stats["items"] += 1
        if key in seen:
            stats["repeats"] += 1
        seen.add(key)
    if faults and roll < 0.25:
        stats["slow"] += 1
        await asyncio.sleep(2.0)  # taken, but the answer comes after the bridge gave up
    return Response(status_code=204)
async def report(request):
    return JSONResponse({**stats, "unique": len(seen)})
async def reset(request):
    seen.clear()
    for key in stats:
        stats[key] = 0
    return Response(status_code=204)
app = Starlette(routes=[Route("/hook", take, methods=["POST"]),
                        Route("/stats", report), Route("/reset", reset, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            access_log=False)
"""


class Receiver:
    def __init__(self, faults: bool) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process = subprocess.Popen(
            [sys.executable, "-c", RECEIVER, str(self.port), "faults" if faults else "ok"])

    async def ready(self) -> None:
        async with httpx.AsyncClient() as client:
            for _ in range(100):
                try:
                    await client.get(f"{self.url}/stats")
                    return
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
        raise RuntimeError("the receiver did not start")

    async def stats(self) -> dict[str, int]:
        async with httpx.AsyncClient() as client:
            result: dict[str, int] = (await client.get(f"{self.url}/stats")).json()
        return result

    async def reset(self) -> None:
        async with httpx.AsyncClient() as client:
            await client.post(f"{self.url}/reset")

    def stop(self) -> None:
        self._process.kill()
        self._process.wait()


def activity(contact: uuid.UUID, n: int, at: datetime) -> Envelope:
    return Envelope(id=str(uuid.uuid4()), type="contact.activity.v1", workspace="dev",
                    occurred_at=at, received_at=at, producer="bench",
                    data={"contact_id": str(contact), "known": True, "kind": "track",
                          "name": "Document Downloaded",
                          "properties": {"properties.document": f"sheet-{n % 7}.pdf",
                                         "page.path": "/downloads"}})


def write_config(config: Path, receiver: str) -> Path:
    config.mkdir()
    (config / "workspaces.yaml").write_text(yaml.safe_dump({"workspaces": [
        {"id": "dev", "write_keys": ["bench"], "allow_private_webhooks": True}]}))
    (config / "connectors.yaml").write_text(yaml.safe_dump({
        "activities": [{"type": "track", "event": "Document Downloaded",
                        "label": "downloaded {properties.document}"}],
        "connectors": [{"id": "timeline", "workspace": "dev", "kind": "webhook",
                        "url": f"{receiver}/hook", "events": ["activity"],
                        "batch_size": 100}]}))
    return config


async def seed(bootstrap: str, prefix: str, count: int) -> None:
    """``count`` activities of a quarter as many contacts on contact-events."""
    settings = PlatformSettings(KAFKA_BOOTSTRAP_SERVERS=bootstrap,
                                LEADWERK_KAFKA_TOPIC_PREFIX=prefix)
    await provision_topics(settings, ContractRegistry.load(ROOT / "schemas"),
                           replication_factor=1)
    contacts = [uuid.uuid4() for _ in range(max(1, count // 4))]
    now = datetime.now(UTC)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        for n in range(count):
            contact = contacts[n % len(contacts)]
            await producer.send(f"{prefix}contact-events", encode(activity(contact, n, now)),
                                key=f"dev:{contact}".encode())
        await producer.flush()
    finally:
        await producer.stop()


async def baseline(url: str, count: int) -> float:
    """One activity per POST, ``PARALLEL`` at a time, with a bare httpx client."""
    now = datetime.now(UTC)
    bodies = [orjson.dumps({"type": "contact.activity", "timestamp": now.isoformat(),
                            "data": {"event_id": str(uuid.uuid4()), "label": "downloaded"}})
              for _ in range(count)]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    async with httpx.AsyncClient(timeout=10) as client:

        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                response = await client.post(f"{url}/hook", content=body,
                                             headers={"Content-Type": "application/json"})
                assert response.status_code == 204

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(PARALLEL)))
    return count / (time.perf_counter() - start)


async def bridge_run(args: argparse.Namespace, work: Path, bootstrap: str, admin_url: str,
                     *, faults: bool) -> dict[str, Any]:
    receiver = Receiver(faults)
    bridge: subprocess.Popen[bytes] | None = None
    name = "faults" if faults else "clean"
    count = args.activities if not faults else args.fault_activities
    try:
        await receiver.ready()
        result: dict[str, Any] = {}
        if not faults:
            result["baseline"] = await baseline(receiver.url, count)
            print(f"[baseline] {result['baseline']:,.0f} activities/s (one per request)")
            await receiver.reset()
        config = write_config(work / f"config-{name}", receiver.url)
        database = await create_database(admin_url, f"crm{name}")
        await migrate(database, "crm-bridge")
        prefix = f"crm{name}."
        await seed(bootstrap, prefix, count)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LEADWERK_", "KAFKA_", "DATABASE_"))}
        env.update({"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "DATABASE_URL": database,
                    "LEADWERK_KAFKA_IDEMPOTENCE": "false",
                    "LEADWERK_KAFKA_SESSION_TIMEOUT_MS": "3000",
                    "LEADWERK_KAFKA_TOPIC_PREFIX": prefix, "LEADWERK_LOG_LEVEL": "WARNING",
                    "LEADWERK_CONFIG_DIR": str(config),
                    "LEADWERK_CRM_BRIDGE_PORT": str(free_port()),
                    "LEADWERK_CRM_PARALLEL": str(PARALLEL), "LEADWERK_CRM_TIMEOUT": "1",
                    "LEADWERK_CRM_RETRY_BASE_SECONDS": "0.5",
                    "LEADWERK_CRM_RETRY_MAX_SECONDS": "5",
                    "LEADWERK_CRM_RETRY_ATTEMPTS": "30"})
        with (work / f"bridge-{name}.log").open("ab") as log:
            bridge = subprocess.Popen([sys.executable, "-m", "leadwerk_crm_bridge"], env=env,
                                      stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        pool = await asyncpg.create_pool(database, server_settings={"search_path": "crm_bridge"})
        deadline = time.monotonic() + 60 + count / 50
        while (done := await pool.fetchval(
                "SELECT count(*) FROM deliveries WHERE state = 'delivered'")) < count:
            if bridge.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{done} of {count} delivered; see {work}/bridge-{name}.log")
            await asyncio.sleep(0.5)
        span = float(await pool.fetchval(
            "SELECT extract(epoch FROM max(delivered_at) - min(created_at)) FROM deliveries"))
        requests = await pool.fetchval("SELECT count(*) FROM batches")
        attempts = await pool.fetchval("SELECT sum(attempts) FROM batches")
        dead = await pool.fetchval("SELECT count(*) FROM deliveries WHERE state = 'dead'")
        await pool.close()
        stats = await receiver.stats()
        result.update({"count": count, "rate": count / span, "seconds": span,
                       "batches": requests, "attempts": attempts, "dead": dead, **stats})
        assert stats["unique"] == count, f"{stats['unique']} of {count} arrived"
        print(f"[bridge {name}] {result['rate']:,.0f} activities/s; receiver: {stats}")
        return result
    finally:
        if bridge is not None and bridge.poll() is None:
            os.killpg(bridge.pid, signal.SIGTERM)
            bridge.wait(30)
        receiver.stop()


async def run(args: argparse.Namespace, work: Path) -> dict[str, dict[str, Any]]:
    broker = EmbeddedBroker(free_port())
    bootstrap = broker.start()
    postgres = EmbeddedPostgres(work / "pg")
    admin_url = postgres.start()
    try:
        clean = await bridge_run(args, work, bootstrap, admin_url, faults=False)
        faulty = await bridge_run(args, work, bootstrap, admin_url, faults=True)
        return {"clean": clean, "faults": faulty}
    finally:
        broker.stop()
        postgres.stop()


def headline(results: dict[str, dict[str, Any]]) -> list[Figure]:
    clean, faults = results["clean"], results["faults"]
    return [
        Figure("activities delivered, one process", clean["rate"], "activities/s",
               "≥ 1,000 activities/s", clean["rate"] >= 1000,
               "bare httpx POST loop, one per request", clean["baseline"]),
        Figure("fault run: activities arrived (20 % 503, 5 % timeouts)", faults["unique"],
               "activities", f"all {faults['count']:,}", faults["unique"] == faults["count"]),
    ]


def render(results: dict[str, dict[str, Any]]) -> str:
    facts = machine_facts()
    clean, faults = results["clean"], results["faults"]
    verdict = "PASS" if clean["rate"] >= 1000 else "FAIL"
    lost = faults["count"] - faults["unique"]
    return "\n".join([
        "# crm-bridge benchmark",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `make bench` "
        f"(`python -m bench.crm_bench`), commit {facts['commit']}, on {facts['nproc']} "
        f"cores ({facts['cpu']}); embedded Postgres and broker, and the webhook receiver "
        "(uvicorn, its own process), on the same machine.",
        "",
        "| measurement | activities | activities per second | requests |",
        "|---|---:|---:|---:|",
        f"| baseline: bare httpx POST loop, one activity per request, {PARALLEL} at a time | "
        f"{clean['count']:,} | {clean['baseline']:,.0f} | {clean['count']:,} |",
        f"| bridge, one process: broker → rules → queue → batches of 100 → signed POST | "
        f"{clean['count']:,} | {clean['rate']:,.0f} | {clean['batches']:,} |",
        f"| bridge, fault run: 20% 503, 5% answered after the 1 s timeout | {faults['count']:,} | "
        f"{faults['rate']:,.0f} | {faults['attempts']:,} attempts for "
        f"{faults['batches']:,} batches |",
        "",
        f"Target (issue 6): at least 1,000 activities per second per process: {verdict} "
        f"({clean['rate'] / clean['baseline']:.1f} times the one-per-request baseline).",
        "",
        f"Fault run: the receiver answered {faults['failed']:,} requests with 503 and "
        f"{faults['slow']:,} after the timeout; {faults['unique']:,} of "
        f"{faults['count']:,} activities arrived ({lost} lost), {faults['dead']} dead letters; "
        f"{faults['repeats']:,} repeats of an activity the receiver had already taken "
        "(a retry after a lost answer; receivers deduplicate on the ids).",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--activities", type=int, default=20_000)
    parser.add_argument("--fault-activities", type=int, default=5_000)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="leadwerk-crm-bench-"))
    try:
        results = asyncio.run(run(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = render(results)
    record("crm", headline(results), machine_facts())
    DOC.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
