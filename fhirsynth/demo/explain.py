"""What the demo's numbers mean, in plain words: the preface of its report.

Paragraphs (a list of strings) so the report can show them above its table; demo writes them to
OUT/report-preface.txt, separated by blank lines. Every number comes from the run (its metrics) or from the
benchmark's results file (fhirsynth.demo.benchmark), never from this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from fhirsynth.demo.benchmark import BenchmarkResults

# The one metric the preface explains: per-code patient prevalence R² against the held-out patients
# (fhirsynth.records_metrics), the same definition benchmarks/bench_records.py measured on 800 patients.
METRIC = "prevalence_r2"


@dataclass(frozen=True)
class DemoRun:
    n_train: int
    n_holdout: int
    epsilon: float
    epochs: int
    n_synthetic: int
    dp: dict[str, float]  # records_metrics.compare(holdout, DP synthetic)
    real_vs_real: dict[str, float]  # compare(holdout, training patients): the ceiling at this size
    reference: dict[str, float] | None = None  # compare(holdout, synthetic of the no-DP reference model)
    reference_epochs: int | None = None
    # the report's own prevalence rows: metric -> (DP model, reference model, held-out vs training patients)
    report_rows: dict[str, tuple[float | None, float | None, float | None]] | None = None


def _num(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _eps(e: float) -> str:
    return "∞ (no DP)" if math.isinf(e) else f"{e:g}"


def preface(run: DemoRun, bench: BenchmarkResults | None) -> list[str]:
    """The paragraphs, most important first."""
    paras = [
        (f"This is the demo: fhirsynth trained a model with differential privacy at ε = {_eps(run.epsilon)} on "
         f"{run.n_train} patients of the bundled sample and generated {run.n_synthetic} synthetic patients. The "
         f"other {run.n_holdout} sample patients were held out: training never saw them, and the numbers below "
         "compare the synthetic patients with them."),
    ]
    ref = (f" The same model trained without DP (ε = ∞, {run.reference_epochs} epochs, a reference only) reaches "
           f"{_num(run.reference.get(METRIC))}." if run.reference is not None else "")
    paras.append(
        f"With {run.n_train} training patients, ε = {_eps(run.epsilon)} leaves a per-code prevalence R² of "
        f"{_num(run.dp.get(METRIC))} against the held-out patients (1: every condition and observation code is as "
        f"common among synthetic patients as among real ones; 0: no better than giving every code the average "
        f"share; below 0: worse than that).{ref} The training patients themselves score "
        f"{_num(run.real_vs_real.get(METRIC))} against the held-out ones: with only {run.n_holdout} held-out "
        f"patients, that is the most any generator can show here.")
    if run.report_rows:
        parts = [f"{name} {_num(dp)} with DP" + (f", {_num(rf)} without" if rf is not None else "")
                 + f" (held-out patients: {_num(ceiling)})" for name, (dp, rf, ceiling) in run.report_rows.items()]
        paras.append("The same in this report's terms, where the reference column is the held-out patients "
                     "compared with the training patients: " + "; ".join(parts) + ".")
    paras.append(
        "Why: DP training clips each patient's contribution to every training step and adds random noise "
        "sized to one patient, so that no single patient can be recognised in the model. The noise is the same "
        "whatever the number of patients, the signal grows with it: with a few dozen patients per step the noise "
        "dominates, "
        "and the DP vocabulary releases a code only when enough patients have it. The same settings on more "
        "patients do much better, as the benchmark below shows.")
    paras.append(_benchmark_paragraph(run, bench))
    return paras


def _benchmark_paragraph(run: DemoRun, bench: BenchmarkResults | None) -> str:
    if bench is None:
        return ("The benchmark results that put these numbers in context are not available in this installation "
                "(fhirsynth/data/benchmark-records.json; see BENCHMARKS.md).")
    dp = bench.at_epsilon(run.epsilon, METRIC)
    inf = bench.at_epsilon(math.inf, METRIC)
    if dp is None:
        at = f"no ε = {_eps(run.epsilon)} run was measured there"
    else:
        seeds = f" ({_num(dp.low)} to {_num(dp.high)} over {dp.runs} training seeds)" if dp.runs > 1 else ""
        at = f"the same settings (ε = {_eps(run.epsilon)}) reach {_num(dp.mean)}{seeds}"
    return (f"On the {bench.n_train}-patient benchmark (benchmarks/bench_records.py: {bench.n_train} training and "
            f"{bench.n_holdout} held-out patients, {bench.epochs} epochs, measured {bench.measured}) {at}; without "
            f"DP {_num(inf.mean) if inf else 'n/a'}; the training patients against the held-out ones "
            f"{_num(bench.real_vs_real(METRIC))}. Read this report as what DP costs at n = {run.n_train}, not as "
            f"what fhirsynth does with a cohort of real size.")


def write_preface(paragraphs: list[str], path: Path) -> None:
    """Paragraphs separated by blank lines (what the report's preface input expects)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
