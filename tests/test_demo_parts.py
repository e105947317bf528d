"""The demo's parts that need no training: the holdout split, the benchmark results file, the preface text and the
printed example commands."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fhirsynth.commands.demo import example_commands
from fhirsynth.demo.benchmark import RESULTS_FILE, load_benchmark
from fhirsynth.demo.explain import METRIC, DemoRun, preface, write_preface
from fhirsynth.demo.split import split_holdout
from fhirsynth.evaluate.toy import toy_timelines
from fhirsynth.timeline.io import read_timelines, write_timelines


def test_split_is_seeded_disjoint_and_complete(tmp_path: Path) -> None:
    write_timelines(toy_timelines(30, seed=3, id_prefix="p"), tmp_path / "all")
    sizes = split_holdout(tmp_path / "all", tmp_path / "a" / "train", tmp_path / "a" / "hold", 0.2, seed=5)
    again = split_holdout(tmp_path / "all", tmp_path / "b" / "train", tmp_path / "b" / "hold", 0.2, seed=5)
    other = split_holdout(tmp_path / "all", tmp_path / "c" / "train", tmp_path / "c" / "hold", 0.2, seed=6)
    assert sizes == again == other == (24, 6)

    def ids(path: Path) -> set[str]:
        return {tl.patient.patient_id for tl in read_timelines(path)}

    train, hold = ids(tmp_path / "a" / "train"), ids(tmp_path / "a" / "hold")
    assert not train & hold and train | hold == ids(tmp_path / "all")
    assert hold == ids(tmp_path / "b" / "hold")
    assert hold != ids(tmp_path / "c" / "hold")  # another seed, another draw (6 of 30: a clash is ~1 in 600k)


def test_packaged_benchmark_results_are_the_scripts_output() -> None:
    """The shipped file has the shape bench_records.py writes, and every run it lists has its column."""
    doc = json.loads(RESULTS_FILE.read_text())
    assert doc["benchmark"] == "benchmarks/bench_records.py"
    bench = load_benchmark()
    assert bench is not None and bench.n_train == doc["n_train"] and bench.n_holdout == doc["n_holdout"]
    for run in doc["runs"]:
        assert METRIC in doc["columns"][run["column"]]
    eight = bench.at_epsilon(8.0, METRIC)
    values = [doc["columns"][r["column"]][METRIC] for r in doc["runs"] if r["dp"] and float(r["epsilon"]) == 8]
    assert eight is not None and eight.runs == len(values) and eight.low == min(values) and eight.high == max(values)
    assert bench.real_vs_real(METRIC) == doc["columns"]["real vs real"][METRIC]


def test_missing_benchmark_file_is_none(tmp_path: Path) -> None:
    assert load_benchmark(tmp_path / "nope.json") is None
    (tmp_path / "bad.json").write_text("{")
    assert load_benchmark(tmp_path / "bad.json") is None


def _bench_file(tmp_path: Path) -> Path:
    doc = {"benchmark": "benchmarks/bench_records.py", "n_train": 800, "n_holdout": 200, "epochs": 10,
           "measured": "2026-01-02", "runs": [
               {"column": "a", "arch": "visit", "epsilon": "8", "seed": 1, "dp": True},
               {"column": "b", "arch": "visit", "epsilon": "8", "seed": 2, "dp": True},
               {"column": "c", "arch": "visit", "epsilon": "inf", "seed": 1, "dp": False}],
           "columns": {"real vs real": {METRIC: 0.991}, "a": {METRIC: 0.71}, "b": {METRIC: 0.77},
                       "c": {METRIC: 0.83}}}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    return path


def _run(reference: bool = True) -> DemoRun:
    return DemoRun(n_train=64, n_holdout=16, epsilon=8.0, epochs=10, n_synthetic=100,
                   dp={METRIC: -0.4321}, real_vs_real={METRIC: 0.8765},
                   reference={METRIC: 0.1234} if reference else None, reference_epochs=5 if reference else None,
                   report_rows={"Condition prevalence R²": (-1.09, 0.2, 0.8888)})


def test_preface_states_the_runs_and_the_benchmarks_numbers(tmp_path: Path) -> None:
    text = "\n".join(preface(_run(), load_benchmark(_bench_file(tmp_path))))
    # this run's numbers
    for needle in ("64 training patients", "16", "-0.43", "0.12", "0.88", "-1.09", "0.20", "0.89", "ε = 8"):
        assert needle in text, needle
    # the benchmark's, from the file: 800 patients, the mean 0.74 and range 0.71-0.77 of the two seeds, inf, ceiling
    for needle in ("800-patient benchmark", "0.74", "0.71 to 0.77 over 2 training seeds", "without DP 0.83",
                   "0.99", "2026-01-02"):
        assert needle in text, needle


def test_preface_without_reference_or_benchmark_says_so(tmp_path: Path) -> None:
    paras = preface(_run(reference=False), None)
    text = "\n".join(paras)
    assert "without DP (ε = ∞" not in text
    assert "not available" in text and "benchmark-records.json" in text


def test_preface_file_is_paragraphs(tmp_path: Path) -> None:
    paras = preface(_run(), load_benchmark(_bench_file(tmp_path)))
    write_preface(paras, tmp_path / "out" / "report-preface.txt")
    text = (tmp_path / "out" / "report-preface.txt").read_text()
    assert text.split("\n\n") == [*paras[:-1], paras[-1] + "\n"]
    assert all("\n" not in p for p in paras)


def test_example_commands_include_a_bulk_export_kick_off_and_poll() -> None:
    lines = example_commands("http://127.0.0.1:9999", "pid-1")
    text = "\n".join(lines)
    assert "http://127.0.0.1:9999/Patient/pid-1/$everything" in text
    kick = next(ln for ln in lines if "$export" in ln)
    assert "Prefer: respond-async" in kick and "http://127.0.0.1:9999/$export" in kick
    assert re.search(r"content-location", text, re.IGNORECASE) and "poll" in text
