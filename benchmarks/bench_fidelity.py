"""Patient-level code-prevalence fidelity of one model on a train/holdout split of the shared US cohort.

    python benchmarks/bench_fidelity.py --work DIR [--data ../shared/data/us/ndjson] [--holdout 200]
        [--epochs 16] [--epsilon inf|8|...] [--n-synthetic 600] [--seed 1] [--model DIR]

Steps (each cached in --work): ingest the cohort, split it by patient (a seeded, fixed number of holdout
patients), train a model on the train part (epsilon = inf means --no-dp; --model reuses a trained one), sample
n synthetic patients, then compare with the holdout:
  * condition / observation code prevalence: the share of patients with the code at least once, R² of the
    synthetic shares as a predictor of the holdout's (y = x line) over the union of codes;
  * the deceased share, and the share of living patients whose last event is more than 10 years before the
    reference date (records that stop early: what visit compression and a fixed context can cause);
  * the same for the holdout passed through the model's encode / decode: what the representation itself
    keeps, the ceiling of any model with that vocabulary and context.
Prints one markdown row for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fhirsynth.evaluate.fidelity import r2_identity  # noqa: E402
from fhirsynth.timeline.io import TimelineWriter, read_timelines  # noqa: E402
from fhirsynth.timeline.types import Timeline  # noqa: E402

log = logging.getLogger("bench_fidelity")
DEFAULT_DATA = REPO.parent / "shared" / "data" / "us" / "ndjson"
STALE_YEARS = 10.0


def split(src: Path, train: Path, holdout: Path, n_holdout: int, seed: int) -> None:
    if (train / "events.parquet").is_file() and (holdout / "events.parquet").is_file():
        return
    ids = sorted(tl.patient.patient_id for tl in read_timelines(src))
    rng = np.random.default_rng(seed)
    held = set(rng.choice(ids, size=min(n_holdout, len(ids) // 2), replace=False).tolist())
    with TimelineWriter(train) as wt, TimelineWriter(holdout) as wh:
        for tl in read_timelines(src):
            (wh if tl.patient.patient_id in held else wt).add(tl)
    log.info("split: %d train, %d holdout", wt.n_patients, wh.n_patients)


def prepare_split(work: Path, data: str, n_holdout: int) -> tuple[Path, Path]:
    """Ingest the cohort into work/timelines once and split it into work/train and work/holdout (seed 7)."""
    from fhirsynth.timeline.adapter import ingest

    src = work / "timelines"
    if not (src / "events.parquet").is_file():
        ingest([data], src, mapping="us-core")
    train, holdout = work / "train", work / "holdout"
    split(src, train, holdout, n_holdout, seed=7)
    return train, holdout


def profile(timelines: list[Timeline], ref: datetime) -> dict:
    """Per-code patient shares plus the record-shape numbers."""
    cond: dict[str, int] = {}
    obs: dict[str, int] = {}
    dead = stale = living = 0
    for tl in timelines:
        for kind, counts in (("condition", cond), ("observation", obs)):
            for key in {f"{e.system}|{e.code}" for e in tl.events if e.kind == kind}:
                counts[key] = counts.get(key, 0) + 1
        if tl.patient.deceased or tl.patient.death_date is not None:
            dead += 1
        elif tl.events:
            living += 1
            last = max(e.time if e.time.tzinfo else e.time.replace(tzinfo=timezone.utc) for e in tl.events)
            stale += (ref - last).days / 365.25 > STALE_YEARS
    n = max(len(timelines), 1)
    return {"cond": pd.Series(cond, dtype=float) / n, "obs": pd.Series(obs, dtype=float) / n,
            "deceased": dead / n, "stale": stale / max(living, 1),
            "events": sum(len(tl.events) for tl in timelines) / n}


def round_trip(model: Path, timelines: list[Timeline]) -> list[Timeline]:
    """The timelines passed through the model's encode / decode (token sequences, or visits written as tokens for
    the visit model) and the shared decoder: the representation's ceiling."""
    import torch

    from fhirsynth.model.checkpoint import load_model
    from fhirsynth.model.grammar import Grammar, replay
    from fhirsynth.model.tokenizer import Tokenizer
    from fhirsynth.model.train import pad_collate
    from fhirsynth.model.visits import VisitLayout, encode_visits, visit_tokens

    lm = load_model(model, "cpu")
    vocab = lm.vocab
    tok = Tokenizer(vocab)
    if lm.model_config.arch == "visit":
        layout = VisitLayout(vocab)
        patients = [encode_visits(tok, layout, tl, lm.model_config.max_visits) for tl in timelines]
        seqs = [visit_tokens(layout, p) for p in patients if p is not None]
    else:
        seqs = [s for s in (tok.encode(tl) for tl in timelines) if s]
    batch = pad_collate([torch.tensor(s) for s in seqs])
    draws = replay(Grammar(vocab, None, max(vocab.cfg.max_len, batch.shape[1]), torch.device("cpu")), batch,
                   torch.Generator().manual_seed(0))
    return [tok.decode(s, draws[i].tolist(), f"rt-{i}") for i, s in enumerate(seqs)]


