"""The whole fhirsynth study: fidelity, utility, privacy and plausibility at several privacy budgets.

    python benchmarks/bench_study.py [--data ../shared/data/us/ndjson | --timelines DIR | --toy N]
        [--work DIR] [--epsilons 1,3,8,inf] [--holdout-frac 0.3] [--n-synthetic N] [--epochs E]
        [--device auto] [--audit-canaries M] [--audit-epochs E] [--baseline mst,aim|none]
        [--baseline-python PATH] [--baseline-only] [--out FILE.md]

Steps: ingest the shared US cohort (cached in --work), split patients into train/holdout, then for every
epsilon train a model on train (epsilon=inf means --no-dp), sample synthetic timelines, and run
fhirsynth.evaluate against train with the holdout as reference. Two calibration columns are measured in the
same run: the holdout itself (what a perfect generator reaches: the ceiling) and a replay of training patients
(pure memorisation: what the privacy metrics must flag). Optional baseline: smartnoise-synth MST/AIM on the
flattened per-patient table at the same epsilon, run with --baseline-python (smartnoise-synth pins
opacus<0.15 and pandas<2.4, so it cannot share /work/venv; make a separate venv for it). Each baseline also gets an
epsilon = inf row, run as the same mechanism at --baseline-inf-eps (default 1e4; see BASELINE_INF_EPS).
--baseline-only rebuilds just the baseline table from the synthetic-eps* dirs already in --work (no training).

Prints a markdown table (and writes it to --out) for BENCHMARKS.md; under the baseline table, every metric where
a baseline beats fhirsynth at the same epsilon is listed ("fhirsynth loses"). Also writes --work/study.html: the
verdicts, summary table and privacy-utility curve drawn by the same code as `fhirsynth evaluate`'s report.html.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from dp_smartnoise import BASELINE_KWARGS, run_baseline  # noqa: E402 - shared with bench_calibrate
from fhirsynth.evaluate.cohort import load_cohort  # noqa: E402
from fhirsynth.evaluate.fidelity import detection_auc, gaussian_copula_hellinger, r2_identity  # noqa: E402
from fhirsynth.evaluate.html import render_study_html  # noqa: E402
from fhirsynth.evaluate.report import evaluate  # noqa: E402
from fhirsynth.evaluate.tables import feature_spec, flatten  # noqa: E402
from fhirsynth.timeline.io import TimelineWriter, read_timelines  # noqa: E402
from fhirsynth.timeline.types import Timeline  # noqa: E402

log = logging.getLogger("bench_study")
DEFAULT_DATA = REPO.parent / "shared" / "data" / "us" / "ndjson"


# ---------------------------------------------------------------- data preparation
def ensure_timelines(args: argparse.Namespace, work: Path) -> Path:
    if args.timelines:
        return Path(args.timelines)
    out = work / "timelines"
    if (out / "events.parquet").is_file():
        return out
    if args.toy:
        from fhirsynth.evaluate.toy import toy_timelines
        from fhirsynth.timeline.io import write_timelines

        write_timelines(toy_timelines(args.toy, seed=7), out)
        return out
    from fhirsynth.timeline.adapter import ingest

    t = time.perf_counter()
    ingest([args.data], out, mapping="us-core")
    log.info("ingested %s in %.0fs", args.data, time.perf_counter() - t)
    return out


def split_patients(src: Path, train: Path, holdout: Path, frac: float, seed: int) -> tuple[int, int]:
    if (train / "events.parquet").is_file() and (holdout / "events.parquet").is_file():
        return load_cohort(train).n, load_cohort(holdout).n
    rng = np.random.default_rng(seed)
    with TimelineWriter(train) as wt, TimelineWriter(holdout) as wh:
        for tl in read_timelines(src):
            (wh if rng.random() < frac else wt).add(tl)
    return wt.n_patients, wh.n_patients


def replay(train: Path, out: Path, n: int, seed: int) -> None:
    """Memorisation calibration: n training patients drawn with replacement, renamed."""
    pool = list(read_timelines(train))
    rng = np.random.default_rng(seed)
    with TimelineWriter(out) as w:
        for i, j in enumerate(rng.integers(0, len(pool), n)):
            tl = pool[int(j)]  # copy the patient: the writer buffers the object, so renaming in place corrupts it
            w.add(Timeline(dataclasses.replace(tl.patient, patient_id=f"replay-{i}"), tl.events))


def train_and_sample(train: Path, eps: float, work: Path, args: argparse.Namespace, n: int) -> dict:
    from fhirsynth.model.sampler import sample_timelines
    from fhirsynth.model.train import train_model

    model_dir, synth_dir = work / f"model-eps{eps}", work / f"synthetic-eps{eps}"
    if (model_dir / "privacy.json").is_file() and (synth_dir / "events.parquet").is_file():  # cached run
        log.info("reusing %s and %s", model_dir, synth_dir)
        return {"model": model_dir, "synthetic": synth_dir, "train_s": math.nan, "sample_s": math.nan,
                "privacy": json.loads((model_dir / "privacy.json").read_text())}
    dp = math.isfinite(eps)
    kwargs = {"device": args.device, "seed": args.seed}
    if args.epochs:
        kwargs["epochs"] = args.epochs
    t = time.perf_counter()
    privacy = train_model(train, model_dir, epsilon=eps if dp else 8.0, dp=dp, **kwargs)
    t_train = time.perf_counter() - t
    t = time.perf_counter()
    with TimelineWriter(synth_dir) as w:
        for tl in sample_timelines(model_dir, n, seed=args.seed, device=args.device):
            w.add(tl)
    return {"model": model_dir, "synthetic": synth_dir, "privacy": privacy, "train_s": t_train,
            "sample_s": time.perf_counter() - t}


# ---------------------------------------------------------------- smartnoise-synth baseline
# The epsilon = inf row of a tabular baseline: the same mechanism with negligible noise. Resampling the training
# table instead would be memorisation, which the holdout (fidelity ceiling) and replay columns already show;
# what the inf row must show is how close the method's own model (a junction tree of low-order marginals) can
# get to the data, the counterpart of fhirsynth trained without DP. 1e4 gives a Gaussian noise sd well below one
# count; 1e5 and up overflow opendp's cdp_rho inside smartnoise-synth.
BASELINE_INF_EPS = 1e4


def discretize(table: pd.DataFrame, edges: dict[str, np.ndarray]) -> pd.DataFrame:
    return pd.DataFrame({c: np.digitize(table[c].fillna(np.nanmedian(table[c]) if table[c].notna().any() else 0),
                                        edges[c]) for c in table.columns}, index=table.index)


def bin_edges(table: pd.DataFrame, bins: int = 8) -> dict[str, np.ndarray]:
    """Quantile edges from the training table: NOT privacy-accounted (favours the baseline; stated in output)."""
    out = {}
    for c in table.columns:
        v = table[c].dropna().to_numpy(float)
        uniq = np.unique(v)
        if len(uniq) <= bins:  # few distinct values (flags, small counts): one bin each, 0 stays 0
            out[c] = (uniq[1:] + uniq[:-1]) / 2
        else:
            out[c] = np.unique(np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1]))
    return out


def table_metrics(real_binned: pd.DataFrame, other_binned: pd.DataFrame, seed: int) -> dict:
    cond = [c for c in real_binned.columns if c.startswith("cond:")]
    r2 = r2_identity((real_binned[cond] > 0).mean().to_numpy(), (other_binned[cond] > 0).mean().to_numpy())
    return {"hellinger": gaussian_copula_hellinger(real_binned, other_binned),
            "detection_auc": detection_auc(real_binned, other_binned, seed=seed).get("auc"),
            "condition_prevalence_r2": r2}


# ---------------------------------------------------------------- output
def _fmt(v: object) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
    return str(v)


def markdown(columns: dict[str, dict], notes: list[str]) -> str:
    """columns: name -> report (summary rows) or {'error': str}."""
    names = list(columns)
    metrics: list[str] = []
    for rep in columns.values():
        for row in rep.get("summary", []):
            if row["metric"] not in metrics:
                metrics.append(row["metric"])
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m in metrics:
        cells = []
        for rep in columns.values():
            row = next((r for r in rep.get("summary", []) if r["metric"] == m), None)
            cells.append(_fmt(row.get("synthetic")) if row else "n/a")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for name, rep in columns.items():
        if "error" in rep:
            notes.append(f"{name}: not run ({rep['error']})")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--timelines", type=Path, help="use an existing timelines dir instead of ingesting --data")
    ap.add_argument("--toy", type=int, default=0, help="use N toy patients (smoke run)")
    ap.add_argument("--work", type=Path, default=None, help="work dir (cached ingest, models, reports)")
    ap.add_argument("--epsilons", default="1,3,8,inf")
    ap.add_argument("--holdout-frac", type=float, default=0.3)
    ap.add_argument("--n-synthetic", type=int, default=0, help="synthetic patients per model (default: train size)")
    ap.add_argument("--epochs", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--audit-canaries", type=int, default=0,
                    help="canaries for the one-run DP audit of every model (0: no audit; ~1,000 to be informative)")
    ap.add_argument("--audit-epochs", type=int, default=0, help="epochs of the audit training run (default --epochs)")
    ap.add_argument("--baseline", default="mst",
                    help="comma list of smartnoise-synth methods (mst, aim) or none (default mst)")
    ap.add_argument("--baseline-inf-eps", type=float, default=BASELINE_INF_EPS,
                    help="epsilon standing in for infinity in the baselines' no-DP row (0: no such row)")
    ap.add_argument("--baseline-only", action="store_true",
                    help="only the baseline table, from the synthetic-eps* dirs already in --work")
    ap.add_argument("--baseline-python", default=os.environ.get("FHIRSYNTH_BASELINE_PYTHON", ""),
                    help="python of a venv with smartnoise-synth installed")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    ap.add_argument("--summarize", action="store_true",
                    help="only rebuild the table from the report-*/report.json already in --work")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    methods = [m.strip().lower() for m in args.baseline.split(",") if m.strip() and m.strip().lower() != "none"]
    bad = [m for m in methods if m not in BASELINE_KWARGS]
    if bad:
        ap.error(f"--baseline: unknown method(s) {', '.join(bad)}; use mst, aim or none")
    args.baseline_methods = methods
    if args.audit_canaries < 0:
        ap.error(f"--audit-canaries must be >= 0, got {args.audit_canaries}")
    if args.summarize:
        md = summarize(args.work)
        print(md)
        if args.out:
            args.out.write_text(md)
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="fhirsynth-study-"))
    work.mkdir(parents=True, exist_ok=True)
    epsilons = [math.inf if e.strip() in ("inf", "∞") else float(e) for e in args.epsilons.split(",")
                if e.strip() and e.strip() != "none"]

    if args.baseline_only:
        train, holdout = work / "train", work / "holdout"
        if not (train / "events.parquet").is_file():
            ap.error(f"--baseline-only needs a finished study in --work ({train} is missing)")
        runs = {e: {"synthetic": work / f"synthetic-eps{e}"} for e in epsilons
                if (work / f"synthetic-eps{e}" / "events.parquet").is_file()}
        md = baseline_section(args, train, holdout, runs, epsilons, work, args.n_synthetic or load_cohort(train).n)
        print(md)
        if args.out:
            args.out.write_text(md)
        return 0
    src = ensure_timelines(args, work)
    train, holdout = work / "train", work / "holdout"
    n_train, n_hold = split_patients(src, train, holdout, args.holdout_frac, args.seed)
    n_syn = args.n_synthetic or n_train
    log.info("train %d / holdout %d patients; %d synthetic per model", n_train, n_hold, n_syn)

    columns: dict[str, dict] = {}
    timings: list[str] = []
    replay(train, work / "replay", n_syn, args.seed)
    t = time.perf_counter()
    replayed = evaluate(train, work / "replay", holdout=holdout, out_dir=work / "report-replay", seed=args.seed)
    timings.append(f"evaluation of replay vs train ({n_syn} vs {n_train} patients, with holdout): "
                   f"{time.perf_counter() - t:.0f}s")
    # the reference fields are the same in every report: holdout vs train (fidelity), TRTR (utility),
    # the holdout's own copy rate / population attribute inference, and the real data's own plausibility rates
    columns["reference (holdout / TRTR / real)"] = {"summary": [
        {"metric": r["metric"], "synthetic": None if r["metric"].startswith("Formal") else r.get("reference")}
        for r in replayed["summary"]]}
    columns["replay (memorisation)"] = replayed
    runs: dict[float, dict] = {}
    for eps in epsilons:
        name = "ε=∞ (no DP)" if math.isinf(eps) else f"ε={eps:g}"
        try:
            run = train_and_sample(train, eps, work, args, n_syn)
            t = time.perf_counter()
            audit_epochs = args.audit_epochs or args.epochs
            audit = {"train_kwargs": {"epochs": audit_epochs}} if audit_epochs else {}
            rep = evaluate(train, run["synthetic"], holdout=holdout, model=run["model"],
                           out_dir=work / f"report-eps{eps}", seed=args.seed, audit_canaries=args.audit_canaries,
                           audit_kwargs=audit)
        except Exception as exc:  # noqa: BLE001 - a missing/failed stage is reported in the table, not fatal
            log.exception("epsilon %s failed", eps)
            columns[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        runs[eps] = run
        columns[name] = rep
        timings.append(f"{name}: train {run['train_s']:.0f}s, sample {run['sample_s']:.0f}s, "
                       f"evaluate {time.perf_counter() - t:.0f}s")
    notes = [f"cohort: {src} ({n_train} train / {n_hold} holdout patients, split seed {args.seed}); "
             f"{n_syn} synthetic patients per model; reports under {work}"] + timings

    baseline_md = ""
    if args.baseline_methods:
        baseline_md = baseline_section(args, train, holdout, runs, epsilons, work, n_syn)
    md = "## Study: fhirsynth at several privacy budgets\n\n" + markdown(columns, notes) + "\n" + baseline_md
    print(md)
    if args.out:
        args.out.write_text(md)
    (work / "study.json").write_text(json.dumps({k: v.get("summary", v) for k, v in columns.items()}, indent=1,
                                                default=str))
    write_study_html(work, {f"ε={e:g}" if math.isfinite(e) else "ε=∞ (no DP)": e for e in epsilons}, columns)
    return 0


def write_study_html(work: Path, epsilons: dict[str, float], columns: dict[str, dict]) -> Path | None:
    """work/study.html from the finished columns (the epsilon runs first, then the replay calibration column)."""
    shown = {n: columns[n] for n in epsilons if "summary" in columns.get(n, {})}
    if "replay (memorisation)" in columns:
        shown["replay (memorisation)"] = columns["replay (memorisation)"]
    if not shown:
        return None
    path = work / "study.html"
    path.write_text(render_study_html(shown, "fhirsynth study: several privacy budgets",
                                      epsilons={n: e for n, e in epsilons.items() if n in shown}), encoding="utf-8")
    log.info("wrote %s", path)
    return path


def summarize(work: Path) -> str:
    """The table from finished reports (a study interrupted after some epsilons still yields its columns)."""
    columns: dict[str, dict] = {}
    replayed = work / "report-replay" / "report.json"
    if replayed.is_file():
        rep = json.loads(replayed.read_text())
        columns["reference (holdout / TRTR / real)"] = {"summary": [
            {"metric": r["metric"], "synthetic": None if r["metric"].startswith("Formal") else r.get("reference")}
            for r in rep["summary"]]}
        columns["replay (memorisation)"] = rep
    def eps_key(p: Path) -> float:
        return float(p.parent.name.removeprefix("report-eps"))
    epsilons = {}
    for path in sorted(work.glob("report-eps*/report.json"), key=eps_key):
        eps = eps_key(path)
        name = "ε=∞ (no DP)" if math.isinf(eps) else f"ε={eps:g}"
        columns[name] = json.loads(path.read_text())
        epsilons[name] = eps
    write_study_html(work, epsilons, columns)
    return "## Study: fhirsynth at several privacy budgets\n\n" + markdown(columns, [f"reports under {work}"])


def baseline_section(args: argparse.Namespace, train: Path, holdout: Path, runs: dict, epsilons: list[float],
                     work: Path, n_syn: int) -> str:
    """fhirsynth and each smartnoise-synth method side by side at every epsilon, on one binned table."""
    real = load_cohort(train)
    spec = feature_spec(real)
    real_t = flatten(real, spec)
    edges = bin_edges(real_t)
    real_b = discretize(real_t, edges)
    hold_b = discretize(flatten(load_cohort(holdout), spec), edges)
    rows = [f"holdout (ceiling) | {_cells(table_metrics(real_b, hold_b, args.seed))} | "]
    problems: list[str] = []
    losses: list[str] = []
    for eps in epsilons:
        label = "∞ (no DP)" if math.isinf(eps) else f"{eps:g}"
        ours = None
        if eps in runs:
            syn_b = discretize(flatten(load_cohort(runs[eps]["synthetic"]), spec), edges)
            ours = table_metrics(real_b, syn_b, args.seed)
            rows.append(f"fhirsynth ε={label} | {_cells(ours)} | ")
        run_eps = eps if math.isfinite(eps) else args.baseline_inf_eps
        if not run_eps:
            continue
        for method in args.baseline_methods:
            name = method.upper() + (f" ε={eps:g}" if math.isfinite(eps) else f" ε={run_eps:g} (≈∞)")
            if not args.baseline_python:
                problems.append(f"{name}: no --baseline-python (smartnoise-synth cannot be installed into "
                                "/work/venv: it pins opacus<0.15 and pandas<2.4)")
                continue
            try:
                log.info("baseline %s", name)
                base, fit_s = run_baseline(method, args.baseline_python, real_b, run_eps, n_syn, work, args.seed)
                theirs = table_metrics(real_b, base, args.seed)
                rows.append(f"{name} | {_cells(theirs)} | {fit_s:.0f}")
                if ours is not None and (worse := _worse(ours, theirs)):
                    losses.append(f"ε={label}: {method.upper()} better on {', '.join(worse)}")
            except Exception as exc:  # noqa: BLE001 - report and continue
                problems.append(f"{name} failed: {exc}")
    head = ("\n### Baselines on the flattened per-patient table (binned; same columns and bins for all rows)\n\n"
            "| generator | Gaussian-copula Hellinger (0 best) | detection AUC (0.5 best) | condition prevalence R² "
            "| baseline fit s |\n|---|---|---|---|---|\n")
    caps = ", ".join(f"{k}={v}" for k, v in BASELINE_KWARGS["aim"].items())
    foot = ["- column choice and bin edges come from the training table and are NOT privacy-accounted for the "
            "baselines (this favours them); fhirsynth's epsilon covers its whole pipeline",
            f"- smartnoise-synth delta 1e-9 (its default), fhirsynth delta 1e-5; AIM capped ({caps}) to finish "
            "in minutes on 2 cores",
            f"- ε=∞ baseline rows: the same mechanism at ε={args.baseline_inf_eps:g} (negligible noise), not the "
            "training table resampled (that is memorisation: see the holdout row and the replay column)"] + \
           [f"- fhirsynth loses: {x}" for x in losses] + [f"- {p}" for p in problems]
    return head + "\n".join(f"| {r} |" for r in rows) + "\n\n" + "\n".join(foot) + "\n"


def _worse(ours: dict, theirs: dict, tol: float = 0.01) -> list[str]:
    """Metrics where the baseline is better than fhirsynth by more than tol (Hellinger: lower, detection AUC:
    closer to 0.5, prevalence R²: higher)."""
    def gap(key: str, a: float | None, b: float | None) -> float:
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            return 0.0
        if key == "detection_auc":
            return abs(a - 0.5) - abs(b - 0.5)
        return (a - b) if key == "hellinger" else (b - a)
    return [k for k in ("hellinger", "detection_auc", "condition_prevalence_r2") if gap(k, ours[k], theirs[k]) > tol]


def _cells(m: dict) -> str:
    return " | ".join(_fmt(m[k]) for k in ("hellinger", "detection_auc", "condition_prevalence_r2"))


if __name__ == "__main__":
    sys.exit(main())
