"""Calibration by post-processing (issue 15): calibrated vs uncalibrated vs real-vs-real vs the simplest DP release.

    python benchmarks/bench_calibrate.py --work DIR --train TL_DIR --holdout TL_DIR \
        --models inf=/tmp/bf/model-visit-epsinf-ep10-s1,8:1=/tmp/bf/model-visit-eps8-ep10-s1,... \
        [--n 400] [--pool-factor 5] [--meas-fraction 0.2] [--attach]

Each model is LABEL=MODEL_DIR, LABEL = EPS[:SEED] (EPS "inf" = a --no-dp model). For every model: one pool of
n x pool-factor patients (seed 1, cached in --work), the uncalibrated output (the pool's first n) and the calibrated
one (measurements -> calibrate.calibrate: "reweighted" without the repair step, "calibrated" with it, the default
of generate). Measurements:
  * a model dir holding measurements.json (trained with them): those are used, the epsilon is the model's;
  * --attach: measured here on --train with the model's vocabulary, at meas-fraction x EPS (exact for inf), noise
    from NoiseSource.reproducible(SEED) (replayable: a benchmark, no guarantee). The epsilon of such an output is
    the model's PLUS the measurement's: the models predate the measurements.
Beside them: real vs real (--train against --holdout) and the simplest DP release (benchmarks/dp_independent.py:
each code's patient count, a patient counting at most 256 codes, discrete Gaussian at the full EPS and delta 1e-5,
the data's codes kept only above the set-union threshold, codes drawn independently with those shares; one event per
code on one day, so visits and events per patient are degenerate by design).
All compared with the holdout by fhirsynth/records_metrics.py. Prints a markdown table and writes --json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
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
        "events_median_other", "visits_ks", "visits_median_other", "days_ks", "deceased_share_other", "effective_pool")
BASELINE_MAX_CODES = 256  # >= the most codes any US training patient holds (222): no truncation there


def independent_codes(train: list[Timeline], n: int, eps: float, seed: int) -> list[Timeline]:
    """The simplest DP release (benchmarks/dp_independent.py, the same peer bench_records prints), a patient
    counting at most BASELINE_MAX_CODES codes; at eps = inf the exact shares of every code."""
    import dp_independent

    if not math.isfinite(eps):
        return dp_independent.sample(dp_independent.exact_counts(train), n, seed=seed)
    rel = dp_independent.release_counts(train, eps, 1e-5, max_codes=BASELINE_MAX_CODES, seed=seed)
    return dp_independent.sample(rel, n, seed=seed)


def pool_for(label: str, model: Path, size: int, work: Path) -> list[Timeline]:
    from fhirsynth.model.sampler import sample_timelines

    path = work / f"pool-{label.replace(':', '_')}-{size}.pkl"
    if path.is_file():
        return pickle.loads(path.read_bytes())
    t0 = time.perf_counter()
    pool = list(sample_timelines(model, size, seed=1, device="cpu"))
    log.info("%s: sampled a pool of %d in %.0f s", label, size, time.perf_counter() - t0)
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
    ap.add_argument("--baseline-seeds", default="1,2,3")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    from fhirsynth.model.calibrate import calibrate, summary

    train = list(read_timelines(args.train))
    held = Records(list(read_timelines(args.holdout)))
    cols: dict[str, dict[str, float]] = {"real vs real": compare(held, Records(train))}
    epsilons = sorted({lab.split("=")[0].split(":")[0] for lab in args.models.split(",")})
    for e in epsilons:
        if e == "inf":
            continue
        for s in (int(x) for x in args.baseline_seeds.split(",") if x.strip()):
            cols[f"independent ε={e} s{s}"] = compare(held, Records(independent_codes(train, args.n, float(e), s)))
    for item in args.models.split(","):
        label, _, path = item.partition("=")
        pool = pool_for(label, Path(path), args.n * args.pool_factor, args.work)
        cols[f"{label} uncalibrated"] = compare(held, Records(pool[: args.n]))
        doc = measurements_for(label, Path(path), train, args.meas_fraction, args.attach)
        out, _ = calibrate(pool, doc, args.n, seed=1, repair=False)
        cols[f"{label} reweighted"] = compare(held, Records(out))
        t0 = time.perf_counter()
        out, rep = calibrate(pool, doc, args.n, seed=1)
        log.info("%s: %s (%.1f s)", label, summary(rep), time.perf_counter() - t0)
        cols[f"{label} calibrated"] = compare(held, Records(out))
        cols[f"{label} calibrated"]["effective_pool"] = rep["effective_pool"]
    table = {name: {k: c[k] for k in KEYS if k in c} for name, c in cols.items()}
    print(markdown(table))
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
