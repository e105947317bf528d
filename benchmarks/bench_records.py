"""Whole records (issue 14): the visit model and the token model against the holdout, beside the ceilings.

    python benchmarks/bench_records.py --work DIR [--data ../shared/data/us/ndjson] [--holdout 200]
        [--runs visit:inf:1,visit:8:1,visit:8:2,token:inf:1] [--epochs 10] [--n-synthetic 400]

Steps (each cached in --work): ingest the cohort and split it by patient (bench_fidelity.split, seed 7: the
shared US 800/200 split), train one model per run ARCH:EPSILON:SEED (inf = --no-dp), sample n synthetic
patients, and compare each with the holdout using records_metrics.compare. Columns printed beside them:
  * real vs real: the training patients against the holdout (the ceiling of any generator on this split);
  * encode/decode: the holdout through the visit representation and back (what the representation keeps);
  * the sampling speed of each model (patients/s, this machine, one process).
Prints one markdown table for BENCHMARKS.md and writes the same columns as JSON (--json, default the package's
fhirsynth/data/benchmark-records.json, which `fhirsynth demo` reads to put its own small-cohort numbers beside
these).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_fidelity import DEFAULT_DATA, prepare_split, round_trip  # noqa: E402
from fhirsynth.demo.benchmark import RESULTS_FILE  # noqa: E402
from fhirsynth.records_metrics import Records, compare, markdown  # noqa: E402
from fhirsynth.timeline.io import read_timelines  # noqa: E402

log = logging.getLogger("bench_records")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--holdout", type=int, default=200)
    ap.add_argument("--runs", default="visit:inf:1,visit:8:1,visit:8:2")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--n-synthetic", type=int, default=400)
    ap.add_argument("--no-ceiling", action="store_true", help="skip the encode/decode column")
    ap.add_argument("--json", type=Path, default=RESULTS_FILE, help="where to write the columns as JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from fhirsynth.model.config import ModelConfig
    from fhirsynth.model.sampler import sample_timelines
    from fhirsynth.model.train import train_model

    train, holdout = prepare_split(work, args.data, args.holdout)
    held = Records(list(read_timelines(holdout)))
    n_train = sum(1 for _ in read_timelines(train))
    columns: dict[str, dict[str, float]] = {"real vs real": compare(held, Records(list(read_timelines(train))))}
    runs: list[dict] = []
    first_visit_model = None
    for run in args.runs.split(","):
        arch, eps_s, seed_s = run.split(":")
        eps, seed = float(eps_s), int(seed_s)
        model = work / f"model-{arch}-eps{eps_s}-ep{args.epochs}-s{seed}"
        if not (model / "privacy.json").is_file():
            t = time.perf_counter()
            train_model(train, model, epsilon=eps if math.isfinite(eps) else 8.0, dp=math.isfinite(eps),
                        epochs=args.epochs, seed=seed, model_config=ModelConfig(arch=arch))
            log.info("%s trained in %.0f s", model.name, time.perf_counter() - t)
        if arch == "visit" and first_visit_model is None:
            first_visit_model = model
        t = time.perf_counter()
        synth = list(sample_timelines(model, args.n_synthetic, seed=seed, device="cpu"))
        rate = len(synth) / (time.perf_counter() - t)
        col = compare(held, Records(synth))
        col["sampling patients/s (1 process)"] = rate
        columns[f"{arch} ε={eps_s} s{seed}"] = col
        runs.append({"column": f"{arch} ε={eps_s} s{seed}", "arch": arch, "epsilon": eps_s, "seed": seed,
                     "dp": math.isfinite(eps)})
        log.info("%s:\n%s", model.name, markdown({"real vs real": columns["real vs real"], model.name: col}))
    if first_visit_model is not None and not args.no_ceiling:
        columns["encode/decode"] = compare(held, Records(visit_round_trip(first_visit_model,
                                                                          list(read_timelines(holdout)))))
    print(markdown(columns))
    write_results(args, columns, runs, n_train=n_train, n_holdout=held.n)
    return 0


def visit_round_trip(model: Path, timelines: list) -> list:
    """The timelines through the visit encoding and the shared decoder, every time placed with all the
    representation holds (visits.visit_time_draws: gap bucket AND age year of each visit, birth inside its band
    and its age at the reference date): what the visit representation keeps."""
    from fhirsynth.model.checkpoint import load_model
    from fhirsynth.model.tokenizer import Tokenizer
    from fhirsynth.model.visits import VisitLayout, decode_encoded, encode_visits

    lm = load_model(model, "cpu")
    if lm.model_config.arch != "visit":
        return round_trip(model, timelines)
    tok, layout = Tokenizer(lm.vocab), VisitLayout(lm.vocab)
    patients = [p for p in (encode_visits(tok, layout, tl, lm.model_config.max_visits) for tl in timelines) if p]
    return decode_encoded(tok, layout, patients)


def write_results(args: argparse.Namespace, columns: dict[str, dict[str, float]], runs: list[dict], *,
                  n_train: int, n_holdout: int) -> None:
    """The table as data, so that what the demo quotes is what this script measured (NaN -> null)."""
    def clean(v: float) -> float | None:
        return v if math.isfinite(v) else None

    doc = {
        "benchmark": "benchmarks/bench_records.py",
        "command": " ".join(sys.argv[1:]),
        "measured": datetime.date.today().isoformat(),
        "n_train": n_train,
        "n_holdout": n_holdout,
        "epochs": args.epochs,
        "n_synthetic": args.n_synthetic,
        "runs": runs,
        "columns": {name: {k: clean(float(v)) for k, v in col.items()} for name, col in columns.items()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    log.info("wrote %s", args.json)


if __name__ == "__main__":
    raise SystemExit(main())
