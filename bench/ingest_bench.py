"""Ingest throughput and latency benchmark (``make bench``).

One run on this machine measures, each against its own freshly started server process (uvicorn,
one worker, uvloop + httptools, access log off) with the load generator in another process:

* baseline A - a bare ASGI app answering 200 (what uvicorn + HTTP cost),
* baseline B - a bare ASGI app producing the body as-is to the tracking topic, awaiting the ack,
* baseline C - a bare ASGI app producing every event of a 100-event batch, awaiting all acks,
* ingest ``POST /v1/track`` (single events) and ``POST /v1/batch`` (100 events) at saturation,
* ingest ``POST /v1/track`` at a constant rate of half its own measured maximum (p50/p99),
  plus baselines A and B at that same rate for reference.

It then prints a table, checks the targets (single ≥ 70 % of baseline B req/s; p99 < 25 ms at
half load; batch ≥ 60 % of baseline C events/s) and writes ``docs/benchmarks-ingest.md`` (and
its headline figures for ``docs/benchmarks.md``). A target that is missed prints FAIL but the
exit status stays 0: this is a measurement, not a test.

Run: ``uv run python -m bench.ingest_bench`` (``--help`` for durations, connections, …).
"""
# ruff: noqa: T201, S603, S607, PLR0915, PLR0912

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as ``python bench/ingest_bench.py``
    sys.path.insert(0, str(ROOT))

from bench.payloads import AUTHORIZATION, BodyFactory, write_template  # noqa: E402
from bench.summary import Figure, record  # noqa: E402

DOC = ROOT / "docs" / "benchmarks-ingest.md"
LUA = ROOT / "bench" / "wrk_events.lua"
TICKS = os.sysconf("SC_CLK_TCK")

#: Targets (see docs/benchmarks-ingest.md).
SINGLE_VS_PRODUCE = 0.70
BATCH_VS_PRODUCE = 0.60
P99_LIMIT_MS = 25.0

_children: list[subprocess.Popen[bytes]] = []


# -- processes ---------------------------------------------------------------------------------


