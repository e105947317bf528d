"""Typed configs of the model stage. All of them are public settings (never derived from data) and are
copied into every model dir as config.json, so a model dir says exactly how it was made."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any

from fhirsynth import __version__

# Bumped whenever the model-dir layout or token grammar changes; loading another version is refused.
# 2: visits newest first (tokenizer.py), the death right after the prefix.
# 3: an age input beside every token (the record's current age in years, tokenizer.encode_with_ages).
# 4: a GAP token begins a visit (no VISIT marker token).
# 5: the visit model (model.arch = "visit", visitmodel.py) beside the token model ("token").
# 6: the visit model reads the age in weeks and months under three years (bins.early_age_id).
# 7: the visit model keeps an item's repeats within a visit (bins.REPEAT_EDGES; the same vital written twice).
FORMAT_VERSION = 7
ARCHS = ("visit", "token")


def _today() -> str:
    return datetime.now(timezone.utc).date().isoformat()


@dataclass
class ModelConfig:
    """Decoder-only transformer shape (nanoGPT-like). arch: "visit" (one position per visit, visitmodel.py) or
    "token" (one position per token, transformer.py)."""

    arch: str = "visit"
    vocab_size: int = 0
    d_model: int = 128
    # 2, not 4: on the 800-patient US training split (16 epochs, no DP) 2 layers fit the holdout best (NLL per
    # token 1.09 vs 1.12 for 3 and 1.15 for 4), score the same prevalence R² (conditions 0.92, observations 0.91
    # vs 0.91 / 0.90 for 4) and sample faster (BENCHMARKS.md, fifth session). Larger cohorts: --layers.
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 1  # multi-query attention: 1 key/value head (4x smaller KV cache, faster sampling)
    d_ff: int = 512
    max_len: int = 512
    dropout: float = 0.0
    n_age_ids: int = 128  # age input: years 0..126 and "not known yet" (tokenizer.AGE_UNKNOWN)
    # visit model: the context in visits (newest kept; the US cohort: median 95, 95th percentile ~300) and the
    # number of mixture components of a visit's content
    max_visits: int = 320
    n_components: int = 12
    visit_sizes: dict | None = None  # visitmodel.VisitSizes, filled in by training


@dataclass
class TokenizerConfig:
    """How timelines become token sequences. Public settings: none of them comes from the data.

    max_len: the context (tokens per patient, BOS..END); longer histories are compressed (see tokenizer.py).
    max_items_per_patient: k, the contribution bound of one patient to the DP vocabulary counts; 0 = chosen from
        the DP patient count and the budget (vocab.auto_items_per_patient).
    max_value_codes_per_patient: m, the contribution bound of one patient to the DP value bins (dpbins.py).
    reference_date: "today" of the synthetic world; nothing is sampled after it (default: the training day).
    """

    max_len: int = 512
    max_items_per_patient: int = 0
    max_value_codes_per_patient: int = 8
    max_vocab_items: int = 4000
    min_count_no_dp: int = 2
    reference_date: str = field(default_factory=_today)
    birth_year_start: int = 1900
    birth_year_end: int = 2030
    birth_year_width: int = 5
    max_age_years: int = 110

    @property
    def ref_date(self) -> date:
        return date.fromisoformat(self.reference_date)


# Default learning rates. DP-SGD takes larger steps: its clipped, noised gradients are smaller than plain ones.
# On the US cohort at epsilon 8 (2 layers, seeds 1 / 2) 1e-2 scored conditions R² 0.64 / 0.50 against 0.20 / 0.36
# at 3e-3, but observations 0.44 / 0.48 against 0.60 / 0.66: a trade toward conditions, and deceased shares
# nearer the data (0.26 / 0.18 vs 0.28 / 0.27; holdout 0.20). BENCHMARKS.md, fifth session.
DEFAULT_LR = 3e-3
DEFAULT_LR_DP = 1e-2
# The visit model without DP: on 200 US training patients (5 epochs) the holdout NLL per visit was 33.5 at 3e-3,
# 26.9 at 1e-2 and 27.5 at 3e-2 (BENCHMARKS.md, seventh session).
DEFAULT_LR_VISIT = 1e-2


# Training length when --epochs is not given (train.default_epochs): 10 epochs, and under DP at least MIN_DP_STEPS
# optimizer steps. On the es-ips split (120 patients, ε = 8: two Poisson steps per epoch at batch 64) 80 steps
# (40 epochs, noise multiplier 3.93) beat 20 (10 epochs, 2.10), three seeds each: prevalence R² 0.57-0.59 against
# 0.36-0.47, within-visit co-occurrence -0.49 to -0.35 against -1.11 to -0.77; on the US split (800) the same
# compute spent on fewer, less noisy steps (batch 256: 40 steps) lost to 130 steps at batch 64 (BENCHMARKS.md,
# sixteenth session). The US default already makes 130 steps; only small cohorts train longer.
DEFAULT_EPOCHS = 10
MIN_DP_STEPS = 80


# The visit model's repeat and lead terms under DP (TrainConfig.entry_weight when none is given). Without noise
# they are learnt in a few steps and leave the gradient to the visit content; under DP-SGD they kept a fifth of
# each clipped patient gradient to the end of training. On the US split at epsilon 8 (three seeds each), 0.2
# against 1, calibrated: prevalence R² 0.961 / 0.953, within-visit co-occurrence 0.849 / 0.768, transitions 0.791 /
# 0.631, events per patient KS 0.117 / 0.252, visits 0.097 / 0.156; on es-ips (120 patients) it bought content
# with record length (BENCHMARKS.md, eighteenth session). Without DP the likelihood itself (1).
DEFAULT_ENTRY_WEIGHT_DP = 0.2


def default_entry_weight(dp: bool) -> float:
    """The entry weight train_model uses when none is given."""
    return DEFAULT_ENTRY_WEIGHT_DP if dp else 1.0


def default_lr(arch: str, dp: bool) -> float:
    """The learning rate train_model uses when none is given."""
    if dp:
        return DEFAULT_LR_DP
    return DEFAULT_LR_VISIT if arch == "visit" else DEFAULT_LR


@dataclass
class TrainConfig:
    """Training hyper-parameters and privacy targets (public)."""

    epsilon: float | None = 8.0
    delta: float | None = None  # None = auto: min(1e-5, n^-1.1)
    dp: bool = True
    epochs: int | None = None  # None: train.default_epochs (resolved once the DP patient count is known)
    batch_size: int = 64
    max_physical_batch: int = 32
    max_grad_norm: float = 1.0
    # the visit model's per-entry repeat and lead terms in the loss (1 = as they are). Under DP they share each
    # patient's clipped gradient with the visit content; at the starting weights of the es-ips split they take
    # 30% of it, at the end of ε = 8 training 21% (benchmarks/dp_gradient_share.py, BENCHMARKS.md eighteenth session).
    # train_model's default is default_entry_weight(dp): 0.2 under DP
    entry_weight: float = 1.0
    lr: float = DEFAULT_LR  # train_model's default with DP is DEFAULT_LR_DP
    # linear learning-rate warmup over this share of the steps, then constant (a public schedule)
    warmup_frac: float = 0.1
    weight_decay: float = 0.0
    vocab_epsilon_fraction: float = 0.25
    vocab_delta_fraction: float = 0.1
    # shares of the budget (zCDP rho, composition.py) and of delta for the statistics measured for calibration
    # (measurements.py); 0 = none
    measure_epsilon_fraction: float = 0.2
    measure_delta_fraction: float = 0.1
    # research / tests only: DP noise and sampling drawn from `seed` (replayable: NO privacy guarantee)
    reproducible_noise: bool = False
    seed: int = 1  # weight initialisation (and DP noise only when reproducible_noise)
    # a public prior model the weights start from (prior.py), and its checkpoint.model_hash
    init: str | None = None
    init_model_hash: str | None = None
    checkpoint_every: int = 50


def to_json(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def from_json(cls: type, data: dict[str, Any]):
    """Build a config dataclass from JSON, ignoring unknown keys (forward compatible within a format)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def versions() -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "fhirsynth_version": __version__}
