"""Python load generators for the ingest benchmark, run as their own process.

* ``closed`` - N keep-alive connections, each sending its next request as soon as the previous
  answer arrived (max throughput; the fallback when ``wrk`` is not installed).
* ``rate``   - open loop at a constant request rate (what ``wrk2`` does): request *i* is due at
  ``start + i / rate`` and is handed to the first free connection; its latency is measured from
  the moment it was *due*, so queueing behind a slow server counts (no coordinated omission).

Both print one line ``BENCH_RESULT {json}`` in the same shape as ``wrk_events.lua``'s ``done``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import orjson

try:  # the parent package when run as ``python -m bench.loadgen``
    from bench.payloads import BodyFactory
except ImportError:  # pragma: no cover - run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.payloads import BodyFactory


@dataclass
class Tally:
    measure_from: float
    measure_to: float
    latencies: list[float] = field(default_factory=list)
    trace: list[tuple[float, float]] | None = None
    scheduled: int = 0
    completed: int = 0
    non_2xx: int = 0
    errors: int = 0
    unfinished: int = 0

    def record(self, due: float, done: float, status: int) -> None:
        if due < self.measure_from or due >= self.measure_to:
            return
        self.completed += 1
        self.latencies.append(done - due)
        if self.trace is not None:
            self.trace.append((due, done - due))
        if not 200 <= status < 400:
            self.non_2xx += 1

    def result(self, duration: float) -> dict[str, float | int]:
        ordered = sorted(self.latencies)

        def pct(p: float) -> float:
            if not ordered:
                return float("nan")
            return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000

        return {"duration_s": duration, "completed": self.completed, "non_2xx": self.non_2xx,
                "connect_errors": 0, "read_errors": self.errors, "write_errors": 0,
                "timeouts": self.unfinished, "p50_ms": pct(50), "p90_ms": pct(90),
                "p99_ms": pct(99), "max_ms": (ordered[-1] * 1000) if ordered else float("nan"),
                "mean_ms": (sum(ordered) / len(ordered) * 1000) if ordered else float("nan")}


class Connection:
    """One HTTP/1.1 keep-alive connection speaking just enough of the protocol."""

    def __init__(self, host: str, port: int, path: str, authorization: str) -> None:
        self.host, self.port = host, port
        self.head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     f"Content-Type: application/json\r\nAuthorization: {authorization}\r\n"
                     "Content-Length: ").encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, body: bytes) -> int:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(b"%s%d\r\n\r\n%s" % (self.head, len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        start = lower.find(b"content-length:")
        length = int(lower[start + 15:lower.find(b"\r\n", start)]) if start >= 0 else 0
        if length:
            await self.reader.readexactly(length)
        if b"connection: close" in lower:
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def closed_loop(args: argparse.Namespace, url: str, template: str) -> dict[str, float | int]:
    parts = urlsplit(url)
    start = time.perf_counter()
    tally = Tally(start + args.warmup, start + args.warmup + args.duration)

    async def worker(index: int) -> None:
        factory = BodyFactory(template, args.batch, args.tag, index + 1, args.visitors)
        connection = Connection(parts.hostname or "127.0.0.1", parts.port or 80, parts.path,
                                args.authorization)
        while (sent := time.perf_counter()) < tally.measure_to:
            try:
                status = await connection.request(factory.body())
            except (OSError, asyncio.IncompleteReadError, ValueError):
                tally.errors += 1
                connection.close()
                continue
            tally.record(sent, time.perf_counter(), status)
        connection.close()

    await asyncio.gather(*(worker(i) for i in range(args.connections)))
    return tally.result(args.duration)


async def constant_rate(args: argparse.Namespace, url: str,
                        template: str) -> dict[str, float | int]:
    parts = urlsplit(url)
    interval = 1.0 / args.rate
    queue: asyncio.Queue[float] = asyncio.Queue()
    start = time.perf_counter() + 0.05
    end = start + args.warmup + args.duration
    tally = Tally(start + args.warmup, end, trace=[] if args.trace else None)

    async def schedule() -> None:
        due_index = 0
        while True:
            due = start + due_index * interval
            if due >= end:
                return
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
                continue
            while due <= now and due < end:  # catch up after a late wake-up
                queue.put_nowait(due)
                if due >= tally.measure_from:
                    tally.scheduled += 1
                due_index += 1
                due = start + due_index * interval

    async def worker(index: int) -> None:
        factory = BodyFactory(template, args.batch, args.tag, index + 1, args.visitors)
        connection = Connection(parts.hostname or "127.0.0.1", parts.port or 80, parts.path,
                                args.authorization)
        try:
            while True:
                due = await queue.get()
                try:
                    status = await connection.request(factory.body())
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    tally.errors += 1
                    connection.close()
                    status = 599
                tally.record(due, time.perf_counter(), status)
                queue.task_done()
        finally:
            connection.close()

    workers = [asyncio.create_task(worker(i)) for i in range(args.connections)]
    await schedule()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(args.grace):
            await queue.join()
    tally.unfinished = tally.scheduled - tally.completed
    if args.trace and tally.trace is not None:
        wall = time.time() - time.perf_counter()  # perf_counter → epoch seconds
        args.trace.write_text("".join(f"{due + wall:.6f},{latency * 1000:.3f}\n"
                                      for due, latency in tally.trace))
    for task in workers:
        task.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    return tally.result(args.duration)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["closed", "rate"])
    parser.add_argument("url")
    parser.add_argument("--template", type=Path, required=True)
    parser.add_argument("--authorization", required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tag", default="bench")
    parser.add_argument("--visitors", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--trace", type=Path, default=None,
                        help="rate mode: write 'epoch seconds due,latency ms' per request")
    args = parser.parse_args()
    template = args.template.read_text(encoding="utf-8")
    work = constant_rate if args.mode == "rate" else closed_loop
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up
    except ImportError:  # pragma: no cover
        result = asyncio.run(work(args, args.url, template))
    else:
        result = uvloop.run(work(args, args.url, template))
    sys.stdout.write(f"BENCH_RESULT {orjson.dumps(result).decode()}\n")


if __name__ == "__main__":
    main()