def r2(real: pd.Series, other: pd.Series) -> float:
    keys = real.index.union(other.index)
    value = r2_identity(real.reindex(keys).fillna(0).to_numpy(), other.reindex(keys).fillna(0).to_numpy())
    return math.nan if value is None else value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--holdout", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--epsilon", default="inf")
    ap.add_argument("--n-synthetic", type=int, default=600)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--model", help="an already trained model dir (skips training)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-len", type=int, help="context length (default: TokenizerConfig's)")
    ap.add_argument("--lr", type=float, help="learning rate (default: train_model's, by DP or not)")
    ap.add_argument("--layers", type=int, help="transformer layers (default: ModelConfig's)")
    ap.add_argument("--warmup-frac", type=float, help="warmup share of the steps (default: TrainConfig's)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from fhirsynth.model.checkpoint import load_model
    from fhirsynth.model.config import ModelConfig, TokenizerConfig
    from fhirsynth.model.sampler import sample_timelines
    from fhirsynth.model.train import train_model

    train, holdout = prepare_split(work, args.data, args.holdout)
    eps = float(args.epsilon)
    tag = f"eps{args.epsilon}-ep{args.epochs}" + (f"-len{args.max_len}" if args.max_len else "")
    tag += f"-lr{args.lr:g}" if args.lr else ""
    tag += f"-wu{args.warmup_frac:g}" if args.warmup_frac is not None else ""
    tag += f"-l{args.layers}" if args.layers else ""
    tag += f"-s{args.seed}" if args.seed != 1 else ""
    model = Path(args.model) if args.model else work / f"model-{tag}"
    t_train = math.nan
    if not (model / "privacy.json").is_file():
        overrides = {"warmup_frac": args.warmup_frac} if args.warmup_frac is not None else {}
        t = time.perf_counter()
        train_model(train, model, epsilon=eps if math.isfinite(eps) else 8.0, dp=math.isfinite(eps),
                    epochs=args.epochs, seed=args.seed, lr=args.lr, **overrides,
                    tokenizer_config=TokenizerConfig(max_len=args.max_len) if args.max_len else None,
                    model_config=ModelConfig(n_layers=args.layers) if args.layers else None)
        t_train = time.perf_counter() - t
    ref_date = load_model(model, "cpu").vocab.cfg.ref_date
    ref = datetime(ref_date.year, ref_date.month, ref_date.day, tzinfo=timezone.utc)
    t = time.perf_counter()
    synth = list(sample_timelines(model, args.n_synthetic, seed=args.seed, workers=args.workers))
    t_sample = time.perf_counter() - t
    held = list(read_timelines(holdout))
    real = profile(held, ref)
    syn = profile(synth, ref)
    ceiling = profile(round_trip(model, held), ref)
    print(f"holdout: deceased {real['deceased']:.2f}, living records stopping > {STALE_YEARS:.0f} y before "
          f"{ref_date}: {real['stale']:.0%}, events/patient {real['events']:.0f}")
    print("| model | conditions R² | observations R² | deceased | living records stale | events/patient | "
          "train s | sample s |")
    print(f"| holdout through encode/decode (ceiling) | {r2(real['cond'], ceiling['cond']):.3f} | "
          f"{r2(real['obs'], ceiling['obs']):.3f} | {ceiling['deceased']:.2f} | {ceiling['stale']:.0%} | "
          f"{ceiling['events']:.0f} | | |")
    print(f"| {model.name} | {r2(real['cond'], syn['cond']):.3f} | {r2(real['obs'], syn['obs']):.3f} | "
          f"{syn['deceased']:.2f} | {syn['stale']:.0%} | {syn['events']:.0f} | {t_train:.0f} | {t_sample:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
