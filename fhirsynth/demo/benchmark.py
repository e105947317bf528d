"""The 800-patient benchmark's results, as benchmarks/bench_records.py wrote them (package data), for the demo to
quote beside its own numbers. Nothing here is typed in: every number comes from that file."""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

RESULTS_FILE = Path(__file__).resolve().parents[1] / "data" / "benchmark-records.json"
REAL_VS_REAL = "real vs real"


@dataclass(frozen=True)
class Spread:
    """A metric over the runs of one setting (several seeds): mean and range."""

    mean: float
    low: float
    high: float
    runs: int


@dataclass(frozen=True)
class BenchmarkResults:
    n_train: int
    n_holdout: int
    epochs: int
    measured: str
    columns: dict[str, dict[str, float | None]]
    runs: list[dict]

    def real_vs_real(self, metric: str) -> float | None:
        return self.columns.get(REAL_VS_REAL, {}).get(metric)

    def at_epsilon(self, epsilon: float, metric: str, arch: str = "visit") -> Spread | None:
        """`metric` over every run of `arch` at `epsilon` (math.inf: the runs without DP)."""
        values = [v for run in self.runs
                  if run.get("arch") == arch and _epsilon(run) == epsilon
                  and (v := self.columns.get(run["column"], {}).get(metric)) is not None]
        if not values:
            return None
        return Spread(statistics.fmean(values), min(values), max(values), len(values))


def _epsilon(run: dict) -> float:
    return math.inf if not run.get("dp") else float(run["epsilon"])


def load_benchmark(path: Path = RESULTS_FILE) -> BenchmarkResults | None:
    """The results file, or None (logged) when it is missing or unreadable: the demo then says so instead."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return BenchmarkResults(n_train=int(doc["n_train"]), n_holdout=int(doc["n_holdout"]),
                                epochs=int(doc["epochs"]), measured=str(doc.get("measured", "")),
                                columns=doc["columns"], runs=list(doc["runs"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("benchmark results unavailable (%s): %s", path, exc)
        return None
