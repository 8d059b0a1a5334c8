"""The benchmarks at a glance: ``docs/benchmarks.md``.

Each benchmark records its headline figures (``record``), each beside the baseline measured in
the same run, in ``.state/bench/<bench>.json``; ``python -m bench.summary`` (the last step of
``make bench``) turns the latest record of every benchmark into one table with the ratio, the
target and the machine. The details of each run stay in ``docs/benchmarks-<bench>.md``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / ".state" / "bench"
DOC = ROOT / "docs" / "benchmarks.md"
ORDER = ("ingest", "scoring", "workflow", "mailer", "crm")


@dataclass(frozen=True)
class Figure:
    measurement: str
    value: float
    unit: str
    target: str
    passed: bool
    baseline: str = ""
    baseline_value: float | None = None
    #: lower is better (latencies): the ratio is then baseline / value
    lower_is_better: bool = False

    @property
    def ratio(self) -> float | None:
        if not self.baseline_value or not self.value:
            return None
        if self.lower_is_better:
            return self.baseline_value / self.value
        return self.value / self.baseline_value


def record(bench: str, figures: list[Figure], facts: dict[str, str]) -> Path:
    """Keep this run's headline figures for the summary."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{bench}.json"
    path.write_bytes(orjson.dumps({
        "bench": bench, "at": datetime.now(UTC).isoformat(timespec="minutes"),
        "facts": facts, "figures": [asdict(f) for f in figures]}, option=orjson.OPT_INDENT_2))
    return path


def _number(value: float, unit: str) -> str:
    text = f"{value:,.1f}" if value < 100 else f"{value:,.0f}"
    return f"{text} {unit}"


def render(records: list[dict[str, Any]]) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` from each benchmark's last run. Every figure stands beside its "
        "baseline, measured in the same run on the same machine; the ratio is figure / baseline "
        "(baseline / figure for latencies, so above 100 % is always better). Details and method: "
        "the per-service pages linked in the first column.",
        "",
        "| benchmark | measurement | figure | baseline (same run) | ratio | target | result |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    machines: dict[str, list[str]] = {}
    for entry in records:
        bench = entry["bench"]
        facts = entry["facts"]
        machine = (f"{facts.get('nproc', '?')} cores ({facts.get('cpu', 'unknown')}), "
                   f"{facts.get('memory', '?')} memory, Python {facts.get('python', '?')}")
        machines.setdefault(machine, []).append(
            f"{bench} {entry['at'][:16].replace('T', ' ')} UTC, commit {facts.get('commit', '?')}")
        for raw in entry["figures"]:
            figure = Figure(**raw)
            baseline = "—" if figure.baseline_value is None else (
                f"{_number(figure.baseline_value, figure.unit)} ({figure.baseline})")
            ratio = "—" if figure.ratio is None else f"{figure.ratio:.0%}"
            lines.append(
                f"| [{bench}](benchmarks-{bench}.md) | {figure.measurement} | "
                f"{_number(figure.value, figure.unit)} | {baseline} | {ratio} | "
                f"{figure.target} | {'PASS' if figure.passed else '**FAIL**'} |")
    lines += ["", "## Machine and runs", ""]
    for machine, runs in machines.items():
        lines.append(f"- {machine}: " + "; ".join(runs))
    lines.append("")
    return "\n".join(lines)


def latest() -> list[dict[str, Any]]:
    found = {path.stem: orjson.loads(path.read_bytes()) for path in RESULTS.glob("*.json")}
    return [found[name] for name in (*ORDER, *sorted(set(found) - set(ORDER))) if name in found]


def main() -> int:
    records = latest()
    if not records:
        sys.stderr.write(f"no benchmark results in {RESULTS}: run `make bench` first\n")
        return 1
    DOC.write_text(render(records), encoding="utf-8")
    sys.stdout.write(f"wrote {DOC.relative_to(ROOT)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
