"""Stitcher and scorer benchmark (``make bench``, after the ingest bench).

One run on this machine, with 100,000 known contacts in the scoring database:

* baseline - a bare aiokafka consumer-group loop (consume, commit per batch) over the same
  topic with the same events: what reading the stream costs by itself;
* stitcher alone and scorer alone, each its own ``python -m leadwerk_scoring`` process
  (``LEADWERK_SCORING_PROCESSORS``), then both in one process: events per second per process;
* end-to-end latency: ingest, stitcher and scorer running (each its own process, as
  deployed), single-event ``POST /v1/track`` at a steady 2,000 events/s; per event, from
  ingest's 200 to the score change being committed (the ``contact.score_changed.v1`` the
  scorer publishes after its commit): p50, p99.

Targets (issue "Identity stitching … scoring"): ≥ 20,000 events/s through stitcher plus
scorer; p99 < 1 s. A missed target prints FAIL; the exit status stays 0 (a measurement).
Writes ``docs/benchmarks-scoring.md``. Run: ``uv run python -m bench.scoring_bench``.
"""
# A measuring script: it prints, asserts its own bookkeeping and polls on purpose.
# ruff: noqa: T201, S101, PLR0915, PLR0917, ASYNC110, ASYNC220

from __future__ import annotations

import argparse
import asyncio
import os
import random
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
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import summary  # noqa: E402
from bench.ingest_bench import bench_config_dir, machine_facts  # noqa: E402
from bench.loadgen import Connection  # noqa: E402
from leadwerk_platform.embedded import EmbeddedBroker, EmbeddedPostgres, free_port  # noqa: E402
from leadwerk_platform.envelope import Envelope, derive_event_id, encode  # noqa: E402
from leadwerk_platform.kafka.topics import provision_topics  # noqa: E402
from leadwerk_platform.registry import ContractRegistry  # noqa: E402
from leadwerk_platform.settings import PlatformSettings  # noqa: E402
from leadwerk_platform.testing.helpers import create_database, migrate  # noqa: E402

DOC = ROOT / "docs" / "benchmarks-scoring.md"
THROUGHPUT_TARGET = 20_000.0
P99_TARGET_MS = 1000.0
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0"


def contact_id(n: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_OID, f"bench-contact-{n}"))


async def seed_contacts(database: str, count: int) -> None:
    """``count`` known contacts (user id ``u-<n>``, an email, a company) with score rows."""
    connection = await asyncpg.connect(database, server_settings={"search_path": "scoring"})
    try:
        now = datetime.now(UTC)
        rows = [(contact_id(n), n) for n in range(count)]
        await connection.copy_records_to_table(
            "contacts", columns=["workspace", "contact_id", "created_at", "updated_at", "traits"],
            records=[("dev", uuid.UUID(c), now, now, orjson.dumps({
                "email": {"value": f"user{n}@example.de", "at": now.isoformat()},
                "company": {"value": f"Firma {n}", "at": now.isoformat()}}).decode())
                for c, n in rows])
        await connection.copy_records_to_table(
            "identities", columns=["workspace", "kind", "value", "contact_id", "created_at",
                                   "updated_at"],
            records=[r for c, n in rows for r in (
                ("dev", "user", f"u-{n}", uuid.UUID(c), now, now),
                ("dev", "email", f"user{n}@example.de", uuid.UUID(c), now, now))])
        await connection.copy_records_to_table(
            "scores", columns=["workspace", "contact_id", "known", "stage", "model_version",
                               "updated_at"],
            records=[("dev", uuid.UUID(c), True, "lead", 1, now) for c, _ in rows])
        await connection.execute("ANALYZE")
    finally:
        await connection.close()


async def produce(bootstrap: str, topic: str, events: int, contacts: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=10,
                                max_batch_size=262_144)
    await producer.start()
    try:
        now = datetime.now(UTC)
        for i in range(events):
            user = f"u-{random.randrange(contacts)}"  # noqa: S311 - load, not crypto
            envelope = Envelope(
                id=str(uuid.uuid4()), type="tracking.track.v1", workspace="dev",
                occurred_at=now, received_at=now, producer="ingest",
                data={"message_id": f"bench-{i}", "user_id": user, "anonymous_id": None,
                      "context": {}, "client": {"ip": None, "user_agent": None, "bot": False,
                                                "library": None},
                      "event": "Document Downloaded", "properties": {}, "campaign": {}})
            await producer.send(topic, encode(envelope), key=f"dev:u:{user}".encode())
        await producer.flush()
    finally:
        await producer.stop()


