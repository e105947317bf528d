"""`fhirsynth demo --no-serve` end to end, with the fewest epochs and patients that still run every stage."""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fhirsynth.demo.benchmark import load_benchmark
from fhirsynth.timeline.io import read_timelines


@pytest.mark.slow
def test_demo_holds_out_trains_both_models_evaluates_and_explains(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "fhirsynth", "demo", "--no-serve", "--out", str(out), "--epochs",
                           "1", "--reference-epochs", "1", "-n", "12"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr

    # both real parts are written, disjoint, 20% held out
    train = {tl.patient.patient_id for tl in read_timelines(out / "real" / "train")}
    held = {tl.patient.patient_id for tl in read_timelines(out / "real" / "holdout")}
    everyone = {tl.patient.patient_id for tl in read_timelines(out / "timelines")}
    assert not train & held and train | held == everyone and len(held) == round(0.2 * len(everyone))

    # the DP report has its reference column (the holdout)
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["meta"]["holdout"]["patients"] == len(held)
    prevalence = [r for r in report["summary"] if "prevalence" in r["metric"].lower()]
    assert prevalence and all(r["reference"] is not None for r in prevalence)
    # the reference model is the report's second column, with the same rows
    ref_rows = {r["metric"]: r for r in report["compare"]["no DP (reference)"]["summary"]}
    assert all(ref_rows[r["metric"]]["synthetic"] is not None for r in prevalence)
    assert (out / "model" / "privacy.json").is_file() and (out / "reference-model" / "privacy.json").is_file()

    # the preface: this run's sizes and the report's own numbers, and the benchmark's numbers from its file
    preface = (out / "report-preface.txt").read_text()
    paragraphs = preface.strip().split("\n\n")
    assert len(paragraphs) >= 4
    assert f"With {len(train)} training patients" in preface
    row = prevalence[0]
    assert f"{row['metric']} {row['synthetic']:.2f} with DP" in preface
    bench = load_benchmark()
    assert bench is not None and f"On the {bench.n_train}-patient benchmark" in preface
    assert f"{bench.at_epsilon(8.0, 'prevalence_r2').mean:.2f}" in preface
    assert paragraphs[0] in proc.stderr  # logged too
    # and it leads the report, whose summary has the reference model's column
    assert report["meta"]["preface"] == paragraphs
    page = (out / "report" / "report.html").read_text()
    assert html.escape(paragraphs[0], quote=False) in page or html.escape(paragraphs[0]) in page
    assert "no DP (reference)" in page

