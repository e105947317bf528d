"""Whole records (issue 14): the visit model and the token model against the holdout, beside the ceilings.

    python benchmarks/bench_records.py --work DIR [--cohort us|es-ips] [--data DIR] [--holdout N]
        [--runs visit:inf:1,visit:8:1,visit:8:2,token:inf:1,visit:8:1:batch=256:epochs=30] [--epochs E]
        [--n-synthetic 400] [--no-record-start]

Steps (each cached in --work): ingest the cohort and split it by patient (bench_fidelity.split, seed 7: the
shared US 800/200 split; --cohort es-ips: the shared Spanish IPS cohort's NDJSON with the "ips" mapping, 120/30),
train one model per run ARCH:EPSILON:SEED (inf = --no-dp; optional :batch=B, :epochs=E, :lr=L override train's
defaults for that run, :width=D and :layers=L the network's d_model (feed-forward 4D) and depth: a DP-regime sweep
in one run, e.g. visit:8:1:batch=800:epochs=40; :init=MODEL_DIR starts
from a public prior, `train --init`; :entry=W train's --entry-weight, whose default is 0.2 with DP), sample n synthetic patients, and compare each with
the holdout using records_metrics.compare. Columns printed beside them:
  * real vs real: the training patients against the holdout (the ceiling of any generator on this split);
  * encode/decode: the holdout through the visit representation and back (what the representation keeps);
  * independent codes ε=E: for every DP run's epsilon, the simplest DP peer (dp_independent.py: per-code patient
    counts released once with the Gaussian mechanism, codes drawn independently per patient); only prevalence
    and patient co-occurrence are reported for it (it has no visits, times or values);
  * the sampling speed of each model (patients/s, this machine, one process);
  * with --record-start, each visit model sampled again as `generate --record-start` samples it.
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

from bench_fidelity import DEFAULT_DATA, prepare_split, round_trip, split  # noqa: E402
from fhirsynth.demo.benchmark import RESULTS_FILE  # noqa: E402
from fhirsynth.records_metrics import Records, compare, markdown  # noqa: E402
from fhirsynth.timeline.io import read_timelines  # noqa: E402

log = logging.getLogger("bench_records")
# --cohort: (default data, ingest mapping, default holdout size)
COHORTS = {"us": (DEFAULT_DATA, "us-core", 200),
           "es-ips": (REPO.parent / "shared" / "data" / "es-ips" / "ndjson", "ips", 30)}
INDEPENDENT_KEYS = ("n_real", "n_other", "prevalence_r2", "prevalence_codes", "patient_cooc_r2")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--cohort", choices=sorted(COHORTS), default="us",
                    help="the shared cohort (default data dir, mapping and holdout size)")
    ap.add_argument("--data", default=None, help="NDJSON / bundle dir (default: the cohort's shared data)")
    ap.add_argument("--holdout", type=int, default=None, help="holdout patients (default: 200 us, 30 es-ips)")
    ap.add_argument("--runs", default="visit:inf:1,visit:8:1,visit:8:2")
    ap.add_argument("--epochs", type=int, default=None, help="default: train's (10, more under DP for a small cohort)")
    ap.add_argument("--n-synthetic", type=int, default=400)
    ap.add_argument("--no-ceiling", action="store_true", help="skip the encode/decode column")
    ap.add_argument("--no-record-start", action="store_true",
                    help="also sample each visit model as `generate --no-record-start` does (a column beside it)")
    ap.add_argument("--json", type=Path, default=RESULTS_FILE, help="where to write the columns as JSON")
    args = ap.parse_args()
    default_data, mapping, default_holdout = COHORTS[args.cohort]
    args.data = args.data or str(default_data)
    args.holdout = args.holdout if args.holdout is not None else default_holdout
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from fhirsynth.model.sampler import sample_timelines
    from fhirsynth.model.train import train_model

    if not (work / "timelines" / "events.parquet").is_file() and not Path(args.data).exists():
        ap.error(f"--data {args.data}: no such file or directory")
    train, holdout = split_cohort(work, args.data, mapping, args.holdout)
    held = Records(list(read_timelines(holdout)))
    n_train = sum(1 for _ in read_timelines(train))
    columns: dict[str, dict[str, float]] = {"real vs real": compare(held, Records(list(read_timelines(train))))}
    runs: list[dict] = []
    first_visit_model = None
    for run in args.runs.split(","):
        arch, eps_s, seed_s, settings, tag = parse_run(run, ap)
        eps, seed = float(eps_s), int(seed_s)
        epochs = int(settings["epochs"]) if "epochs" in settings else args.epochs  # None: train's default
        model = work / f"model-{arch}-eps{eps_s}-ep{epochs or 'auto'}-s{seed}{tag}"
        if not (model / "privacy.json").is_file():
            t = time.perf_counter()
            train_model(train, model, epsilon=eps if math.isfinite(eps) else 8.0, dp=math.isfinite(eps),
                        epochs=epochs, seed=seed,
                        model_config=run_model_config(arch, settings),
                        batch_size=int(settings.get("batch", 64)),
                        lr=float(settings["lr"]) if "lr" in settings else None, init=settings.get("init"),
                        entry_weight=float(settings["entry"]) if "entry" in settings else None)
            log.info("%s trained in %.0f s", model.name, time.perf_counter() - t)
        privacy = json.loads((model / "privacy.json").read_text())
        log.info("%s: %s", model.name, {k: privacy.get(k) for k in ("epsilon_total", "noise_multiplier", "steps")})
        if arch == "visit" and first_visit_model is None:
            first_visit_model = model
        t = time.perf_counter()
        synth = list(sample_timelines(model, args.n_synthetic, seed=seed, device="cpu"))
        rate = len(synth) / (time.perf_counter() - t)
        col = compare(held, Records(synth))
        col["sampling patients/s (1 process)"] = rate
        name = f"{arch} ε={eps_s} s{seed}{tag}" + (f"-epochs{settings['epochs']}" if "epochs" in settings else "")
        columns[name] = col
        trained = json.loads((model / "config.json").read_text())["training"]
        # the epochs and entry weight trained (train's defaults resolved when the run does not set them)
        runs.append({"column": name, "arch": arch, "epsilon": eps_s, "seed": seed, "dp": math.isfinite(eps),
                     **settings, "epochs": privacy.get("epochs"), "entry_weight": trained.get("entry_weight")})
        log.info("%s:\n%s", model.name, markdown({"real vs real": columns["real vs real"], model.name: col}))
        if args.no_record_start and arch == "visit":
            synth = list(sample_timelines(model, args.n_synthetic, seed=seed, device="cpu", record_start=False))
            columns[f"{name} --no-record-start"] = compare(held, Records(synth))
    for eps_s in sorted({r["epsilon"] for r in runs if r["dp"]}, key=float):
        columns[f"independent codes ε={eps_s}"] = independent_column(train, held, float(eps_s), args.n_synthetic)
    if first_visit_model is not None and not args.no_ceiling:
        columns["encode/decode"] = compare(held, Records(visit_round_trip(first_visit_model,
                                                                          list(read_timelines(holdout)))))
    print(markdown(columns))
    write_results(args, columns, runs, n_train=n_train, n_holdout=held.n)
    return 0


RUN_SETTINGS = ("batch", "epochs", "lr", "init", "width", "layers", "entry")


def run_model_config(arch: str, settings: dict[str, str]):
    """The network of one run: the defaults, width=D (d_model D, feed-forward 4D) and layers=L; None with init=
    (the prior's sizes, which train refuses to change)."""
    from fhirsynth.model.config import ModelConfig

    if "init" in settings:
        return None
    mc = ModelConfig(arch=arch)
    if "width" in settings:
        mc.d_model = int(settings["width"])
        mc.d_ff = 4 * mc.d_model
    if "layers" in settings:
        mc.n_layers = int(settings["layers"])
    return mc


def parse_run(run: str, ap: argparse.ArgumentParser) -> tuple[str, str, str, dict[str, str], str]:
    """ARCH:EPS:SEED[:key=value...] -> (arch, eps, seed, settings, a tag for names such as "-batch256")."""
    parts = run.split(":")
    if len(parts) < 3:
        ap.error(f"--runs {run}: expected ARCH:EPSILON:SEED[:key=value...]")
    arch, eps_s, seed_s, *rest = parts
    settings: dict[str, str] = {}
    for part in rest:
        key, _, value = part.partition("=")
        if key not in RUN_SETTINGS or not value:
            ap.error(f"--runs {run}: {part!r} is not one of {', '.join(k + '=VALUE' for k in RUN_SETTINGS)}")
        settings[key] = value
    try:
        float(eps_s), int(seed_s), *(float(v) for k, v in settings.items() if k != "init")
    except ValueError:
        ap.error(f"--runs {run}: expected ARCH:EPSILON:SEED[:key=value...] with numbers")
    tag = "".join("-prior" if k == "init" else f"-{k}{v}" for k, v in settings.items() if k != "epochs")
    return arch, eps_s, seed_s, settings, tag


def split_cohort(work: Path, data: str, mapping: str, n_holdout: int) -> tuple[Path, Path]:
    """work/train and work/holdout (bench_fidelity.split, seed 7); the US cohort exactly as bench_fidelity."""
    if mapping == "us-core":
        return prepare_split(work, data, n_holdout)
    from fhirsynth.timeline.adapter import ingest

    src = work / "timelines"
    if not (src / "events.parquet").is_file():
        ingest([data], src, mapping=mapping)
    split(src, work / "train", work / "holdout", n_holdout, seed=7)
    return work / "train", work / "holdout"


def independent_column(train: Path, held: Records, eps: float, n: int, delta: float = 1e-5) -> dict[str, float]:
    """The independent-codes DP peer at eps (secret noise), compared on what it can be compared on."""
    import dp_independent

    rel = dp_independent.release_counts(list(read_timelines(train)), eps, delta)
    log.info("independent codes ε=%g: %d of %d codes released (sigma %.1f, threshold %.1f, OpenDP ε %.3f)",
             eps, len(rel.keys), rel.n_candidates, rel.sigma, rel.threshold, rel.epsilon)
    col = compare(held, Records(dp_independent.sample(rel, n, seed=1)))
    return {k: col[k] for k in INDEPENDENT_KEYS if k in col}


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
        "epochs": runs[0]["epochs"] if runs else args.epochs,  # the demo quotes it: the first run's
        "n_synthetic": args.n_synthetic,
        "runs": runs,
        "columns": {name: {k: clean(float(v)) for k, v in col.items()} for name, col in columns.items()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    log.info("wrote %s", args.json)


if __name__ == "__main__":
    raise SystemExit(main())
