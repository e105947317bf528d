"""How the visit model's per-patient gradient is shared among its loss terms (the DP-SGD question of issue 15).

    python benchmarks/dp_gradient_share.py --train TL_DIR [--model MODEL_DIR] [--patients 32] [--steps 0]
        [--clip 1.0] [--entry-weight 0.2]

DP-SGD clips each patient's gradient to norm C and adds noise of norm about sigma C sqrt(parameters) to the sum:
a term that takes most of a patient's gradient takes most of what the clip lets through, whatever its worth for
the output. For --patients training patients (the first ones of TL_DIR, encoded with a non-DP vocabulary of
TL_DIR, or with --model's vocabulary and weights) this prints, per term of VisitModel.loss_terms, the median
per-patient gradient norm and the term's share of the patient's total gradient (g_t . g / g . g: the shares of a
patient add up to 1), at the network's initial weights, after --steps plain Adam steps on batches of the same
patients, or at --model's trained weights. --entry-weight scales the repeat and lead terms as train's --entry-weight does.
Not DP itself (exact data, a measurement for the developer); nothing here is released.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fhirsynth.timeline.io import read_timelines  # noqa: E402

log = logging.getLogger("dp_gradient_share")


def build(train: Path, model_dir: Path | None, n: int, entry_weight: float):
    """(archs.Arch with training's loss at entry_weight, dataset items, allowed) for the first n patients of train."""
    from fhirsynth.model.archs import build_arch
    from fhirsynth.model.config import ModelConfig, TokenizerConfig
    from fhirsynth.model.dpnoise import NoiseSource
    from fhirsynth.model.visits import VisitLayout
    from fhirsynth.model.vocab import build_vocab

    timelines = list(read_timelines(train))
    if model_dir is not None:
        from fhirsynth.model.checkpoint import load_model

        loaded = load_model(model_dir, "cpu")
        vocab, mc = loaded.vocab, loaded.model_config
    else:
        vocab, _ = build_vocab(timelines, TokenizerConfig(), dp=False, epsilon=None, delta=None,
                               noise=NoiseSource.reproducible(1))
        mc = ModelConfig(arch="visit")
    torch.manual_seed(1)
    arch = build_arch(mc, vocab, timelines, Counter(), entry_weight=entry_weight)
    if model_dir is not None:
        arch.model.load_state_dict(loaded.model.state_dict())
    items = [arch.dataset[i] for i in range(min(n, len(arch.dataset)))]
    return arch, items, torch.as_tensor(VisitLayout(vocab).allowed)


def shares(model, items, collate, allowed, weights: dict[str, float]) -> dict[str, dict[str, float]]:
    params = [p for p in model.parameters() if p.requires_grad]
    per: dict[str, list[tuple[float, float]]] = {}
    totals = []
    for it in items:
        batch = collate([it])
        terms = model.loss_terms(**batch, allowed=allowed)
        grads = {}
        for name, t in terms.items():
            v = t.sum() * weights.get(name, 1.0) / float(model.cfg.max_visits)
            gs = torch.autograd.grad(v, params, retain_graph=True, allow_unused=True)
            grads[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                     for g, p in zip(gs, params)])
        g = sum(grads.values())
        gg = float(g @ g)
        totals.append(gg ** 0.5)
        for name, gt in grads.items():
            per.setdefault(name, []).append((float(gt.norm()), float(gt @ g) / max(gg, 1e-30)))
    out = {name: {"median_norm": float(np.median([a for a, _ in v])), "mean_share": float(np.mean([b for _, b in v]))}
           for name, v in per.items()}
    out["total"] = {"median_norm": float(np.median(totals)), "mean_share": 1.0}
    return out


def train_steps(arch, items, steps: int, lr: float) -> None:
    """Plain Adam steps on batches of 16 of the items, with training's own loss (arch.loss)."""
    opt = torch.optim.AdamW(arch.model.parameters(), lr=lr)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        idx = rng.choice(len(items), size=min(16, len(items)), replace=False)
        loss = arch.loss(arch.model, arch.collate([items[i] for i in idx]))[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, type=Path)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--patients", type=int, default=32)
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--entry-weight", type=float, default=1.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from fhirsynth.model.visitmodel import ENTRY_TERMS

    weights = {k: args.entry_weight for k in ENTRY_TERMS}
    arch, items, allowed = build(args.train, args.model, args.patients, args.entry_weight)
    if args.steps:
        train_steps(arch, items, args.steps, args.lr)
    res = shares(arch.model, items, arch.collate, allowed, weights)
    print("| term | median per-patient gradient norm | mean share of the patient's gradient |")
    print("|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['median_norm']:.3g} | {r['mean_share']:.3f} |")
    clipped = res["total"]["median_norm"] > args.clip
    print(f"\nmedian total norm {res['total']['median_norm']:.3g} against clip {args.clip}: "
          f"{'most patients are clipped' if clipped else 'most patients are under the clip'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