def _spawn(command: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a child in its own session (so Ctrl-C reaches only us; we stop it ourselves)."""
    process = subprocess.Popen(command, start_new_session=True, **kwargs)
    _children.append(process)
    return process


def _stop(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if process in _children:
        _children.remove(process)


def _stop_all() -> None:
    for process in reversed(list(_children)):
        _stop(process, grace=5.0)


def _cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def _free_port() -> int:
    from leadwerk_platform.embedded import free_port  # noqa: PLC0415

    return free_port()


# -- machine, generator, broker ----------------------------------------------------------------


def machine_facts() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError, IndexError, ValueError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 1024 / 1024:.1f} GiB"
    import aiokafka  # noqa: PLC0415
    import uvicorn  # noqa: PLC0415

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True,
                              check=False).stdout.decode().strip()

    commit = git("rev-parse", "--short", "HEAD")
    # Uncommitted changes outside the bench itself change what is measured: say so.
    if commit and git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      ":(exclude)bench", ":(exclude)docs"):
        commit += "-dirty"
    return {"nproc": str(os.cpu_count()), "cpu": model, "memory": memory,
            "commit": commit or "unknown",
            "kernel": platform.release(), "python": platform.python_version(),
            "uvicorn": uvicorn.__version__, "aiokafka": aiokafka.__version__}


def ensure_wrk(choice: str) -> str | None:
    """Path of wrk, installing it with apt when missing and we are root; None → Python."""
    if choice == "python":
        return None
    found = shutil.which("wrk")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk not found: installing it with apt-get …", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for step in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
            if subprocess.run(step, env=env, capture_output=True, check=False).returncode:
                break
        found = shutil.which("wrk")
    if found is None and choice == "wrk":
        raise SystemExit("--generator wrk: wrk is not installed and could not be installed")
    if found is None:
        print("wrk unavailable: falling back to the Python load generator", flush=True)
    return found


@dataclass
class Broker:
    bootstrap: str
    embedded: Any = None
    prefix: str = ""

    @property
    def pid(self) -> int | None:
        process = getattr(self.embedded, "_process", None)
        return process.pid if process is not None else None


def start_broker(replication_factor: int) -> Broker:
    from leadwerk_platform.kafka.topics import provision_topics  # noqa: PLC0415
    from leadwerk_platform.registry import ContractRegistry  # noqa: PLC0415
    from leadwerk_platform.settings import PlatformSettings, repository_root  # noqa: PLC0415

    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        # A shared broker: keep the bench's messages apart from anything real.
        broker = Broker(external, prefix=os.environ.get("LEADWERK_KAFKA_TOPIC_PREFIX")
                        or f"bench{secrets.token_hex(3)}.")
    else:
        from leadwerk_platform.embedded import EmbeddedBroker  # noqa: PLC0415

        embedded = EmbeddedBroker(_free_port())
        broker = Broker(embedded.start(), embedded)
    settings = PlatformSettings(KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap,
                                LEADWERK_KAFKA_TOPIC_PREFIX=broker.prefix)
    asyncio.run(provision_topics(settings, ContractRegistry.load(repository_root() / "schemas"),
                                 replication_factor=replication_factor))
    return broker


def bench_config_dir(target: Path) -> Path:
    """The repository's ingest config with every workspace's rate limit lifted (the bench
    measures the service, not the 2000 events/s per write key the dev workspace allows)."""
    source = ROOT / "config"
    target.mkdir(parents=True, exist_ok=True)
    for path in source.glob("*.yaml"):
        shutil.copy(path, target / path.name)
    workspaces_file = target / "workspaces.yaml"
    data = yaml.safe_load(workspaces_file.read_text()) or {}
    for workspace in data.get("workspaces", []):
        workspace["rate_limit"] = {"events_per_second": 1e9, "burst": 1e9}
    workspaces_file.write_text(yaml.safe_dump(data))
    return target


# -- scenarios ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    server: str  # ok | produce | batch | ingest
    path: str
    batch: int = 1
    rate: float | None = None  # None: closed loop (max throughput)


@dataclass
class Measurement:
    scenario: Scenario
    generator: str
    connections: int
    result: dict[str, Any]
    server_cpu: float | None = None
    broker_cpu: float | None = None
    generator_cpu: float | None = None
    notes: list[str] = field(default_factory=list)
    probe: dict[int, float] = field(default_factory=dict)

    @property
    def req_s(self) -> float:
        return float(self.result["completed"]) / float(self.result["duration_s"])

    @property
    def events_s(self) -> float:
        return self.req_s * self.scenario.batch

    @property
    def failures(self) -> int:
        r = self.result
        return int(r["non_2xx"] + r["connect_errors"] + r["read_errors"] + r["write_errors"]
                   + r["timeouts"])


@dataclass
class Bench:
    args: argparse.Namespace
    wrk: str | None
    broker: Broker
    workdir: Path
    template: Path
    config_dir: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(4))

    def env(self, port: int) -> dict[str, str]:
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                           os.environ.get("PYTHONPATH")])),
               "KAFKA_BOOTSTRAP_SERVERS": self.broker.bootstrap,
               "LEADWERK_KAFKA_TOPIC_PREFIX": self.broker.prefix,
               "LEADWERK_INGEST_PORT": str(port), "LEADWERK_HOST": "127.0.0.1",
               "LEADWERK_LOG_LEVEL": "WARNING", "LEADWERK_CONFIG_DIR": str(self.config_dir)}
        if self.broker.embedded is not None:  # tansu has no idempotent producer
            env["LEADWERK_KAFKA_IDEMPOTENCE"] = "false"
        return env

    def server_command(self, scenario: Scenario, port: int) -> list[str]:
        if scenario.server == "ingest":  # as shipped; the port comes from the environment
            return [sys.executable, "-m", "leadwerk_ingest"]
        return [sys.executable, "-m", "bench.apps", scenario.server, str(port)]

    @contextlib.contextmanager
    def server(self, scenario: Scenario) -> Iterator[tuple[int, int]]:
        """Start the scenario's server on a free port; yield (port, pid) once it answers 200."""
        port = _free_port()
        command = self.server_command(scenario, port)
        log = (self.workdir / f"{scenario.key}.log").open("wb")
        process = _spawn(command, cwd=ROOT, env=self.env(port), stdout=log,
                         stderr=subprocess.STDOUT)
        try:
            self._wait_ready(process, port, scenario)
            yield port, process.pid
        finally:
            _stop(process)
            log.close()

    def _wait_ready(self, process: subprocess.Popen[bytes], port: int,
                    scenario: Scenario) -> None:
        body = BodyFactory(self.template.read_text(), scenario.batch, f"{self.tag}probe", 0,
                           self.args.visitors).body()
        deadline = time.monotonic() + 60
        last = "no answer"
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{scenario.label}: server exited ({process.returncode}); "
                                   f"see {self.workdir / (scenario.key + '.log')}")
            request = urllib.request.Request(  # our own loopback server
                f"http://127.0.0.1:{port}{scenario.path}", data=body, method="POST",
                headers={"Content-Type": "application/json", "Authorization": AUTHORIZATION})
            try:
                with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
                    if response.status == 200:
                        return
                    last = f"HTTP {response.status}"
            except urllib.error.HTTPError as error:
                last = f"HTTP {error.code}: {error.read()[:300]!r}"
            except (OSError, urllib.error.URLError) as error:
                last = str(error)
            time.sleep(0.1)
        raise RuntimeError(f"{scenario.label}: server not ready: {last}")

    def levels(self, scenario: Scenario) -> list[int]:
        text = self.args.batch_connections if scenario.batch > 1 else self.args.connections
        return [int(level) for level in str(text).split(",") if level.strip()]

    def command(self, scenario: Scenario, url: str, conns: int, seconds: float,
                warmup: float = 0.0) -> tuple[list[str], str]:
        """The load generator's command line and its name."""
        tag = f"{self.tag}{scenario.key}{conns}x{seconds:g}"
        if scenario.rate is None and self.wrk is not None:
            return [self.wrk, "-t", str(min(self.args.wrk_threads, conns)), "-c", str(conns),
                    "-d", f"{max(1, math.ceil(seconds))}s", "--timeout", "10s", "--latency",
                    "-s", str(LUA), url, "--", scenario.path, str(scenario.batch), tag,
                    str(self.template), str(self.args.visitors), AUTHORIZATION], "wrk"
        mode = "closed" if scenario.rate is None else "rate"
        command = [sys.executable, "-m", "bench.loadgen", mode, url,
                   "--template", str(self.template), "--authorization", AUTHORIZATION,
                   "--batch", str(scenario.batch), "--tag", tag,
                   "--visitors", str(self.args.visitors), "--connections", str(conns),
                   "--duration", str(seconds), "--warmup", str(warmup)]
        if scenario.rate is not None:
            command += ["--rate", f"{scenario.rate:.1f}"]
            return command, "python (constant rate)"
        return command, "python"

    def run(self, scenario: Scenario, connections: int | None = None) -> Measurement:
        """One measurement; closed-loop runs probe for the best connection count unless
        ``connections`` is given."""
        print(f"→ {scenario.label} …", flush=True)
        args = self.args
        with self.server(scenario) as (port, pid):
            url = f"http://127.0.0.1:{port}{scenario.path}"
            if scenario.rate is not None:
                # Open loop: the warm-up runs inside the same generator process, so the
                # schedule is continuous; CPU figures are scaled to the measured window.
                conns = args.rate_connections
                command, name = self.command(scenario, url, conns, args.duration, args.warmup)
                total = args.duration + args.warmup
                result, *cpu = self._measure(command, pid, total + 60)
                share = args.duration / total if total else 1.0
                gen_cpu, server_cpu, broker_cpu = (None if c is None else c * share
                                                   for c in cpu)
                return self._finish(scenario, name, conns, result, args.duration,
                                    gen_cpu, server_cpu, broker_cpu)
            levels = [connections] if connections else self.levels(scenario)
            rates: dict[int, float] = {}
            if len(levels) > 1:  # find the connection count that saturates this server
                for level in levels:
                    command, _ = self.command(scenario, url, level, args.probe)
                    probe = self._measure(command, pid, args.probe + 60)[0]
                    ok = not (probe["non_2xx"] or probe["connect_errors"] or probe["timeouts"])
                    rates[level] = probe["completed"] / probe["duration_s"] if ok else 0.0
                conns = max(rates, key=lambda level: rates[level])
                print("  probe: " + ", ".join(f"{level} conns {rate:,.0f} req/s"
                                              for level, rate in rates.items())
                      + f" → {conns}", flush=True)
            else:
                conns = levels[0]
                if args.warmup:
                    command, _ = self.command(scenario, url, conns, args.warmup)
                    self._measure(command, pid, args.warmup + 60)
            command, name = self.command(scenario, url, conns, args.duration)
            result, gen_cpu, server_cpu, broker_cpu = self._measure(command, pid,
                                                                    args.duration + 60)
            measurement = self._finish(scenario, name, conns, result,
                                       float(result["duration_s"]), gen_cpu, server_cpu,
                                       broker_cpu)
            measurement.probe = rates
            return measurement

    def _measure(self, command: list[str], pid: int,
                 timeout: float) -> tuple[dict[str, Any], float, float | None, float | None]:
        """Run one generator process; its result and the CPU seconds of generator, server and
        broker during it."""
        server_before, broker_before = _cpu_seconds(pid), _cpu_seconds(self.broker.pid)
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        process = _spawn(command, cwd=ROOT, env=self.env(0), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
        try:
            out, err = process.communicate(timeout=timeout)
        finally:
            _stop(process)
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        server_after, broker_after = _cpu_seconds(pid), _cpu_seconds(self.broker.pid)
        generator_cpu = (children_after.ru_utime + children_after.ru_stime
                         - children_before.ru_utime - children_before.ru_stime)
        lines = [line for line in out.decode().splitlines() if line.startswith("BENCH_RESULT ")]
        if not lines:
            raise RuntimeError(f"load generator failed: {command}\n{out.decode()}\n"
                               f"{err.decode()}")
        result = orjson.loads(lines[-1].removeprefix("BENCH_RESULT "))
        server_cpu = (server_after - server_before
                      if server_after is not None and server_before is not None else None)
        broker_cpu = (broker_after - broker_before
                      if broker_after is not None and broker_before is not None else None)
        return result, generator_cpu, server_cpu, broker_cpu

    def _finish(self, scenario: Scenario, generator: str, conns: int,  # noqa: PLR0917
                result: dict[str, Any], duration: float, gen_cpu: float | None,
                server_cpu: float | None, broker_cpu: float | None) -> Measurement:
        measurement = Measurement(
            scenario, generator, conns, result,
            server_cpu=None if server_cpu is None else 100 * server_cpu / duration,
            broker_cpu=None if broker_cpu is None else 100 * broker_cpu / duration,
            generator_cpu=None if gen_cpu is None else 100 * gen_cpu / duration)
        if measurement.failures:
            measurement.notes.append(f"{measurement.failures} failed requests")
        if scenario.rate is not None and measurement.req_s < 0.97 * scenario.rate:
            measurement.notes.append(f"offered {scenario.rate:.0f} req/s, served "
                                     f"{measurement.req_s:.0f}")
        print(f"  {measurement.req_s:9.0f} req/s  {measurement.events_s:9.0f} events/s  "
              f"p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms  "
              f"failures {measurement.failures}  server CPU {_pct(measurement.server_cpu)}",
              flush=True)
        return measurement


# -- profiling (optional) ----------------------------------------------------------------------


def profile_ingest(bench: Bench, scenario: Scenario, conns: int, seconds: int) -> str:
    """Attach py-spy to ingest under closed-loop load; return a short text summary."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return ("py-spy not found: run `uv run --with py-spy python -m bench.ingest_bench "
                "--profile`")
    out = bench.workdir / f"profile-{scenario.key}.txt"
    print(f"→ profiling {scenario.label} with py-spy ({seconds} s, {conns} conns) …",
          flush=True)
    with bench.server(scenario) as (port, pid):
        url = f"http://127.0.0.1:{port}{scenario.path}"
        load, _ = bench.command(scenario, url, conns, seconds + 2)
        generator = _spawn(load, cwd=ROOT, env=bench.env(0), stdout=subprocess.DEVNULL)
        spy_process = None
        try:
            time.sleep(1)
            spy_process = _spawn([spy, "record", "--pid", str(pid), "--duration", str(seconds),
                                  "--rate", "250", "--format", "raw", "--output", str(out)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            spy_process.wait(seconds + 30)
            generator.wait(seconds + 30)
        finally:
            for process in (spy_process, generator):
                if process is not None:
                    _stop(process)
    if not out.exists():
        return "py-spy produced no output (ptrace not permitted?)"
    return summarize_collapsed(out.read_text(), scenario.label, out)


#: Ingest hot-path stages whose inclusive share the profile summary lists (function names as
#: py-spy prints them, ``|``-separated alternatives, each also matching its methods and inner
#: functions; stages missing from a profile are skipped).
STAGES = (
    ("request handling in uvicorn (everything below)", "RequestResponseCycle.run_asgi"),
    ("  tracking endpoint (ingest code)", "create_app.<locals>.tracking_endpoint"),
    ("    read_body", "read_body"),
    ("    parse_json", "parse_json"),
    ("    authenticate", "authenticate"),
    ("    Ingest.rate_limit", "Ingest.rate_limit"),
    ("    Ingest.facts", "Ingest.facts"),
    ("    build_events", "build_events"),
    ("      pydantic validate_python", "TypeAdapter.validate_python"),
    ("      segment_event", "segment_event"),
    ("    Ingest.produce", "Ingest.produce"),
    ("      Publisher.publish", "Publisher.publish"),
    ("      AIOKafkaProducer.send", "AIOKafkaProducer.send"),
    ("      murmur2 (partitioner)", "murmur2"),
    ("      asyncio.timeout", "timeout|Timeout"),
    ("    Ingest.cors", "Ingest.cors"),
    ("  response write (Response.__call__)", "Response.__call__"),
    ("  prometheus_client (metrics)", "MetricWrapperBase|MutexValue|Histogram|Counter"),
    ("  FastAPI NativeTelemetry.enabled", "NativeTelemetry.enabled"),
)


def summarize_collapsed(text: str, label: str, path: Path, top: int = 25) -> str:
    """Stage breakdown plus inclusive and self shares from py-spy's collapsed stacks."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    stacks: list[tuple[set[str], int]] = []
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = []
        for frame in stack.split(";"):
            name, _, where = frame.partition(" (")
            frames.append(f"{name} ({where.rsplit(':', 1)[0]})" if where else name)
        for name in set(frames):
            inclusive[name] += count
        stacks.append(({frame.split(" (")[0] for frame in frames}, count))
        own[frames[-1]] += count
    if not total:
        return f"{label}: no samples"

    def share(pattern: str) -> float:
        prefixes = pattern.split("|")

        def hit(name: str) -> bool:
            return any(name == p or name.startswith((p + ".", p + "<")) for p in prefixes)

        return 100 * sum(n for names, n in stacks if any(hit(name) for name in names)) / total

    lines = [f"py-spy profile of {label}: {total} samples, idle time excluded ({path})", "",
             "stages (inclusive % of busy samples):"]
    for title, prefix in STAGES:
        value = share(prefix)
        if value:
            lines.append(f"  {value:5.1f}%  {title}")
    framework = (share("RequestResponseCycle.run_asgi")
                 - share("create_app.<locals>.tracking_endpoint") - share("Response.__call__"))
    lines.append(f"  {framework:5.1f}%  = framework between uvicorn and the endpoint "
                 "(middleware, routing)")
    lines.append(f"  {100 - share('RequestResponseCycle.run_asgi'):5.1f}%  outside request "
                 "handling (event loop, HTTP parsing, Kafka sender)")
    chain = {name for name, n in inclusive.items() if n >= 0.97 * total}
    lines += ["", "inclusive (% of busy samples):"]
    lines += [f"  {100 * n / total:5.1f}%  {name}"
              for name, n in inclusive.most_common(top + len(chain)) if name not in chain][:top]
    lines += ["", "self (% of busy samples):"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    return "\n".join(lines)


# -- report ------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} %"


def _cost(m: Measurement) -> str:
    """CPU time the server spent per event (µs): comparable across scenarios and loads."""
    if m.server_cpu is None or not m.events_s:
        return "-"
    return f"{m.server_cpu / 100 * 1e6 / m.events_s:.0f}"


def _ms(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}"


def results_table(measurements: list[Measurement]) -> list[str]:
    head = ("| Scenario | Load | Generator | req/s | events/s | p50 ms | p99 ms | failed | "
            "server CPU | server CPU µs/event | broker CPU | generator CPU |")
    rows = [head, "|" + "---|" * 12]
    for m in measurements:
        load = (f"{m.scenario.rate:.0f} req/s, {m.connections} conns" if m.scenario.rate
                else f"closed loop, {m.connections} conns")
        rows.append(
            f"| {m.scenario.label} | {load} | {m.generator} | {m.req_s:,.0f} | "
            f"{m.events_s:,.0f} | {_ms(m.result['p50_ms'])} | {_ms(m.result['p99_ms'])} | "
            f"{m.failures} | {_pct(m.server_cpu)} | {_cost(m)} | {_pct(m.broker_cpu)} | "
            f"{_pct(m.generator_cpu)} |")
    return rows


def _levels_text(levels: str) -> str:
    parts = [p.strip() for p in str(levels).split(",") if p.strip()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def note_lines(measurements: list[Measurement]) -> list[str]:
    """What a row's numbers alone do not say (failures, an offered rate not served, rounds)."""
    lines = [f"- {m.scenario.label}: {'; '.join(m.notes)}" for m in measurements if m.notes]
    return ["Notes:", "", *lines, ""] if lines else []


def probe_lines(measurements: list[Measurement]) -> list[str]:
    """Which connection count each closed-loop row was measured with, and why."""
    lines = [f"- {m.scenario.label}: " + ", ".join(f"{level} → {rate:,.0f}"
                                                  for level, rate in m.probe.items())
             for m in measurements if m.probe]
    if not lines:
        return []
    return ["Connection-count probe (req/s per connection count over "
            "a short run; the best count was then measured):", "", *lines, ""]


@dataclass
class Verdict:
    key: str  # the measurement judged: ingest_single, ingest_latency or ingest_batch
    target: str
    measured: str
    passed: bool


def verdicts(by_key: dict[str, Measurement]) -> list[Verdict]:
    out: list[Verdict] = []
    single, produce = by_key.get("ingest_single"), by_key.get("baseline_produce")
    if single and produce:
        ratio = single.req_s / produce.req_s
        out.append(Verdict("ingest_single",
                           f"single events ≥ {SINGLE_VS_PRODUCE:.0%} of baseline B req/s",
                           f"{single.req_s:,.0f} / {produce.req_s:,.0f} req/s = {ratio:.0%}",
                           ratio >= SINGLE_VS_PRODUCE and not single.failures))
    latency = by_key.get("ingest_latency")
    if latency:
        p99 = float(latency.result["p99_ms"])
        rate = latency.scenario.rate or 0
        ok = (p99 < P99_LIMIT_MS and not latency.failures and latency.req_s >= 0.97 * rate)
        out.append(Verdict("ingest_latency", f"p99 < {P99_LIMIT_MS:.0f} ms at half load",
                           f"p99 {p99:.1f} ms (p50 {float(latency.result['p50_ms']):.1f} ms) "
                           f"at {rate:,.0f} req/s", ok))
    batch, produce_batch = by_key.get("ingest_batch"), by_key.get("baseline_batch")
    if batch and produce_batch:
        ratio = batch.events_s / produce_batch.events_s
        out.append(Verdict("ingest_batch",
                           f"batch of 100 ≥ {BATCH_VS_PRODUCE:.0%} of baseline C events/s",
                           f"{batch.events_s:,.0f} / {produce_batch.events_s:,.0f} events/s = "
                           f"{ratio:.0%}", ratio >= BATCH_VS_PRODUCE and not batch.failures))
    return out


def headline(by_key: dict[str, Measurement], checks: list[Verdict]) -> list[Figure]:
    """The figures docs/benchmarks.md shows, each with its same-run baseline, judged as
    :func:`verdicts` judged them."""
    passed = {check.key: check.passed for check in checks}
    out: list[Figure] = []
    single, produce = by_key.get("ingest_single"), by_key.get("baseline_produce")
    if single and produce:
        out.append(Figure("POST /v1/track, single events", single.req_s, "req/s",
                          f"≥ {SINGLE_VS_PRODUCE:.0%} of baseline", passed["ingest_single"],
                          "bare produce, one event per request", produce.req_s))
    batch, produce_batch = by_key.get("ingest_batch"), by_key.get("baseline_batch")
    if batch and produce_batch:
        out.append(Figure("POST /v1/batch, 100 events", batch.events_s, "events/s",
                          f"≥ {BATCH_VS_PRODUCE:.0%} of baseline", passed["ingest_batch"],
                          "bare produce, 100 events per request", produce_batch.events_s))
    latency, bare = by_key.get("ingest_latency"), by_key.get("baseline_produce_latency")
    if latency:
        p99 = float(latency.result["p99_ms"])
        out.append(Figure(f"p99 latency at half load ({latency.scenario.rate or 0:,.0f} req/s)",
                          p99, "ms", f"< {P99_LIMIT_MS:.0f} ms", passed["ingest_latency"],
                          "bare produce at the same rate",
                          float(bare.result["p99_ms"]) if bare else None,
                          lower_is_better=True))
    return out


def render_doc(facts: dict[str, str], args: argparse.Namespace, generator: str,  # noqa: PLR0917
               broker: Broker, measurements: list[Measurement], checks: list[Verdict],
               started: datetime, elapsed: float) -> str:
    command = " ".join(["uv run python -m bench.ingest_bench", *sys.argv[1:]]).strip()
    broker_text = ("embedded tansu broker (memory storage), started by the bench"
                   if broker.embedded is not None else
                   f"external broker `{broker.bootstrap}` (topic prefix `{broker.prefix}`)")
    lines = [
        "# Ingest benchmarks",
        "",
        "Generated by `bench/ingest_bench.py` (`make bench`); numbers from the last full run.",
        "Re-run on the target hardware before drawing conclusions: they depend on the machine.",
        "",
        "## Machine",
        "",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')} (run took {elapsed:.0f} s)",
        f"- CPUs (nproc): {facts['nproc']}; model: {facts['cpu']}; memory: {facts['memory']}",
        f"- Kernel {facts['kernel']}; Python {facts['python']}; uvicorn {facts['uvicorn']}; "
        f"aiokafka {facts['aiokafka']}",
        f"- Code: commit `{facts['commit']}`"
        + (" (uncommitted changes in the working tree were measured)"
           if facts["commit"].endswith("-dirty") else ""),
        f"- Broker: {broker_text}",
        f"- Load generator: {generator}",
        f"- Command: `{command}`",
        "",
        "## Targets",
        "",
        "| Target | Measured | Result |",
        "|---|---|---|",
        *[f"| {v.target} | {v.measured} | **{'PASS' if v.passed else 'FAIL'}** |"
          for v in checks],
        "",
        "## Results",
        "",
        *results_table(measurements),
        "",
        *note_lines(measurements),
        *probe_lines(measurements),
        "req/s and events/s count only 2xx answers' requests completed in the measured window; "
        "`failed` counts non-2xx answers, socket errors and timeouts (must be 0 for a row to "
        "count). CPU columns are the share of one core used during the measured window "
        "(100 % = one core busy); the machine has "
        f"{facts['nproc']} cores shared by the server, the broker and the load generator.",
        "",
        "## Method",
        "",
        "- Every scenario gets its own freshly started server process: uvicorn, one worker, "
        "uvloop + httptools, access log off (the options of `leadwerk_platform.serve`). Ingest "
        "runs as shipped, `python -m leadwerk_ingest`; the baselines are bare ASGI apps in "
        "`bench/apps.py` using ingest's producer options (`producer_options`: acks=all, "
        "linger 0; idempotence off because the embedded broker has none).",
        "  - **Baseline A** answers 200 `{\"success\":true}` to the single-event body "
        "(HTTP cost only).",
        "  - **Baseline B** produces the request body as-is (no key, so a random partition) to "
        "`tracking-events` and awaits the ack, then answers 200 (HTTP + one produce).",
        "  - **Baseline C** parses the 100-event batch with orjson, produces every event "
        "separately (orjson-serialised, key = anonymousId) and awaits every ack.",
        "  - **Ingest** `POST /v1/track` (one event) and `POST /v1/batch` (100 events), Basic "
        "auth with the dev write key. The bench copies `config/` with the dev workspace's rate "
        "limit lifted: otherwise the 2,000 events/s per write key limit would answer 429.",
        "- Throughput (closed loop): each server is first probed for "
        f"{args.probe:g} s at each of {_levels_text(args.connections)} keep-alive connections "
        f"(batches: {_levels_text(args.batch_connections)}); the probes are its warm-up "
        f"(a single count is warmed up for {args.warmup:g} s instead). The count with the most "
        f"req/s is then measured for {args.duration:g} s"
        + (f" (wrk, {args.wrk_threads} thread)." if generator.startswith("wrk") else ".")
        + " More connections than needed only add queueing (and, for ingest, CPU), so every "
        "server is measured at its own best.",
        "- Bodies: a realistic analytics.js `track` call (≈1 KB; a batch ≈104 KB: "
        "anonymousId, event, "
        "properties, context with a page URL carrying UTM parameters, a desktop Chrome "
        "user agent, library, locale, campaign, timestamp/sentAt). Every event has a fresh, "
        "unique messageId (wrk's Lua `request()` builds each body) and one of "
        f"{args.visitors:,} anonymous ids, so messages spread over the topic's partitions.",
        "- Latency: ingest `POST /v1/track` at a **constant** rate of half of ingest's own "
        "measured maximum single-event throughput (our reading of \"p99 under 25 ms at half "
        "that load\": half of the load ingest can sustain, not half of baseline B). wrk 4 "
        "cannot hold a constant rate (wrk2 is not packaged), so `bench/loadgen.py rate` (Python "
        f"asyncio + uvloop, its own process, {args.rate_connections} keep-alive connections) "
        "sends request *i* at start + i/rate and measures latency from that scheduled time, "
        "so time spent queueing behind a slow server counts (no coordinated omission). "
        "Baselines A and B at the same rate show the floor of generator + HTTP and of "
        "HTTP + produce. The target also requires the offered rate to be served (≥ 97 %) "
        "without failures.",
        "- p50/p99 of the closed-loop rows are latencies at saturation (wrk `--latency`), "
        "reported for completeness only.",
        "- \"server CPU µs/event\" is the server process's CPU time (user + system, from "
        "`/proc`) divided by the events it accepted: the cost of one event, comparable "
        "between the baselines and ingest.",
        "",
        "## Caveats",
        "",
        "- Two cores are shared by server, broker and load generator, and nothing else on the "
        "machine is stopped: repeated runs differ by roughly ±10-20 % in throughput. Compare "
        "ratios from one run rather than absolute numbers across runs.",
        "- A p99 over 10 s at ~2,000 req/s is decided by ~200 requests: a single pause of a "
        "few tens of milliseconds in the server (e.g. a full garbage collection) moves it "
        "past 25 ms. The reference rows at the same rate show what the generator and the "
        "bare produce path contribute.",
        "",
        "## Where ingest's time goes",
        "",
        "The gap to the baselines, what was done about it and what is left is analysed in "
        "[ADR 0006](decisions/0006-ingest-performance.md).",
        "",
        "## Reproduce",
        "",
        "```sh",
        "make bench                                   # = uv run python -m bench.ingest_bench",
        "uv run python -m bench.ingest_bench --duration 3 --warmup 1 --no-doc   # quick look",
        "uv run --with py-spy python -m bench.ingest_bench --profile --no-doc  # + py-spy",
        "```",
        "",
        "The bench installs `wrk` with apt-get when it is missing and it runs as root; "
        "otherwise it falls back to the Python closed-loop generator (`--generator python` "
        "forces that) and says so above. With `KAFKA_BOOTSTRAP_SERVERS` set it uses that "
        "broker (under a random topic prefix) instead of starting the embedded one. It exits "
        "0 even when a target fails.",
        "",
    ]
    return "\n".join(lines)


#: The pair whose ratio is the single-event target, measured in alternating rounds.
PAIRED = ("baseline_produce", "ingest_single")


def alternate_rounds(bench: Bench, measurements: list[Measurement],
                     rounds: int) -> list[Measurement]:
    """Measure baseline B and ingest's single events ``rounds - 1`` more times, alternately,
    at the connection counts their probes chose, and keep each one's median run: on a shared
    machine one run of either can be off by a third (a lucky baseline or a lucky ingest
    run decided the verdict before)."""
    first = {m.scenario.key: m for m in measurements if m.scenario.key in PAIRED}
    if rounds < 2 or len(first) < len(PAIRED):
        return measurements
    runs = {key: [first[key]] for key in PAIRED}
    for _ in range(rounds - 1):
        for key in PAIRED:
            runs[key].append(bench.run(first[key].scenario, first[key].connections))
    median: dict[str, Measurement] = {}
    for key, taken in runs.items():
        ordered = sorted(taken, key=lambda m: m.req_s)
        chosen = median[key] = ordered[len(ordered) // 2]
        chosen.probe = first[key].probe
        chosen.notes.append("median of {} alternating runs: {} req/s".format(
            len(taken), ", ".join(f"{m.req_s:,.0f}" for m in taken)))
    return [median.get(m.scenario.key, m) for m in measurements]


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest_bench",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per run")
    parser.add_argument("--connections", default="32,64,128,256",
                        help="connection counts probed for single-event throughput (the "
                             "best one is measured); one number skips the probe")
    parser.add_argument("--batch-connections", default="4,8,16,32",
                        help="connection counts probed for batch throughput")
    parser.add_argument("--probe", type=float, default=2.0,
                        help="seconds per probed connection count (also the warm-up)")
    parser.add_argument("--rate-connections", type=int, default=64,
                        help="connections of the constant-rate generator")
    parser.add_argument("--rate", type=float, default=None,
                        help="constant rate for the latency runs (default: half of ingest's "
                             "measured max single-event req/s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating runs of baseline B and ingest single events; the "
                             "median of each is reported")
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--visitors", type=int, default=5000, help="distinct anonymousIds")
    parser.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--replication-factor", type=int, default=1)
    parser.add_argument("--only", default="",
                        help="comma-separated scenario keys to run (implies --no-doc): "
                             "baseline_ok, baseline_produce, baseline_batch, ingest_single, "
                             "ingest_batch, ingest_latency, baseline_ok_latency, "
                             "baseline_produce_latency")
    parser.add_argument("--no-doc", action="store_true", help=f"do not write {DOC}")
    parser.add_argument("--no-reference-latency", action="store_true",
                        help="skip baselines A and B at the constant rate")
    parser.add_argument("--profile", action="store_true",
                        help="afterwards, py-spy ingest under load (needs py-spy on PATH)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the server logs / profiles folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(UTC)
    clock = time.monotonic()

    def terminate(signum: int, _: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    facts = machine_facts()
    try:
        import httptools  # noqa: F401, PLC0415
        import uvloop  # noqa: F401, PLC0415
    except ImportError as error:
        print(f"WARNING: {error}: uvicorn would not use uvloop/httptools", flush=True)
    wrk = ensure_wrk(args.generator)
    version = (subprocess.run([wrk, "--version"], capture_output=True, check=False)
               .stdout.decode().split(" [")[0].strip() if wrk else "")
    generator = (f"{version or 'wrk'} for throughput; Python constant-rate generator "
                 "(bench/loadgen.py) for latency" if wrk else
                 "Python closed-loop generator (bench/loadgen.py; wrk unavailable — it may "
                 "itself limit throughput) and Python constant-rate generator for latency")
    print(f"machine: {facts['nproc']} CPUs, {facts['cpu']}, Python {facts['python']}")
    print(f"load generator: {generator}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="leadwerk-bench-"))
    broker: Broker | None = None
    measurements: list[Measurement] = []
    profiles: list[str] = []
    try:
        broker = start_broker(args.replication_factor)
        print(f"broker: {broker.bootstrap} "
              f"({'embedded' if broker.embedded is not None else 'external'})", flush=True)
        bench = Bench(args, wrk, broker, workdir, write_template(workdir / "event.json"),
                      bench_config_dir(workdir / "config"))
        throughput = [
            Scenario("baseline_ok", "A: bare ASGI 200", "ok", "/v1/track"),
            Scenario("baseline_produce", "B: bare produce (1 event)", "produce", "/v1/track"),
            Scenario("baseline_batch", "C: bare produce (batch of 100)", "batch", "/v1/batch",
                     batch=100),
            Scenario("ingest_single", "ingest /v1/track", "ingest", "/v1/track"),
            Scenario("ingest_batch", "ingest /v1/batch (100 events)", "ingest", "/v1/batch",
                     batch=100),
        ]
        wanted = set(args.only.split(",")) if args.only else None
        for scenario in throughput:
            if wanted is None or scenario.key in wanted:
                measurements.append(bench.run(scenario))
        measurements = alternate_rounds(bench, measurements, args.rounds)
        by_key = {m.scenario.key: m for m in measurements}
        if args.rate is None and "ingest_single" not in by_key:
            raise SystemExit("--only without ingest_single needs --rate")
        rate = args.rate or round(by_key["ingest_single"].req_s / 2)
        latency = [Scenario("ingest_latency", "ingest /v1/track @ half load", "ingest",
                            "/v1/track", rate=rate)]
        if not args.no_reference_latency:
            latency += [
                Scenario("baseline_ok_latency", "A: bare ASGI 200 @ same rate", "ok",
                         "/v1/track", rate=rate),
                Scenario("baseline_produce_latency", "B: bare produce @ same rate", "produce",
                         "/v1/track", rate=rate),
            ]
        for scenario in latency:
            if wanted is None or scenario.key in wanted:
                measurements.append(bench.run(scenario))
        if args.profile:
            for scenario in throughput[3:]:
                if wanted is not None and scenario.key not in wanted:
                    continue
                chosen = by_key.get(scenario.key)
                conns = chosen.connections if chosen else bench.levels(scenario)[0]
                profiles.append(profile_ingest(bench, scenario, conns, 10))
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process the bench started", flush=True)
        return 130
    finally:
        _stop_all()
        if broker is not None and broker.embedded is not None:
            broker.embedded.stop()
        if not (args.keep_logs or args.profile):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs and profiles kept in {workdir}")

    checks = verdicts({m.scenario.key: m for m in measurements})
    print()
    print("\n".join(results_table(measurements)))
    print("\n".join(note_lines(measurements)))
    print()
    for verdict in checks:
        print(f"{'PASS' if verdict.passed else 'FAIL'}  {verdict.target}: {verdict.measured}")
    for text in profiles:
        print()
        print(text)
    if not (args.no_doc or args.only):
        record("ingest", headline({m.scenario.key: m for m in measurements}, checks), facts)
        DOC.write_text(render_doc(facts, args, generator, broker, measurements, checks,
                                  started, time.monotonic() - clock), encoding="utf-8")
        print(f"\nwrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
