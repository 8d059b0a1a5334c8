"""A timer wave with the workflow process SIGKILLed twice: no step lost, none repeated, and every
command published under its one idempotency key."""

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

from leadwerk_platform.embedded import free_port
from leadwerk_platform.settings import repository_root
from leadwerk_platform.testing.helpers import create_database, migrate, read_topic, values
from leadwerk_platform.testing.plugin import Infrastructure

pytestmark = pytest.mark.integration

ENROLLMENTS = 1200
WAVE = {"id": "wave", "name": "Wave", "trigger": {"manual": True}, "start": "a", "steps": {
    "a": {"type": "wait", "duration": "1s", "next": "b"},
    "b": {"type": "send_email", "template": "first", "next": "c"},
    "c": {"type": "wait", "duration": "1s", "next": "d"},
    "d": {"type": "send_email", "template": "second", "next": "e"},
    "e": {"type": "end"}}}


def config(folder: Path) -> Path:
    shutil.copy(repository_root() / "config" / "workspaces.yaml", folder / "workspaces.yaml")
    (folder / "journeys").mkdir()
    (folder / "journeys" / "wave.yaml").write_text(yaml.safe_dump(WAVE))
    return folder


def start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "leadwerk_workflow"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)


async def wait_for(pool: asyncpg.Pool, query: str, *, at_least: int = 0, at_most: int | None = None,
                   process: subprocess.Popen[bytes], timeout: float = 90) -> None:
    """Poll ``query`` until its value is in range; the process must stay alive meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        value = await pool.fetchval(query)
        if value >= at_least and (at_most is None or value <= at_most):
            return
        assert process.poll() is None, "the workflow process died (see workflow.log)"
        assert time.monotonic() < deadline, f"{query}: {value}"
        await asyncio.sleep(0.02)


async def test_sigkill_during_a_timer_wave_loses_and_repeats_nothing(
        infrastructure: Infrastructure, platform_env: dict[str, str], topics: str,
        tmp_path: Path) -> None:
    database = await create_database(infrastructure.database_url, "wfcrash")
    await migrate(database, "workflow")
    env = {**os.environ, "DATABASE_URL": database, "LEADWERK_WORKFLOW_TIMER_BATCH": "40",
           "LEADWERK_WORKFLOW_PORT": str(free_port()), "LEADWERK_LOG_LEVEL": "WARNING",
           "LEADWERK_CONFIG_DIR": str(config(tmp_path))}
    log = tmp_path / "workflow.log"
    pool = await asyncpg.create_pool(database, server_settings={"search_path": "workflow"})
    process = start(env, log)
    try:
        await wait_for(pool, "SELECT count(*) FROM journeys", at_least=1, process=process)
        now = datetime.now(UTC)
        await pool.executemany(
            "INSERT INTO enrollments (enrollment_id, workspace, journey_id, version, "
            "contact_id, state, step, due_at, visits, entered_at, updated_at) "
            "VALUES ($1, 'dev', 'wave', 1, $2, 'active', 'a', $3, '{\"a\": 1}', $3, $3)",
            [(uuid.uuid4(), uuid.uuid4(), now) for _ in range(ENROLLMENTS)])
        # Rows written behind the service's back wake no worker (it sleeps up to a minute
        # when nothing is due): the first kill doubles as the way to let it see the wave.
        process.send_signal(signal.SIGKILL)
        process.wait()
        process = start(env, log)
        past_first = "SELECT count(*) FROM enrollments WHERE step <> 'a'"
        await wait_for(pool, past_first, at_least=ENROLLMENTS // 3, process=process)
        process.send_signal(signal.SIGKILL)
        process.wait()
        process = start(env, log)
        done = "SELECT count(*) FROM enrollments WHERE state = 'completed'"
        await wait_for(pool, done, at_least=ENROLLMENTS // 3, process=process)
        process.send_signal(signal.SIGKILL)
        process.wait()
        process = start(env, log)
        await wait_for(pool, done, at_least=ENROLLMENTS, process=process)
        await wait_for(pool, "SELECT count(*) FROM outbox", at_most=0, process=process)

        emails = await pool.fetchval(
            "SELECT count(*) FROM journey_history WHERE action = 'email'")
        assert emails == 2 * ENROLLMENTS  # each step's effect recorded once
        records = await read_topic(infrastructure.kafka, f"{topics}email-commands",
                                   2 * ENROLLMENTS, timeout=30, idle=1.0)
        messages = values(records)
        by_enrollment: dict[str, set[str]] = collections.defaultdict(set)
        for message in messages:
            by_enrollment[message["data"]["origin"]["enrollment_id"]].add(
                message["data"]["template"])
        assert len({m["id"] for m in messages}) == 2 * ENROLLMENTS
        assert len(by_enrollment) == ENROLLMENTS
        assert all(templates == {"first", "second"} for templates in by_enrollment.values())
        # A repeat on the topic can only be the same command (same id) re-published after a
        # crash between the broker's ack and the outbox delete; the mailer deduplicates it.
        repeated = len(messages) - 2 * ENROLLMENTS
        assert repeated <= 3 * int(env["LEADWERK_WORKFLOW_TIMER_BATCH"])
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(20)
        await pool.close()
