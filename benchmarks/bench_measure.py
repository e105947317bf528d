"""What the calibration measurements alone can say (issue 15): the ceiling that DP measurement noise puts on
calibrated prevalence and patient-level co-occurrence, for a budget split, without any model.

    python benchmarks/bench_measure.py --work DIR [--cohort us|es-ips] [--epsilon 8] [--draws 5]
        [--cohort us|es-ips|us-full] [--configs meas=0.2,meas=0.3:max_codes=64] [--json OUT.json]

Calibration reweights a pool of the model's samples toward the noisy measurements, and repair moves each code's
share the rest of the way to its measured target (calibrate.py, repair.py). However good the model, the calibrated
prevalence is then at best the measured targets themselves. For each configuration this script repeats what
`train` releases before training (the sex marginal, the DP vocabulary, the measurements, at train's own budget
split: train.release_vocabulary, then measurements.measure) on the training patients of the benchmark split, --draws times with fresh noise, and
compares with the holdout using records_metrics' definitions:
  prevalence_r2       repair's per-code targets (repair.code_targets: prevalence and top_prevalence combined)
                      against the holdout's prevalence, codes held by >= 1% of the holdout (a code outside the
                      vocabulary counts 0, as no generator trained on that vocabulary can write it);
  prevalence_r2_train the same targets against the training patients' exact shares (the noise alone);
  all_kinds_prevalence_r2  as prevalence_r2 over every measured kind (medications, immunizations, procedures and
                      allergies too: the us-full cohort has them);
  patient_cooc_r2     the pair shares the measurements imply, P(a and b) = P(a) + P(b) - 1 + P(neither), from the
                      top codes' targets and pairs_absent, over records_metrics' pairs (the holdout's 40 most
                      common codes held by 5-95%) that the measured pair codes cover; patient_cooc_pairs counts
                      them (of 780).
Beside them: the exact measurements (no noise: the bounded-contribution and vocabulary effects alone), real vs
real, and the independent-codes release at the full epsilon (dp_independent.py), whose prevalence is the simplest
DP release's. Configuration keys: meas (train's --measure-epsilon-fraction), vocab (--vocab-epsilon-fraction),
max_codes and max_absent (measurements.measure's bounds). The noise is NoiseSource.reproducible(draw): replayable,
a benchmark only.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_fidelity import DEFAULT_DATA  # noqa: E402
from bench_records import split_cohort  # noqa: E402
from fhirsynth.evaluate.fidelity import r2_identity  # noqa: E402
from fhirsynth.model import measurements as ms  # noqa: E402
from fhirsynth.model.config import TokenizerConfig, TrainConfig  # noqa: E402
from fhirsynth.model.dpnoise import NoiseSource  # noqa: E402
from fhirsynth.model.repair import code_targets  # noqa: E402
from fhirsynth.model.train import release_vocabulary  # noqa: E402
from fhirsynth.records_metrics import (  # noqa: E402
    COOC_BAND,
    MIN_PREVALENCE,
    TOP_PAIRS,
    Records,
    _patient_pairs,
    kind_prevalence,
)
from fhirsynth.timeline.io import read_timelines  # noqa: E402

log = logging.getLogger("bench_measure")
ES_IPS = str(REPO.parent / "shared" / "data" / "es-ips" / "ndjson")
US_FULL = str(REPO.parent / "shared" / "data" / "us-full" / "ndjson")
COHORTS = {"us": (str(DEFAULT_DATA), "us-core", 200), "es-ips": (ES_IPS, "ips", 30), "us-full": (US_FULL, "us-core", 100)}


def parse_config(text: str) -> dict:
    out: dict = {}
    for part in text.split(":"):
        key, _, value = part.partition("=")
        if key not in ("meas", "vocab", "max_codes", "max_absent") or not value:
            raise SystemExit(f"bad configuration part {part!r} (meas=F, vocab=F, max_codes=K, max_absent=K)")
        out[key] = float(value)
    return out


def token(code: ms.CodeKey) -> str:
    return "|".join(code)  # records_metrics' token: kind|system|code


def release(train: list, cfg: dict, epsilon: float | None, seed: int | None) -> dict:
    """The measurements document train would write for these settings (exact when epsilon is None)."""
    dp = epsilon is not None
    tc = TrainConfig(epsilon=epsilon, dp=dp,
                     vocab_epsilon_fraction=cfg.get("vocab", TrainConfig.vocab_epsilon_fraction),
                     measure_epsilon_fraction=cfg.get("meas", TrainConfig.measure_epsilon_fraction))
    noise = NoiseSource.reproducible(seed if seed is not None else 0)
    vocab, _, eps_meas = release_vocabulary(tc, train, TokenizerConfig(), noise, None)
    doc, _ = ms.measure(train, vocab, dp=dp, epsilon=eps_meas,
                        delta=tc.delta * tc.measure_delta_fraction if dp else None, noise=noise,
                        max_codes=int(cfg.get("max_codes", ms.DEFAULT_MAX_CODES)),
                        max_absent=int(cfg.get("max_absent", ms.DEFAULT_MAX_ABSENT)))
    return doc


def repair_targets(doc: dict) -> dict[str, float]:
    """Repair's target share per code token (tolerance 0)."""
    return {token(t.code): t.target for t in code_targets(doc, tolerance_sd=0.0, floor=1e-12)}


