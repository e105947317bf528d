"""Calibration by post-processing (issue 15): calibrated vs uncalibrated vs real-vs-real vs the simplest DP release.

    python benchmarks/bench_calibrate.py --work DIR --train TL_DIR --holdout TL_DIR \
        --models inf=/tmp/bf/model-visit-epsinf-ep10-s1,8:1=/tmp/bf/model-visit-eps8-ep10-s1,... \
        [--n 400] [--pool-factor 5] [--meas-fraction 0.2] [--attach] [--no-record-start]

Each model is LABEL=MODEL_DIR, LABEL = EPS[:SEED] (EPS "inf" = a --no-dp model). For every model: one pool of
n x pool-factor patients (seed 1, cached in --work), the uncalibrated output (the pool's first n) and the calibrated
one (measurements -> calibrate.calibrate: "reweighted" without the repair step, "calibrated" with it, the default
of generate). Pools are sampled as `generate` samples them (each record goes back to a first-visit age drawn from
the model's measurements); --no-record-start: every visit model is sampled a second time as `generate
--no-record-start` samples it, columns "LABEL no-record-start ...".
Measurements:
  * a model dir holding measurements.json (trained with them): those are used, the epsilon is the model's;
  * --attach: measured here on --train with the model's vocabulary, at meas-fraction x EPS (exact for inf), noise
    from NoiseSource.reproducible(SEED) (replayable: a benchmark, no guarantee). The epsilon of such an output is
    the model's PLUS the measurement's: the models predate the measurements.
Beside them: real vs real (--train against --holdout) and the simplest DP release (benchmarks/dp_independent.py:
each code's patient count, a patient counting at most 256 codes, discrete Gaussian at the full EPS and delta 1e-5,
the data's codes kept only above the set-union threshold, codes drawn independently with those shares; one event per
code on one day, so visits and events per patient are degenerate by design).
Optional peers (--baseline mst[,aim]): smartnoise-synth MST / AIM (benchmarks/dp_smartnoise.py) fitted at every
finite EPS of --models on a per-patient table of --train (one 0/1 column per condition / observation code held by
>= 1% of the training patients, the --baseline-max-codes most common, plus sex and the 10-year age band at the last
event), delta smartnoise's default (1e-9), one fit per --baseline-seeds seed; --n rows sampled and turned into
timelines (one event per held code, on one day). They need their own venv (smartnoise-synth pins opacus<0.15 and
pandas<2.4), made outside the repo with

    python3 -m venv /work/sn-venv && /work/sn-venv/bin/pip install smartnoise-synth

and passed as --baseline-python /work/sn-venv/bin/python (or FHIRSYNTH_BASELINE_PYTHON). The code choice is read
from the training data without noise (not privacy-accounted: it favours the baseline); the output says so.
All compared with the holdout by fhirsynth/records_metrics.py. Prints a markdown table and writes --json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from fhirsynth.records_metrics import Records, compare, markdown  # noqa: E402
from fhirsynth.timeline.io import read_timelines  # noqa: E402
from fhirsynth.timeline.types import Timeline  # noqa: E402

log = logging.getLogger("bench_calibrate")
KEYS = ("prevalence_r2", "patient_cooc_r2", "within_visit_cooc_r2", "transition_r2", "events_ks",
        "events_median_other", "visits_ks", "visits_median_other", "days_ks", "deceased_share_other",
        "value_kind_mismatch", "value_withheld", "first_visit_age_ks", "birth_week_visits_other", "effective_pool")
BASELINE_MAX_CODES = 256  # >= the most codes any US training patient holds (222): no truncation there
# MST's time grows about with the square of its columns (every pair is scored): one fit on the US split took 47 s
# with 30 codes and 221 s with 60 (one niced core, shared machine), so 120 would take ~15 min a fit.
SMARTNOISE_MAX_CODES = 60


def independent_codes(train: list[Timeline], n: int, eps: float, seed: int) -> list[Timeline]:
    """The simplest DP release (benchmarks/dp_independent.py, the same peer bench_records prints), a patient
    counting at most BASELINE_MAX_CODES codes; at eps = inf the exact shares of every code."""
    import dp_independent

    if not math.isfinite(eps):
        return dp_independent.sample(dp_independent.exact_counts(train), n, seed=seed)
    rel = dp_independent.release_counts(train, eps, 1e-5, max_codes=BASELINE_MAX_CODES, seed=seed)
    return dp_independent.sample(rel, n, seed=seed)


def smartnoise_codes(method: str, python: str, train: list[Timeline], n: int, eps: float, seed: int,
                     max_codes: int, work: Path) -> tuple[list[Timeline], float, int]:
    """smartnoise-synth `method` fitted on the per-patient code table of train at eps (dp_smartnoise.py), n rows
    sampled back to timelines; returns (timelines, fit seconds, columns). Cached in work per seed."""
    import dp_smartnoise as dps

    codes = dps.choose_codes(train, max_codes=max_codes)
    table = dps.code_table(train, codes)
    syn, fit_s = dps.run_baseline(method, python, table, eps, n, work, seed=seed, prefix=f"records-s{seed}")
    return dps.table_timelines(syn, codes, prefix=f"{method}-s{seed}"), fit_s, table.shape[1]


def pool_for(label: str, model: Path, size: int, work: Path, record_start: bool = False) -> list[Timeline]:
    from fhirsynth.model.sampler import sample_timelines

    path = work / f"pool-{label.replace(':', '_')}-{size}{'-rs' if record_start else ''}.pkl"
    if path.is_file():
        return pickle.loads(path.read_bytes())
    t0 = time.perf_counter()
    pool = list(sample_timelines(model, size, seed=1, device="cpu", record_start=record_start))
    log.info("%s: sampled a pool of %d in %.0f s (record start %s)", label, size, time.perf_counter() - t0,
             record_start)
    path.write_bytes(pickle.dumps(pool))
    return pool


def measurements_for(label: str, model: Path, train: list[Timeline], frac: float, attach: bool) -> dict:
    from fhirsynth.model import measurements as ms
    from fhirsynth.model.checkpoint import load_model
    from fhirsynth.model.dpnoise import NoiseSource

    if not attach:
        doc = ms.load(model)
        if doc is None:
            raise SystemExit(f"{model} has no measurements: retrain, or pass --attach")
        return doc
    eps_s, _, seed_s = label.partition(":")
    eps = float(eps_s)
    dp = math.isfinite(eps)
    vocab = load_model(model, "cpu").vocab
    doc, rep = ms.measure(train, vocab, dp=dp, epsilon=frac * eps if dp else None, delta=1e-6 if dp else None,
                          noise=NoiseSource.reproducible(int(seed_s or 1)))
    if dp:
        log.info("%s: measurements at epsilon %.3g (check %.4f), sigmas %s", label, frac * eps, rep["epsilon_check"],
                 {f: round(v["sigma"], 1) for f, v in rep["families"].items()})
    return doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--train", required=True, type=Path)
    ap.add_argument("--holdout", required=True, type=Path)
    ap.add_argument("--models", required=True)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--pool-factor", type=int, default=5)
    ap.add_argument("--meas-fraction", type=float, default=0.2)
    ap.add_argument("--attach", action="store_true")
    ap.add_argument("--no-record-start", action="store_true", help="also sample every model without a record start")
    ap.add_argument("--baseline-seeds", default="1,2,3")
    ap.add_argument("--baseline", default="none", help="comma list of smartnoise-synth methods (mst, aim) or none")
    ap.add_argument("--baseline-python", default=os.environ.get("FHIRSYNTH_BASELINE_PYTHON", ""),
                    help="python of a venv with smartnoise-synth installed")
    ap.add_argument("--baseline-max-codes", type=int, default=SMARTNOISE_MAX_CODES)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    methods = [m.strip().lower() for m in args.baseline.split(",") if m.strip() and m.strip().lower() != "none"]
    if bad := [m for m in methods if m not in ("mst", "aim")]:
        ap.error(f"--baseline: unknown method(s) {', '.join(bad)}; use mst, aim or none")
    if methods and not args.baseline_python:
        ap.error("--baseline needs --baseline-python (a venv with smartnoise-synth; see the docstring)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    from fhirsynth.model.calibrate import calibrate, summary

    train = list(read_timelines(args.train))
    held = Records(list(read_timelines(args.holdout)))
    cols: dict[str, dict[str, float]] = {"real vs real": compare(held, Records(train))}
    epsilons = sorted({lab.split("=")[0].split(":")[0] for lab in args.models.split(",")})
    notes: list[str] = []
    fits: dict[str, list[float]] = {}
    for e in epsilons:
        if e == "inf":
            continue
        for s in (int(x) for x in args.baseline_seeds.split(",") if x.strip()):
            cols[f"independent ε={e} s{s}"] = compare(held, Records(independent_codes(train, args.n, float(e), s)))
        for method in methods:
            for s in (int(x) for x in args.baseline_seeds.split(",") if x.strip()):
                name = f"{method.upper()} ε={e} s{s}"
                try:
                    syn, fit_s, n_cols = smartnoise_codes(method, args.baseline_python, train, args.n, float(e), s,
                                                          args.baseline_max_codes, args.work)
                except Exception as exc:  # noqa: BLE001 - a failed peer is reported under the table, not fatal
                    log.exception("%s failed", name)
                    notes.append(f"{name}: failed ({type(exc).__name__}: {exc})")
                    continue
                log.info("%s: fit %.0f s on %d columns", name, fit_s, n_cols)
                fits.setdefault(method, []).append(fit_s)
                cols[name] = compare(held, Records(syn))
    for item in args.models.split(","):
        label, _, path = item.partition("=")
        doc = measurements_for(label, Path(path), train, args.meas_fraction, args.attach)
        for record_start in (True, False) if args.no_record_start else (True,):
            name = label if record_start else f"{label} no-record-start"
            pool = pool_for(label, Path(path), args.n * args.pool_factor, args.work, record_start)
            cols[f"{name} uncalibrated"] = compare(held, Records(pool[: args.n]))
            out, _ = calibrate(pool, doc, args.n, seed=1, repair=False)
            cols[f"{name} reweighted"] = compare(held, Records(out))
            t0 = time.perf_counter()
            out, rep = calibrate(pool, doc, args.n, seed=1)
            log.info("%s: %s (%.1f s)", name, summary(rep), time.perf_counter() - t0)
            cols[f"{name} calibrated"] = compare(held, Records(out))
            cols[f"{name} calibrated"]["effective_pool"] = rep["effective_pool"]
    table = {name: {k: c[k] for k in KEYS if k in c} for name, c in cols.items()}
    if methods:
        import dp_smartnoise

        n_common = len(dp_smartnoise.choose_codes(train, max_codes=sys.maxsize))
        notes = [f"{m.upper()} (smartnoise-synth, delta 1e-9, its default): fitted on a per-patient table of the "
                 f"--baseline-max-codes={args.baseline_max_codes} most common condition / observation codes held "
                 f"by >= 1% of training patients (of {n_common} such codes; 0/1 each) plus sex and 10-year age "
                 f"band at the last event; fit {min(f):.0f}-{max(f):.0f} s" for m, f in fits.items()] + [
            "this code choice is read from the training data without noise and NOT privacy-accounted (this "
            "favours the baselines); codes outside it are absent from their output (prevalence 0 in prevalence_r2 and "
            "patient_cooc_r2)",
            "what MST / AIM and the independent release model is per-code prevalence and patient-level "
            "co-occurrence; their visits, days, events per patient, within-visit and transition metrics are "
            "degenerate by design (every code once, all on one day)"] + notes
    print(markdown(table))
    for note in notes:
        print(f"- {note}")
    if args.json:
        args.json.write_text(json.dumps({**table, "notes": notes} if notes else table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
