"""Measurement designs compared on a fixed pool (issue 15): re-measure a trained model's calibration statistics
with THIS checkout's measurements.py, at the model's own measurement (epsilon, delta) from privacy.json, then
calibrate (and repair) a cached pool of that model's samples and compare with the holdout.

    python benchmarks/bench_remeasure.py --model MODEL_DIR --pool POOL.pkl --train TL_DIR --holdout TL_DIR \
        [--n 400] [--noise-seeds 1,2]

POOL.pkl is a pool bench_calibrate.py cached (--work). The noise is NoiseSource.reproducible(seed): replayable, a
benchmark only (no guarantee). Run it from two checkouts (or worktrees) with the same arguments to compare two
measurement designs on the same model and pool, the noise draw being the only other difference; the eleventh
session compared the top-code families this way (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fhirsynth.model import measurements as ms  # noqa: E402
from fhirsynth.model.calibrate import calibrate  # noqa: E402
from fhirsynth.model.checkpoint import load_model  # noqa: E402
from fhirsynth.model.dpnoise import NoiseSource  # noqa: E402
from fhirsynth.records_metrics import Records, compare  # noqa: E402
from fhirsynth.timeline.io import read_timelines  # noqa: E402

log = logging.getLogger("bench_remeasure")
KEYS = ("prevalence_r2", "patient_cooc_r2", "within_visit_cooc_r2", "transition_r2", "events_ks", "visits_ks",
        "days_ks")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--pool", required=True, type=Path)
    ap.add_argument("--train", required=True, type=Path)
    ap.add_argument("--holdout", required=True, type=Path)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--noise-seeds", default="1,2")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    train = list(read_timelines(args.train))
    held = Records(list(read_timelines(args.holdout)))
    pool = pickle.loads(args.pool.read_bytes())  # written by bench_calibrate.py: our own cache
    privacy = json.loads((args.model / "privacy.json").read_text())
    if not privacy.get("dp"):
        raise SystemExit("the model has no DP measurements to re-measure at (trained with --no-dp)")
    vocab = load_model(args.model, "cpu").vocab
    rows = []
    for seed in (int(s) for s in args.noise_seeds.split(",")):
        doc, _ = ms.measure(train, vocab, dp=True, epsilon=privacy["epsilon_measurements"],
                            delta=privacy["delta_measurements"], noise=NoiseSource.reproducible(seed))
        out, _ = calibrate(pool, doc, args.n, seed=1)
        c = compare(held, Records(out))
        rows.append((seed, c))
        log.info("noise seed %d: %s", seed, {k: round(c[k], 3) for k in KEYS})
    print("| noise seed | " + " | ".join(KEYS) + " |")
    print("|---|" + "---|" * len(KEYS))
    for seed, c in rows:
        print(f"| {seed} | " + " | ".join(f"{c[k]:.3f}" for k in KEYS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
