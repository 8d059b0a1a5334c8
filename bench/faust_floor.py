"""What faust-streaming itself costs per event on this machine: a bare agent that does nothing.

``python -m bench.faust_floor <bootstrap> <topic> <events>`` consumes ``events`` records of
``topic`` (from the earliest offset, a fresh consumer group) with a faust agent whose body only
counts, and prints one JSON line: events per second and the process's CPU microseconds per
event (faust's consumer thread included) from the first record to the last. Every stream
processor built on faust pays at least this per event and hop; the scoring benchmark runs it
on the same topic as its baseline, in the same run (docs/decisions/0009-scoring-performance.md).

faust runs its own worker and event loop, hence a process of its own. Its settings are
faust's defaults but for what the embedded broker needs (no leader topic, short session).
"""
# A measuring script: it prints its result and leaves by os._exit once it has it.
# ruff: noqa: T201

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import faust
import orjson


def main(argv: list[str]) -> None:
    bootstrap, topic_name, events = argv[0], argv[1], int(argv[2])
    app = faust.App(
        f"bench.faust-floor.{os.getpid()}", broker=f"kafka://{bootstrap}", store="memory://",
        datadir=str(Path(tempfile.gettempdir()) / "leadwerk-faust-floor-{conf.name}"),
        autodiscover=False, web_enabled=False, topic_disable_leader=True,
        topic_allow_declare=False, consumer_auto_offset_reset="earliest",
        broker_session_timeout=3.0, broker_heartbeat_interval=0.3,
    )
    topic = app.topic(topic_name, value_serializer="raw", key_serializer="raw")
    seen = 0
    started = (0.0, 0.0)

    async def count(stream: faust.StreamT[bytes]) -> None:
        nonlocal seen, started
        async for _ in stream:
            if not seen:
                started = (time.perf_counter(), time.process_time())
            seen += 1
            if seen == events:
                wall = time.perf_counter() - started[0]
                cpu = time.process_time() - started[1]
                print(orjson.dumps({"events_s": (events - 1) / wall,
                                    "cpu_us_per_event": cpu / (events - 1) * 1e6}).decode(),
                      flush=True)
                os._exit(0)  # the measurement is taken; a worker's shutdown takes seconds

    app.agent(topic, name="bench.faust-floor.count")(count)
    worker = faust.Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main(sys.argv[1:])
