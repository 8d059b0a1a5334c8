"""``make bench``'s summary table: each figure beside its same-run baseline, ratio, target."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import summary
from bench.summary import Figure


def test_the_table_shows_figure_baseline_ratio_target_and_machine(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(summary, "RESULTS", tmp_path)
    facts = {"nproc": "2", "cpu": "Xeon", "memory": "23.5 GiB", "python": "3.11.7",
             "commit": "abc1234"}
    summary.record("mailer", [Figure("emails, one process", 700, "emails/s",
                                     "≥ 70% of baseline", True, "bare aiosmtplib", 1000)],
                   facts)
    summary.record("ingest", [Figure("p99 at half load", 8.0, "ms", "< 25 ms", True,
                                     "bare produce", 4.0, lower_is_better=True)], facts)
    text = summary.render(summary.latest())
    rows = [line for line in text.splitlines() if line.startswith("| [")]
    assert rows[0].startswith("| [ingest](benchmarks-ingest.md) | p99 at half load | 8.0 ms "
                              "| 4.0 ms (bare produce) | 50% | < 25 ms | PASS |")
    assert rows[1] == ("| [mailer](benchmarks-mailer.md) | emails, one process | 700 emails/s "
                       "| 1,000 emails/s (bare aiosmtplib) | 70% | ≥ 70% of baseline | PASS |")
    assert "2 cores (Xeon), 23.5 GiB memory, Python 3.11.7: ingest" in text
