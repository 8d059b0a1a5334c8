"""Invariant 2: SIGKILL the stitcher and the scorer mid-stream, restart them, and every event
is in its contact's timeline once and counted in its score once."""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
import yaml
from aiokafka import AIOKafkaProducer

from leadwerk_platform.embedded import free_port
from leadwerk_platform.envelope import Envelope, encode
from leadwerk_platform.settings import repository_root
from leadwerk_platform.testing.helpers import create_database, migrate
from leadwerk_platform.testing.plugin import Infrastructure
from leadwerk_scoring.domain.identity import device_contact_id

pytestmark = pytest.mark.integration

DEVICES = 150
EVENTS_PER_DEVICE = 20
TOTAL = DEVICES * EVENTS_PER_DEVICE
POINTS = 15


def config_without_decay(folder: Path) -> Path:
    """The default model without decay, so expected scores are exact sums."""
    source = repository_root() / "config"
    shutil.copy(source / "workspaces.yaml", folder / "workspaces.yaml")
    model = yaml.safe_load((source / "scoring-model.yaml").read_text())
    model["engagement"].pop("half_life_days", None)
    (folder / "scoring-model.yaml").write_text(yaml.safe_dump(model))
    return folder


class Processor:
    """One scoring process running one stream processor."""

    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        self.name = name
        self.env = {**env, "LEADWERK_SCORING_PROCESSORS": name,
                    "LEADWERK_SCORING_PORT": str(free_port())}
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "leadwerk_scoring"],
                                            env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        assert self.process is not None
        assert self.process.poll() is None, self.log.read_text()[-3000:]
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.kills += 1

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()


async def produce(bootstrap: str, topic: str) -> dict[str, int]:
    """Tracking events as ingest writes them (server-side track calls: no visits)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    expected: dict[str, int] = collections.Counter()
    try:
        devices = [str(uuid.uuid4()) for _ in range(DEVICES)]
        for round_ in range(EVENTS_PER_DEVICE):
            for device in devices:
                now = datetime.now(UTC)
                envelope = Envelope(
                    id=str(uuid.uuid4()), type="tracking.track.v1", workspace="dev",
                    occurred_at=now, received_at=now, producer="ingest",
                    data={"message_id": f"{device}-{round_}", "user_id": None,
                          "anonymous_id": device, "context": {},
                          "client": {"ip": None, "user_agent": None, "bot": False,
                                     "library": None},
                          "event": "Document Downloaded", "properties": {}, "campaign": {}})
                await producer.send(topic, encode(envelope), key=f"dev:a:{device}".encode())
                expected[device] += 1
        await producer.flush()
    finally:
        await producer.stop()
    return dict(expected)


async def count(pool: asyncpg.Pool, query: str) -> int:
    value: int = await pool.fetchval(query)
    return value


async def wait_until(pool: asyncpg.Pool, query: str, at_least: int, timeout: float,
                     processors: list[Processor]) -> None:
    deadline = time.monotonic() + timeout
    while (value := await count(pool, query)) < at_least:
        for p in processors:
            assert p.process is not None
            assert p.process.poll() is None, p.log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{query}: {value} < {at_least}"
        await asyncio.sleep(0.02)


async def test_sigkill_mid_stream_leaves_exactly_once_timelines_and_scores(
        infrastructure: Infrastructure, platform_env: dict[str, str], topics: str,
        tmp_path: Path) -> None:
    database = await create_database(infrastructure.database_url, "crash")
    await migrate(database, "scoring")
    env = {**os.environ, "DATABASE_URL": database, "LEADWERK_SCORING_BATCH_SIZE": "100",
           "LEADWERK_CONFIG_DIR": str(config_without_decay(tmp_path)),
           "LEADWERK_LOG_LEVEL": "WARNING"}
    stitcher = Processor("stitcher", env, tmp_path / "stitcher.log")
    scorer = Processor("scorer", env, tmp_path / "scorer.log")
    pool = await asyncpg.create_pool(database, server_settings={"search_path": "scoring"})
    try:
        expected = await produce(infrastructure.kafka, f"{topics}tracking-events")
        stitcher.start()
        scorer.start()
        both = [stitcher, scorer]
        stitched = "SELECT count(*) FROM processed WHERE consumer = 'stitcher'"
        scored = "SELECT count(*) FROM processed WHERE consumer = 'scorer'"
        for fraction in (0.2, 0.5):
            await wait_until(pool, stitched, int(TOTAL * fraction), 90, both)
            stitcher.kill()
            stitcher.start()
            await wait_until(pool, scored, int(TOTAL * fraction), 90, both)
            scorer.kill()
            scorer.start()
        await wait_until(pool, "SELECT count(*) FROM score_history", TOTAL, 120, both)
        await asyncio.sleep(1.0)  # anything counted twice would show up now

        assert await count(pool, "SELECT count(*) FROM timeline") == TOTAL
        assert await count(pool, "SELECT count(*) FROM score_history") == TOTAL
        assert await count(pool, "SELECT count(*) FROM (SELECT event_id FROM score_history "
                                 "GROUP BY event_id HAVING count(*) > 1) d") == 0
        rows = await pool.fetch("SELECT contact_id::text AS contact_id, engagement FROM scores")
        scores = {r["contact_id"]: r["engagement"] for r in rows}
        for device, events in expected.items():
            assert scores[device_contact_id("dev", device)] == events * POINTS, device
        assert (stitcher.kills, scorer.kills) == (2, 2)
    finally:
        stitcher.stop()
        scorer.stop()
        await pool.close()
