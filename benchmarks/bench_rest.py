"""The rest of the patient (issue 18): medications, immunizations, procedures and allergies, synthetic vs holdout.

    python benchmarks/bench_rest.py --work DIR [--data ../shared/data/us-full/ndjson] [--holdout 100]
        [--epochs 10] [--n-synthetic 200] [--epsilon inf] [--seed 1] [--pool-factor 5] [--draws 2]
        [--batch-size N] [--no-record-start]

Steps (each cached in --work): ingest the cohort (us-core mapping) and split it by patient (demo.split, seed 7:
the shared us-full cohort gives 400 / 100), train one visit model (--epsilon inf = no DP), sample
a pool of --pool-factor x --n-synthetic patients, and compare with the holdout, using records_metrics.rest_compare,
the pool's first --n-synthetic patients as sampled, --draws reweighted draws without repair, and the same draws as
`generate` makes them by default (calibrated to the model's measurements, exact at ε = ∞, and repaired); the
whole-record metrics of records_metrics.compare go beside them:
  <kind>_prevalence_r2            per-code patient prevalence over the holdout's codes held by >= 1% (goal 0.95);
  condition_medication_cooc_r2    share of patients with both, the holdout's 20 most common conditions x 20 most
                                  common medications (goal 0.85);
  vaccine_age_band_max_diff_points  largest |share difference| of immunizations over the age bands, in
                                  percentage points (goal <= 5).
Beside it the ceiling: the training patients against the holdout (real vs real). Prints a markdown table and
writes the columns as JSON to WORK/bench-rest-<the model dir's settings>[-record-start].json (the pool sampled as
`generate` samples it, with a record start; --no-record-start: without, and no suffix).
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

from fhirsynth.records_metrics import Records, compare, markdown, rest_compare  # noqa: E402
from fhirsynth.timeline.io import read_timelines  # noqa: E402

log = logging.getLogger("bench_rest")
DEFAULT_DATA = REPO.parent / "shared" / "data" / "us-full" / "ndjson"


def prepare(work: Path, data: str, n_holdout: int) -> tuple[Path, Path]:
    """Ingest once into WORK/timelines, split into WORK/train and WORK/holdout (seed 7)."""
    from fhirsynth.demo.split import split_holdout
    from fhirsynth.timeline.adapter import ingest

    src = work / "timelines"
    if not (src / "events.parquet").is_file():
        report = ingest([data], src, mapping="us-core")
        log.info("ingest: %s", {k: (v["read"], v["used"]) for k, v in report["resource_types"].items()})
    train, holdout = work / "train", work / "holdout"
    if not (holdout / "events.parquet").is_file():
        n = sum(1 for _ in read_timelines(src))
        n_train, n_hold = split_holdout(src, train, holdout, n_holdout / n, seed=7)
        log.info("split: %d train / %d holdout", n_train, n_hold)
    return train, holdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--holdout", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--n-synthetic", type=int, default=200)
    ap.add_argument("--epsilon", default="inf", help="inf = no DP")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--pool-factor", type=int, default=5, help="as generate's --pool-factor")
    ap.add_argument("--draws", type=int, default=2, help="calibrated draws from the one pool (seeds --seed, ...)")
    ap.add_argument("--batch-size", type=int, default=None, help="train's --batch-size (default: train's own)")
    ap.add_argument("--no-record-start", action="store_true",
                    help="sample the pool as `generate --no-record-start` does")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from fhirsynth.model.calibrate import calibrate, summary
    from fhirsynth.model.config import ModelConfig
    from fhirsynth.model.measurements import load as load_measurements
    from fhirsynth.model.sampler import sample_timelines
    from fhirsynth.model.train import train_model

    train, holdout = prepare(work, args.data, args.holdout)
    held = Records(list(read_timelines(holdout)))

    def both(other: Records) -> dict[str, float]:
        """The new kinds' metrics and the whole-record ones (records_metrics.compare)."""
        return {**rest_compare(held, other), **compare(held, other)}

    columns = {"real vs real (train vs holdout)": both(Records(list(read_timelines(train))))}
    eps = float(args.epsilon)
    model = work / (f"model-visit-eps{args.epsilon}-ep{args.epochs}-s{args.seed}"
                    + (f"-b{args.batch_size}" if args.batch_size else ""))
    if not (model / "privacy.json").is_file():
        t = time.perf_counter()
        train_model(train, model, epsilon=eps if math.isfinite(eps) else 8.0, dp=math.isfinite(eps),
                    epochs=args.epochs, seed=args.seed, model_config=ModelConfig(arch="visit"),
                    **({"batch_size": args.batch_size} if args.batch_size else {}))
        log.info("%s trained in %.0f s", model.name, time.perf_counter() - t)
    record_start = not args.no_record_start
    tag = "-record-start" if record_start else ""
    pool_path = model / f"pool-{args.n_synthetic * args.pool_factor}-s{args.seed}{tag}.pkl"
    if pool_path.is_file():
        pool = pickle.loads(pool_path.read_bytes())
    else:
        t = time.perf_counter()
        pool = list(sample_timelines(model, args.n_synthetic * args.pool_factor, seed=args.seed, device="cpu",
                                     record_start=record_start))
        log.info("sampled a pool of %d patients in %.0f s", len(pool), time.perf_counter() - t)
        pool_path.write_bytes(pickle.dumps(pool))
    name = (f"visit ε={args.epsilon} {args.epochs} epochs" + (f" batch {args.batch_size}" if args.batch_size else "")
            + ("" if record_start else ", --no-record-start"))
    columns[f"{name}, as sampled"] = both(Records(pool[: args.n_synthetic]))
    measured = load_measurements(model)
    if measured is None:
        log.warning("%s holds no measurements: no calibrated column", model)
    else:
        for s in range(args.seed, args.seed + args.draws):  # calibration's own draw varies too
            out, _ = calibrate(pool, measured, args.n_synthetic, seed=s, repair=False)
            columns[f"{name}, reweighted only, draw {s}"] = rest_compare(held, Records(out))
            out, report = calibrate(pool, measured, args.n_synthetic, seed=s)
            log.info("%s", summary(report))
            columns[f"{name}, calibrated (generate's default), draw {s}"] = both(Records(out))
    print(markdown(columns))
    doc = {"benchmark": "benchmarks/bench_rest.py", "command": " ".join(sys.argv[1:]), "n_holdout": held.n,
           "columns": {name: {k: (v if math.isfinite(v) else None) for k, v in col.items()}
                       for name, col in columns.items()}}
    out_json = work / f"bench-rest{model.name.removeprefix('model-visit')}{tag}.json"
    out_json.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
