"""`fhirsynth train TIMELINES_DIR --out MODEL_DIR`: patient-level DP training of the transformer."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# dataclasses only: cheap at CLI start
from fhirsynth.model.config import (
    ARCHS,
    DEFAULT_ENTRY_WEIGHT_DP,
    DEFAULT_LR,
    DEFAULT_LR_DP,
    DEFAULT_LR_VISIT,
    ModelConfig,
    TrainConfig,
)


def _delta(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'auto' (got {text!r})") from None


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train", help="train the DP transformer on a timelines directory",
        epilog="multi-process DP training (one process per GPU, or CPU processes with gloo): "
               "torchrun --nproc_per_node 2 -m fhirsynth train TIMELINES --out MODEL --epochs 1 "
               "(distributed mode is automatic when WORLD_SIZE > 1; epsilon is accounted for the global batch)")
    p.add_argument("timelines", type=Path, metavar="TIMELINES_DIR")
    p.add_argument("--out", type=Path, required=True, metavar="MODEL_DIR", help="model directory to write")
    p.add_argument("--epsilon", type=float, default=8.0, help="total privacy budget (default 8)")
    p.add_argument("--delta", type=_delta, default=None, help="delta or 'auto' = min(1e-5, n^-1.1) (default auto)")
    p.add_argument("--no-dp", action="store_true", help="train without privacy (epsilon = infinity), for comparison")
    p.add_argument("--epochs", type=int, default=None,
                   help="passes over the cohort (default 10; with DP more for a small cohort, so that training makes "
                        "at least 80 optimizer steps: measured in BENCHMARKS.md)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="per-patient gradient clipping norm")
    p.add_argument("--batch-size", type=int, default=64, help="expected (logical) batch size of Poisson sampling")
    p.add_argument("--max-physical-batch", type=int, default=32, help="memory limit per forward/backward")
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default {DEFAULT_LR_DP:g} with DP; with --no-dp {DEFAULT_LR_VISIT:g} for the visit "
                        f"model, {DEFAULT_LR:g} for the token model)")
    p.add_argument("--entry-weight", type=float, default=None,
                   help="visit model: weight of each entry's repeat and lead terms in the training loss, 0-1 (default "
                        f"{DEFAULT_ENTRY_WEIGHT_DP:g} with DP, where it leaves more of each patient's clipped gradient "
                        "to the visit content; 1 with --no-dp: BENCHMARKS.md, eighteenth session)")
    p.add_argument("--warmup-frac", type=float, default=TrainConfig.warmup_frac,
                   help="share of the steps over which the learning rate rises linearly to --lr "
                        f"(default {TrainConfig.warmup_frac:g})")
    # the default now; still accepted so that old scripts run
    p.add_argument("--secure-rng", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--reproducible-noise", action="store_true",
                   help="TESTS AND RESEARCH ONLY: draw the DP noise and sampling from --seed, so a run can be replayed; "
                        "the model then has NO privacy guarantee (privacy.json says so). By default all DP noise "
                        "is secret (OS CSPRNG) and never reproducible")
    p.add_argument("--seed", type=int, default=1,
                   help="seed of the weight initialisation (public); never of the DP noise unless --reproducible-noise")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where resumable private training state lives (default: .MODEL_DIR.fhirsynth-train beside "
                        "MODEL_DIR); removed when training ends or fails, kept after an interruption to resume")
    p.add_argument("--vocab-epsilon-fraction", type=float, default=TrainConfig.vocab_epsilon_fraction,
                   help="share of the privacy budget (in zCDP rho, which adds up under composition) spent on the "
                        "DP code vocabulary, its value kinds and bins, the sex and "
                        f"death shares (default {TrainConfig.vocab_epsilon_fraction:g})")
    p.add_argument("--measure-epsilon-fraction", type=float, default=TrainConfig.measure_epsilon_fraction,
                   metavar="F", help="share of the privacy budget (zCDP rho) spent on the DP statistics that "
                                     "`generate` calibrates to (measurements.json; 10%% of delta goes with it); "
                                     "0 = none (default "
                                     f"{TrainConfig.measure_epsilon_fraction:g})")
    p.add_argument("--max-items-per-patient", type=int, default=0,
                   help="k: distinct codes one patient contributes to the vocabulary counts (default 0: chosen from "
                        "the DP patient count and the budget, at most 64)")
    p.add_argument("--arch", choices=ARCHS, default=ModelConfig.arch,
                   help="visit: one transformer position per visit, whole records (default); token: one per token, "
                        "long records compressed to --max-len tokens")
    p.add_argument("--max-visits", type=int, default=None,
                   help=f"visit model: context in visits, the newest kept (default {ModelConfig.max_visits})")
    p.add_argument("--components", type=int, default=None,
                   help=f"visit model: mixture components of a visit's content (default {ModelConfig.n_components})")
    p.add_argument("--max-len", type=int, default=512, help="token model: context length in tokens (default 512)")
    p.add_argument("--d-model", type=int, default=None, help=f"width (default {ModelConfig.d_model})")
    p.add_argument("--layers", type=int, default=None,
                   help=f"transformer layers (default {ModelConfig.n_layers})")
    p.add_argument("--heads", type=int, default=None, help=f"attention heads (default {ModelConfig.n_heads})")
    p.add_argument("--init", type=Path, default=None, metavar="PUBLIC_MODEL",
                   help="start from a visit model trained on PUBLIC data (e.g. a simulated cohort, --no-dp): its "
                        "code vocabulary joins the released one and its weights initialise the network, whose "
                        "sizes are then the prior's. No privacy budget is spent on it; privacy.json names it. "
                        "You vouch that its training data is public")
    p.add_argument("--reference-date", default=None,
                   help="YYYY-MM-DD: 'today' of the synthetic world, nothing sampled after it (default: today)")
    p.add_argument("--distributed", action="store_true",
                   help="one process of a torchrun job (Opacus DPDDP; gloo on CPU, nccl on CUDA); automatic when "
                        "WORLD_SIZE > 1. Only rank 0 writes MODEL_DIR; --batch-size is the GLOBAL expected batch")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from datetime import date

    from fhirsynth.errors import UsageError
    from fhirsynth.model.config import TokenizerConfig
    from fhirsynth.model.train import train_model

    # ModelConfig field -> the flag that sets it (None: not given, ModelConfig's default)
    shape_flags = {"d_model": ("--d-model", args.d_model), "n_layers": ("--layers", args.layers),
                   "n_heads": ("--heads", args.heads), "max_visits": ("--max-visits", args.max_visits),
                   "n_components": ("--components", args.components)}
    given = {field: v for field, (_, v) in shape_flags.items() if v is not None}
    if args.init is not None and given:
        raise UsageError(f"{', '.join(shape_flags[f][0] for f in given)}: the network sizes of a model started "
                         "--init come from the prior", where="--init")
    if args.init is not None and args.arch != "visit":
        raise UsageError("a prior initialises the visit model only", where="--arch")
    mc = ModelConfig(arch=args.arch, **given)
    mc.d_ff = 4 * mc.d_model
    if args.max_len < 16 or mc.d_model < 8 or mc.n_layers < 1 or mc.n_heads < 1 or mc.d_model % mc.n_heads:
        raise UsageError("--max-len >= 16, --d-model >= 8 and a multiple of --heads, --layers >= 1 required")
    if args.max_items_per_patient < 0:
        raise UsageError("must be >= 1, or 0 for the default (chosen from the cohort size)",
                         where="--max-items-per-patient")
    if mc.max_visits < 1 or mc.n_components < 1:
        raise UsageError("--max-visits and --components must be >= 1", where="--max-visits" if mc.max_visits < 1
                         else "--components")
    tk = TokenizerConfig(max_len=args.max_len, max_items_per_patient=args.max_items_per_patient)
    if args.reference_date:
        try:
            date.fromisoformat(args.reference_date)
        except ValueError:
            raise UsageError(f"not a date: {args.reference_date!r}", where="--reference-date") from None
        tk.reference_date = args.reference_date
    report = train_model(
        args.timelines, args.out, epsilon=None if args.no_dp else args.epsilon, delta=args.delta,
        dp=not args.no_dp, epochs=args.epochs, device=args.device, seed=args.seed, batch_size=args.batch_size,
        max_physical_batch=args.max_physical_batch, max_grad_norm=args.max_grad_norm, lr=args.lr,
        entry_weight=args.entry_weight, warmup_frac=args.warmup_frac,
        reproducible_noise=args.reproducible_noise, work_dir=args.work_dir,
        vocab_epsilon_fraction=args.vocab_epsilon_fraction,
        measure_epsilon_fraction=args.measure_epsilon_fraction,
        # with --init the network sizes are the prior's: only the architecture is passed on
        model_config=mc if args.init is None else None, tokenizer_config=tk,
        distributed=True if args.distributed else None, init=args.init,
    )
    if int(os.environ.get("RANK", "0")) != 0:  # one summary per job, from the rank that wrote the model dir
        return 0
    eps = report.get("epsilon_total")
    summary = {
        "model_dir": str(args.out), "n_estimate": report["n_estimate"], "dp": report["dp"],
        "epsilon_total": eps, "delta": report.get("delta"),  # null when --no-dp (epsilon = infinity)
        "epochs": report["epochs"], "steps": report["steps"], "noise_multiplier": report["noise_multiplier"],
    }
    if report.get("prior"):
        summary["prior"] = report["prior"]["model"]
    if report.get("reproducible_noise"):
        summary["warning"] = "reproducible noise: NO privacy guarantee (tests and research only)"
    sys.stdout.write(json.dumps(summary, default=str) + "\n")
    return 0