def implied(doc: dict, held: Records) -> tuple[dict[str, float], dict[str, float]]:
    """(the measured targets against the holdout (module docstring), the targets)."""
    targets = repair_targets(doc)
    prev = held.prevalence()
    codes = prev.index[prev >= MIN_PREVALENCE]
    out = {"prevalence_r2": r2_identity(prev.loc[codes].to_numpy(),
                                        np.array([targets.get(c, 0.0) for c in codes]))}
    band = prev[(prev >= COOC_BAND[0]) & (prev <= COOC_BAND[1])]
    top = band.sort_values(ascending=False, kind="stable").index[:TOP_PAIRS].tolist()
    real_pairs = _patient_pairs(held, top)
    spec = ms.Spec.from_json(doc["spec"])
    n_hat = max(float(np.clip(doc["families"]["cells"]["counts"], 0, None).sum()), 1.0)
    absent = np.asarray(doc["families"]["pairs_absent"]["counts"], float) / n_hat
    where = {token(c): j for j, c in enumerate(spec.pair_codes)}
    real_vals, meas_vals = [], []
    for p, (a, b) in enumerate(combinations(range(len(top)), 2)):
        ja, jb = where.get(top[a]), where.get(top[b])
        if ja is None or jb is None:
            continue
        neither = absent[spec.pair_of[(min(ja, jb), max(ja, jb))]]
        real_vals.append(real_pairs[p])
        meas_vals.append(float(np.clip(targets[top[a]] + targets[top[b]] - 1 + neither, 0, 1)))
    out["patient_cooc_r2"] = r2_identity(np.array(real_vals), np.array(meas_vals)) if len(real_vals) > 1 else math.nan
    out["patient_cooc_pairs"] = float(len(real_vals))
    # every measured kind (medications, immunizations, procedures, allergies too), codes >= 1% of the holdout
    every = pd.concat([kind_prevalence(held, k) for k in ms.PREVALENCE_KINDS])
    every = every[every >= MIN_PREVALENCE]
    out["all_kinds_prevalence_r2"] = r2_identity(every.to_numpy(), np.array([targets.get(c, 0.0) for c in every.index]))
    return out, targets


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--cohort", choices=sorted(COHORTS), default="us")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--configs", default="meas=0.2", help="comma-separated, each KEY=V[:KEY=V...]")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("fhirsynth").setLevel(logging.WARNING)
    data, mapping, n_holdout = COHORTS[args.cohort]
    train_dir, held_dir = split_cohort(args.work, data, mapping, n_holdout)
    train, held_tl = list(read_timelines(train_dir)), list(read_timelines(held_dir))
    held = Records(held_tl)
    results: dict[str, dict] = {}

    from fhirsynth.records_metrics import compare
    rvr = compare(held, Records(train))
    results["real vs real"] = {"prevalence_r2": rvr["prevalence_r2"], "patient_cooc_r2": rvr["patient_cooc_r2"]}
    import dp_independent
    ind = []
    for d in range(args.draws):
        rel = dp_independent.release_counts(train, args.epsilon, 1e-5)
        col = compare(held, Records(dp_independent.sample(rel, len(held_tl) * 2, seed=d + 1)))
        ind.append({"prevalence_r2": col["prevalence_r2"], "patient_cooc_r2": col["patient_cooc_r2"]})
    results[f"independent codes ε={args.epsilon:g}"] = summarise(ind)
    train_prev = Records(train).prevalence()
    for text in args.configs.split(","):
        cfg = parse_config(text)
        exact, _ = implied(release(train, cfg, None, None), held)
        results[f"{text} exact"] = exact
        rows = []
        for d in range(args.draws):
            doc = release(train, cfg, args.epsilon, d + 1)
            row, targets = implied(doc, held)
            codes = train_prev.index[train_prev >= MIN_PREVALENCE]
            row["prevalence_r2_train"] = r2_identity(train_prev.loc[codes].to_numpy(),
                                                     np.array([targets.get(c, 0.0) for c in codes]))
            row["prevalence_sigma_patients"] = float(doc["families"]["prevalence"]["sigma"])
            rows.append(row)
        results[f"{text} ε={args.epsilon:g}"] = summarise(rows)
        log.info("%s: exact %s, noisy %s", text, exact, results[f"{text} ε={args.epsilon:g}"])
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in rows[0]:
        v = np.array([r[k] for r in rows], float)
        out[k], out[f"{k}_min"], out[f"{k}_max"] = float(v.mean()), float(v.min()), float(v.max())
    return out


def table(results: dict[str, dict]) -> str:
    keys = ("prevalence_r2", "prevalence_r2_train", "all_kinds_prevalence_r2", "patient_cooc_r2", "patient_cooc_pairs",
            "prevalence_sigma_patients")
    lines = ["| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, col in results.items():
        cells = []
        for k in keys:
            if k not in col:
                cells.append("–")
            elif f"{k}_min" in col:
                cells.append(f"{col[k]:.3f} [{col[k + '_min']:.3f}, {col[k + '_max']:.3f}]")
            else:
                cells.append(f"{col[k]:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