async def baseline(bootstrap: str, topic: str, events: int, session_ms: int) -> float:
    """Events/s of a bare consumer-group loop: consume, commit after every batch."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id="bench.baseline",
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                session_timeout_ms=session_ms,
                                heartbeat_interval_ms=max(100, session_ms // 10),
                                max_poll_records=500)
    await consumer.start()
    seen, first = 0, None
    try:
        while seen < events:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                if first is None:
                    first = time.perf_counter()
                seen += len(records)
            if batch:
                await consumer.commit()
        assert first is not None
        return events / (time.perf_counter() - first)
    finally:
        await consumer.stop()


def faust_floor(bootstrap: str, topic: str, events: int) -> dict[str, float]:
    """Events/s and CPU µs per event of a bare faust agent over the same topic
    (:mod:`bench.faust_floor`, its own process)."""
    done = subprocess.run([sys.executable, "-m", "bench.faust_floor", bootstrap, topic,  # noqa: S603
                           str(events)], cwd=ROOT, capture_output=True, timeout=600, check=True)
    out = done.stdout.decode()  # faust's spinner writes terminal codes before the line
    result: dict[str, float] = orjson.loads(out[out.rindex('{"events_s"'):].splitlines()[0])
    return result


def start_scoring(env: dict[str, str], processors: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "leadwerk_scoring"],
                                env={**env, "LEADWERK_SCORING_PROCESSORS": processors,
                                     "LEADWERK_SCORING_PORT": str(free_port())},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


async def rate(pool: asyncpg.Pool, consumer: str, events: int, process: subprocess.Popen[bytes],
               timeout: float, start_consumer: str | None = None) -> float:
    """Events/s: from the first event ``start_consumer`` (default: ``consumer``) processed to
    the last one ``consumer`` processed (the time before the first is group joining)."""
    query = "SELECT count(*) FROM processed WHERE consumer = $1"
    deadline = time.monotonic() + timeout
    first_at, first_count = None, 0
    while True:
        done: int = await pool.fetchval(query, consumer)
        started: int = await pool.fetchval(query, start_consumer or consumer)
        now = time.perf_counter()
        if first_at is None and started > 0:
            first_at, first_count = now, (started if start_consumer is None else 0)
        if done >= events:
            assert first_at is not None
            return (done - first_count) / max(now - first_at, 1e-9)
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{consumer}: {done} of {events} processed")
        await asyncio.sleep(0.02)


async def latency(ingest_url: str, bootstrap: str, changes_topic: str, per_second: int,
                  seconds: int, contacts: int) -> dict[str, float]:
    """Steady single-event load on ingest; per event, ingest 200 → score change published."""
    accepted: dict[str, float] = {}
    seen: dict[str, float] = {}
    # A short fetch wait: the embedded broker does not answer a waiting fetch early, and the
    # observer must not add its own delay to what it measures.
    consumer = AIOKafkaConsumer(changes_topic, bootstrap_servers=bootstrap,
                                auto_offset_reset="latest", enable_auto_commit=False,
                                fetch_max_wait_ms=10)
    await consumer.start()
    await consumer.seek_to_end()

    async def watch() -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=100)
            now = time.perf_counter()
            for records in batch.values():
                for record in records:
                    message = orjson.loads(record.value)
                    if message["type"] == "contact.score_changed.v1":
                        for cause in message["data"]["causes"]:
                            seen.setdefault(cause.get("event_id", ""), now)

    watcher = asyncio.create_task(watch())
    host, port = ingest_url.removeprefix("http://").split(":")
    authorization = "Basic ZGV2LXdyaXRlLWtleTo="  # dev-write-key:
    connections = [Connection(host, int(port), "/v1/track", authorization)
                   for _ in range(64)]
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for connection in connections:
        idle.put_nowait(connection)
    errors = 0

    async def send(n: int) -> None:
        nonlocal errors
        connection = await idle.get()
        message_id = f"lat-{uuid.uuid4().hex}"
        body = orjson.dumps({"userId": f"u-{random.randrange(contacts)}",  # noqa: S311
                             "event": "Document Downloaded", "messageId": message_id,
                             "context": {"userAgent": BROWSER}})
        try:
            status = await connection.request(body)
        except (OSError, asyncio.IncompleteReadError):
            connection.close()
            status = 0
        idle.put_nowait(connection)
        if status == 200:
            accepted[derive_event_id("dev", message_id)] = time.perf_counter()
        else:
            errors += 1

    start = time.perf_counter()
    tasks = []
    for n in range(per_second * seconds):
        delay = start + n / per_second - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(n)))
    await asyncio.gather(*tasks)
    sent_rate = len(tasks) / (time.perf_counter() - start)
    deadline = time.monotonic() + 30
    while len(set(accepted) & set(seen)) < len(accepted) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    watcher.cancel()
    await consumer.stop()
    for connection in connections:
        connection.close()
    delays = sorted((seen[e] - t) * 1000 for e, t in accepted.items() if e in seen)
    if not delays:
        raise RuntimeError("no score change observed")

    def pct(p: float) -> float:
        return delays[min(len(delays) - 1, int(p / 100 * len(delays)))]

    return {"sent_per_s": sent_rate, "accepted": len(accepted), "scored": len(delays),
            "errors": errors, "p50_ms": pct(50), "p99_ms": pct(99), "max_ms": delays[-1]}


async def wait_http(url: str, timeout: float = 60) -> None:
    import httpx  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(f"{url}/readyz", timeout=1)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} not ready")


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    broker = EmbeddedBroker(free_port())
    bootstrap = broker.start()
    postgres = EmbeddedPostgres(work / "pg")
    admin_url = postgres.start()
    results: dict[str, Any] = {}
    try:
        database = await create_database(admin_url, "bench")
        await migrate(database, "scoring")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LEADWERK_", "KAFKA_", "DATABASE_"))}
        env.update({"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "DATABASE_URL": database,
                    "LEADWERK_KAFKA_IDEMPOTENCE": "false",
                    "LEADWERK_KAFKA_SESSION_TIMEOUT_MS": "3000",
                    "LEADWERK_LOG_LEVEL": "WARNING",
                    "LEADWERK_CONFIG_DIR": str(bench_config_dir(work / "config"))})
        registry = ContractRegistry.load(ROOT / "schemas")
        print(f"seeding {args.contacts:,} contacts …", flush=True)
        await seed_contacts(database, args.contacts)
        pool = await asyncpg.create_pool(database, server_settings={"search_path": "scoring"})
        for label, processors in (("separate", None), ("together", "stitcher,scorer")):
            prefix = f"{label}."
            settings = PlatformSettings(KAFKA_BOOTSTRAP_SERVERS=bootstrap,
                                        LEADWERK_KAFKA_TOPIC_PREFIX=prefix)
            await provision_topics(settings, registry, replication_factor=1)
            print(f"[{label}] producing {args.events:,} tracking events …", flush=True)
            await produce(bootstrap, f"{prefix}tracking-events", args.events, args.contacts)
            await pool.execute("TRUNCATE processed")
            if label == "separate":
                print("[baseline] bare consume-and-commit loop …", flush=True)
                results["baseline_events_s"] = await baseline(
                    bootstrap, f"{prefix}tracking-events", args.events, 3000)
                print("[faust floor] bare faust agent, no work …", flush=True)
                results["faust_floor"] = faust_floor(bootstrap, f"{prefix}tracking-events",
                                                     args.events)
            run_env = {**env, "LEADWERK_KAFKA_TOPIC_PREFIX": prefix}
            if processors is None:
                for name in ("stitcher", "scorer"):
                    process = start_scoring(run_env, name, work / f"{name}.log")
                    try:
                        results[f"{name}_events_s"] = await rate(pool, name, args.events,
                                                                 process, 600)
                    finally:
                        stop(process)
                    print(f"[{name}] {results[f'{name}_events_s']:,.0f} events/s", flush=True)
            else:
                process = start_scoring(run_env, processors, work / "together.log")
                try:
                    scored = await rate(pool, "scorer", args.events, process, 600,
                                        start_consumer="stitcher")
                    results["together_events_s"] = scored
                finally:
                    stop(process)
                print(f"[stitcher+scorer] {scored:,.0f} events/s", flush=True)
        await pool.close()

        prefix = "latency."
        settings = PlatformSettings(KAFKA_BOOTSTRAP_SERVERS=bootstrap,
                                    LEADWERK_KAFKA_TOPIC_PREFIX=prefix)
        await provision_topics(settings, registry, replication_factor=1)
        run_env = {**env, "LEADWERK_KAFKA_TOPIC_PREFIX": prefix}
        ingest_port = free_port()
        with (work / "ingest.log").open("ab") as out:
            ingest = subprocess.Popen([sys.executable, "-m", "leadwerk_ingest"],
                                      env={**run_env, "LEADWERK_INGEST_PORT": str(ingest_port)},
                                      stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        # As deployed: the stitcher and the scorer in their own processes.
        scoring = [start_scoring(run_env, name, work / f"latency-{name}.log")
                   for name in ("stitcher", "scorer")]
        try:
            await wait_http(f"http://127.0.0.1:{ingest_port}")
            await asyncio.sleep(5)  # consumer groups join
            # Half the target rate first (for the shape of the curve), then the target.
            for key, per_second in (("latency_half", args.rate // 2), ("latency", args.rate)):
                print(f"[latency] {per_second:,} events/s for {args.seconds} s …", flush=True)
                results[key] = await latency(
                    f"http://127.0.0.1:{ingest_port}", bootstrap, f"{prefix}contact-changes",
                    per_second, args.seconds, args.contacts)
                await asyncio.sleep(3)  # let any backlog drain
        finally:
            for process in scoring:
                stop(process)
            stop(ingest)
    finally:
        postgres.stop()
        broker.stop()
    return results


def headline(results: dict[str, Any]) -> list[summary.Figure]:
    together, p99 = results["together_events_s"], results["latency"]["p99_ms"]
    return [
        summary.Figure("stitcher + scorer in one process", together, "events/s",
               f"≥ {THROUGHPUT_TARGET:,.0f} events/s", together >= THROUGHPUT_TARGET,
               "bare aiokafka consume + commit loop", results["baseline_events_s"]),
        summary.Figure(f"p99 ingest → score published at {results['latency']['sent_per_s']:,.0f} "
               "events/s", p99, "ms", f"< {P99_TARGET_MS:,.0f} ms", p99 < P99_TARGET_MS),
    ]


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    facts = machine_facts()
    base = results["baseline_events_s"]
    together = results["together_events_s"]
    lat = results["latency"]
    half = results["latency_half"]
    ok_rate = together >= THROUGHPUT_TARGET
    floor = results["faust_floor"]
    floor_cores = 2 * THROUGHPUT_TARGET * floor["cpu_us_per_event"] / 1e6
    cores = facts["nproc"]
    ok_lat = lat["p99_ms"] < P99_TARGET_MS
    lines = [
        "# Scoring benchmark (stitcher and scorer)",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `make bench` "
        f"(`python -m bench.scoring_bench`), commit {facts['commit']}, on {facts['nproc']} "
        f"cores ({facts['cpu']}), Python {facts['python']}; embedded tansu broker and "
        "embedded Postgres on the same machine.",
        "",
        f"{args.contacts:,} known contacts in the database; {args.events:,} `track` events "
        "(\"Document Downloaded\", 15 points, random contacts) per run.",
        "",
        "| measurement | events/s | vs baseline |",
        "|---|---:|---:|",
        f"| baseline: bare aiokafka consume + commit loop | {base:,.0f} | 100 % |",
        f"| stitcher alone (one process) | {results['stitcher_events_s']:,.0f} | "
        f"{results['stitcher_events_s'] / base:.1%} |",
        f"| scorer alone (one process) | {results['scorer_events_s']:,.0f} | "
        f"{results['scorer_events_s'] / base:.1%} |",
        f"| bare faust agent, no work (faust's own cost, one hop) | {floor['events_s']:,.0f} | "
        f"{floor['events_s'] / base:.1%} |",
        f"| stitcher + scorer in one process | {together:,.0f} | {together / base:.1%} |",
        "",
        f"The bare faust agent spends {floor['cpu_us_per_event']:,.0f} µs of CPU per event "
        "doing nothing (faust's consumer thread, stream and acknowledgements included). The "
        "stitcher and the scorer are two faust hops, so "
        f"{THROUGHPUT_TARGET:,.0f} events/s through both need at least "
        f"{floor_cores:.1f} cores for faust alone, before any work, the broker or Postgres; "
        f"this machine has {cores} "
        "(docs/decisions/0009-scoring-performance.md).",
        "",
        f"End-to-end at {lat['sent_per_s']:,.0f} events/s (target 2,000) of single-event "
        "`POST /v1/track` (ingest, stitcher and scorer each in its own process): ingest's "
        "200 → score change committed and published: "
        f"p50 {lat['p50_ms']:,.0f} ms, p99 {lat['p99_ms']:,.0f} ms, max {lat['max_ms']:,.0f} ms "
        f"({lat['scored']:,} of {lat['accepted']:,} accepted events observed, "
        f"{lat['errors']} errors). At {half['sent_per_s']:,.0f} events/s: "
        f"p50 {half['p50_ms']:,.0f} ms, p99 {half['p99_ms']:,.0f} ms.",
        "",
        "| target | result |",
        "|---|---|",
        f"| ≥ 20,000 events/s through stitcher + scorer | {'PASS' if ok_rate else 'FAIL'} "
        f"({together:,.0f}) |",
        f"| p99 < 1 s at 2,000 events/s | {'PASS' if ok_lat else 'FAIL'} "
        f"({lat['p99_ms']:,.0f} ms) |",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--rate", type=int, default=2_000)
    parser.add_argument("--seconds", type=int, default=15)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="leadwerk-scoring-bench-"))
    try:
        results = asyncio.run(run(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = render(results, args)
    summary.record("scoring", headline(results), machine_facts())
    DOC.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
