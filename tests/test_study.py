"""benchmarks/bench_study.py's baseline plumbing: option parsing and the table at equal epsilon (no training;
smartnoise-synth itself lives in another venv and is exercised by the study run, not here)."""

from __future__ import annotations

import math
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from bench_module import benchmark_module

from fhirsynth.evaluate.toy import toy_timelines
from fhirsynth.timeline.io import write_timelines

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_study.py"


@pytest.fixture(scope="module")
def bench():
    return benchmark_module("bench_study")


def test_unknown_baseline_method_is_rejected():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--baseline", "mst,ctgan", "--toy", "5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "ctgan" in proc.stderr


def test_baseline_only_needs_a_finished_study(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--baseline-only", "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--baseline-only" in proc.stderr


def test_binning_keeps_flags_and_zero(bench):
    t = pd.DataFrame({"flag": [0, 1, 1, 0, 1], "n": [0, 5, 10, 50, 1000], "x": [np.nan, 1.0, 2.0, 3.0, 4.0]})
    edges = bench.bin_edges(t, bins=2)
    b = bench.discretize(t, edges)
    assert b["flag"].tolist() == [0, 1, 1, 0, 1]
    assert b["n"].iloc[0] == 0 and b["n"].iloc[-1] == b["n"].max()
    assert b.notna().all().all()  # missing values take the median's bin, never NaN


def test_baseline_section_rows_at_equal_epsilon(bench, tmp_path):
    """fhirsynth rows from cached synthetic dirs, one row per (method, epsilon) including the inf stand-in, and
    a plain note instead of a crash when the smartnoise venv is missing."""
    for name, seed in (("train", 41), ("holdout", 42), ("synthetic-eps1.0", 43), ("synthetic-epsinf", 44)):
        write_timelines(toy_timelines(40, seed=seed, visits_per_year=0.5, id_prefix=name[:2]), tmp_path / name)
    args = Namespace(seed=1, baseline_methods=["mst", "aim"], baseline_python="", baseline_inf_eps=1e4)
    runs = {1.0: {"synthetic": tmp_path / "synthetic-eps1.0"}, math.inf: {"synthetic": tmp_path / "synthetic-epsinf"}}
    md = bench.baseline_section(args, tmp_path / "train", tmp_path / "holdout", runs, [1.0, math.inf], tmp_path, 40)
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| generator")]
    assert [ln.split(" | ")[0] for ln in lines] == \
        ["| holdout (ceiling)", "| fhirsynth ε=1", "| fhirsynth ε=∞ (no DP)"]
    for ln in lines:  # three numeric metrics per row
        cells = [c.strip() for c in ln.strip("|").split("|")][1:4]
        assert all(c not in ("", "n/a") for c in cells), ln
    for name in ("MST ε=1", "AIM ε=1", "MST ε=10000 (≈∞)", "AIM ε=10000 (≈∞)"):
        assert f"{name}: no --baseline-python" in md
    assert "rounds=80" in md and "num_marginals=200" in md


def test_losses_are_listed_by_metric(bench):
    ours = {"hellinger": 0.9, "detection_auc": 1.0, "condition_prevalence_r2": 0.5}
    theirs = {"hellinger": 0.95, "detection_auc": 0.7, "condition_prevalence_r2": 0.9}
    assert bench._worse(ours, theirs) == ["detection_auc", "condition_prevalence_r2"]
    assert bench._worse(theirs, ours) == ["hellinger"]
    assert bench._worse(ours, {**ours, "detection_auc": None}) == []


def test_table_rows_have_one_cell_per_header(bench, tmp_path):
    for name, seed in (("train", 51), ("holdout", 52), ("synthetic-eps1.0", 53)):
        write_timelines(toy_timelines(30, seed=seed, visits_per_year=0.5, id_prefix=name[:2]), tmp_path / name)
    args = Namespace(seed=1, baseline_methods=[], baseline_python="", baseline_inf_eps=1e4)
    md = bench.baseline_section(args, tmp_path / "train", tmp_path / "holdout",
                                {1.0: {"synthetic": tmp_path / "synthetic-eps1.0"}}, [1.0], tmp_path, 30)
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len({ln.count("|") for ln in table}) == 1, table
