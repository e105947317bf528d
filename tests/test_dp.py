"""DP training: accounting never exceeds the target, DP step == plain step without noise/clipping, resume gives
the same epsilon (and weights), privacy.json contents, no training record in the model dir, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_model_helpers import write_dir

from fhirsynth.errors import InputError, PrivacyBudgetError, UsageError
from fhirsynth.model.config import (
    DEFAULT_ENTRY_WEIGHT_DP,
    DEFAULT_LR,
    DEFAULT_LR_DP,
    DEFAULT_LR_VISIT,
    ModelConfig,
    TokenizerConfig,
    TrainConfig,
    default_lr,
)
from fhirsynth.model import composition
from fhirsynth.model.train import _quiet_opacus, default_work_dir, epsilons, lr_at, train_model
from fhirsynth.model.transformer import Transformer, patient_loss

torch.set_num_threads(1)
TINY = dict(d_model=16, n_layers=1, n_heads=2, d_ff=32)


def _train(tl_dir, out, **kw):
    args = dict(epsilon=8.0, epochs=2, batch_size=16, max_physical_batch=8, device="cpu", seed=3,
                warmup_frac=0.5,  # 9 steps: the resume tests below restart inside the warmup
                model_config=ModelConfig(**TINY),
                tokenizer_config=TokenizerConfig(max_len=64, reference_date="2026-01-01", max_items_per_patient=8))
    args.update(kw)
    return train_model(tl_dir, out, **args)


@pytest.fixture(scope="module")
def tl_dir(tmp_path_factory):
    return write_dir(tmp_path_factory.mktemp("tl") / "timelines", 48, seed=7)


@pytest.mark.parametrize("eps,q,steps", [(0.5, 0.25, 8), (2.0, 0.1, 40), (8.0, 0.05, 120), (8.0, 0.5, 6)])
def test_spent_epsilon_never_exceeds_target(eps, q, steps):
    _quiet_opacus()
    sigma = composition.sgd_noise_multiplier(eps, 1e-5, q, steps, np.zeros(len(composition.ORDERS)))
    prv, rdp = epsilons([(sigma, q, steps)], 1e-5)
    assert prv <= eps and rdp <= eps  # RDP is calibrated; PRV, the tighter bound, stays under it
    assert rdp > 0.99 * eps  # calibrated, not wildly conservative
    # spending is monotone: any prefix of the run spent less
    assert epsilons([(sigma, q, steps // 2)], 1e-5)[1] <= rdp


def test_dp_step_without_noise_or_clipping_equals_plain_step():
    """train.make_private (the wiring train_model uses: our rate, expected batch, accountant hook and secret noise
    source) with sigma 0 and no effective clipping takes exactly the plain optimizer step on the same batch."""
    from opacus import PrivacyEngine

    from fhirsynth.model.train import SeqDataset, as_batch, make_private

    _quiet_opacus()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=30, max_len=12, **TINY)
    plain = Transformer(cfg)
    private = Transformer(cfg)
    private.load_state_dict(plain.state_dict())
    seqs = [(torch.randint(1, 30, (12,)).tolist(), torch.randint(0, cfg.n_age_ids, (12,)).tolist()) for _ in range(6)]
    ds = SeqDataset(seqs)
    opt = torch.optim.SGD(private.parameters(), lr=0.5)
    model, opt, loader = make_private(PrivacyEngine(), private, opt, ds, q=1.0, n_estimate=6, sigma=0.0,
                                      max_grad_norm=1e6, batch_size=6, secure=True, seed=0, dctx=None)
    batch = as_batch(next(iter(loader)))  # q = 1: every patient is in the batch
    assert batch.shape[0] == 6
    loss = patient_loss(model(batch[:, :-1, 0], batch[:, :-1, 1]), batch[:, 1:, 0], cfg.max_len)
    loss.mean().backward()
    opt.step()

    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.5)
    patient_loss(plain(batch[:, :-1, 0], batch[:, :-1, 1]), batch[:, 1:, 0], cfg.max_len).mean().backward()
    opt_plain.step()
    for (name, a), b in zip(plain.named_parameters(), model._module.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_train_writes_model_dir_and_report(tl_dir, tmp_path):
    rep = _train(tl_dir, tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["config.json", "measurements.json", "model.pt", "privacy.json", "training-curve.csv",
                     "training-curve.json", "vocab.json"]
    for key in ("unit", "n_estimate", "epsilon_prv", "epsilon_rdp", "delta", "noise_multiplier", "sample_rate", "steps",
                "max_grad_norm", "epsilon_preprocessing", "epsilon_total"):
        assert key in rep, key
    assert rep["unit"] == "patient" and rep["dp"] is True and "n" not in rep
    assert rep["adjacency"].startswith("add/remove") and rep["reproducible_noise"] is False
    assert rep["epsilon_total"] <= 8.0 + 1e-9
    # composed in RDP: above every part alone, below their sum (basic composition), and at the target
    parts = (rep["epsilon_preprocessing"], rep["epsilon_measurements"], max(rep["epsilon_prv"], rep["epsilon_rdp"]))
    assert max(parts) < rep["epsilon_total"] < sum(parts) and rep["epsilon_total"] >= 0.97 * 8.0
    assert rep["delta"] == pytest.approx(min(1e-5, rep["n_estimate"] ** -1.1))  # from the DP estimate
    assert json.loads((tmp_path / "m" / "privacy.json").read_text()) == rep
    # no training record: no patient id, and no private loss in the released curve
    for f in files:
        if f != "model.pt":
            assert "real-7-" not in (tmp_path / "m" / f).read_text()
    curve = json.loads((tmp_path / "m" / "training-curve.json").read_text())
    assert curve and all("loss" not in row for row in curve)
    sd = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["training"]["lr"] == DEFAULT_LR_DP and cfg["training"]["warmup_frac"] == 0.5
    # under DP the per-entry terms weigh less by default (measured: config.py), and the model says what it used
    assert cfg["training"]["entry_weight"] == DEFAULT_ENTRY_WEIGHT_DP < 1


def test_no_dp_reports_infinite_epsilon(tl_dir, tmp_path):
    rep = _train(tl_dir, tmp_path / "m", dp=False, epochs=10)
    assert rep["dp"] is False and rep["epsilon_total"] is None and rep["noise_multiplier"] == 0.0
    assert "exact counts" in rep["vocabulary"]["mechanism"]
    curve = json.loads((tmp_path / "m" / "training-curve.json").read_text())
    assert curve[0]["loss"] > curve[-1]["loss"]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["training"]["lr"] == default_lr(cfg["model"]["arch"], dp=False) == DEFAULT_LR_VISIT
    assert cfg["training"]["entry_weight"] == 1.0  # without DP the likelihood itself
    assert default_lr("token", dp=False) == DEFAULT_LR != DEFAULT_LR_DP


@pytest.fixture(scope="module")
def full_run(tl_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "m"
    return _train(tl_dir, out, epochs=3, checkpoint_every=2, reproducible_noise=True), out


@pytest.mark.parametrize("kill_at", [5, 7])  # last checkpoint mid-epoch (4) / at an epoch boundary (6)
def test_resume_after_interruption_gives_same_epsilon_and_weights(tl_dir, tmp_path, kill_at, full_run):
    full, full_dir = full_run

    def kill(step):
        if step == kill_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tl_dir, tmp_path / "cut", epochs=3, checkpoint_every=2, on_step=kill, reproducible_noise=True)
    # the private resumable state lives beside the model dir, never inside what a user would share
    assert (default_work_dir(tmp_path / "cut") / "state.pt").is_file()
    assert not (tmp_path / "cut" / "privacy.json").exists()
    assert not (tmp_path / "cut").exists() or not any((tmp_path / "cut").iterdir())
    resumed = _train(tl_dir, tmp_path / "cut", epochs=3, checkpoint_every=2, reproducible_noise=True)
    assert not default_work_dir(tmp_path / "cut").exists()
    for key in ("epsilon_prv", "epsilon_rdp", "epsilon_total", "steps", "noise_multiplier", "n_estimate"):
        assert resumed[key] == pytest.approx(full[key], rel=1e-9), key
    a = torch.load(full_dir / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # a checkpoint from different settings is refused rather than silently mixed
    with pytest.raises(KeyboardInterrupt):
        _train(tl_dir, tmp_path / "cut2", epochs=3, checkpoint_every=2, on_step=kill, reproducible_noise=True)
    with pytest.raises(UsageError, match="different settings"):
        _train(tl_dir, tmp_path / "cut2", epochs=3, epsilon=4.0)
    # ... so is one written by another model format, or holding a network this code does not build: a clear
    # message, never a traceback from load_state_dict
    state_path = default_work_dir(tmp_path / "cut2") / "state.pt"
    state = torch.load(state_path, weights_only=True)
    older = {**state, "signature": {**state["signature"], "format_version": state["signature"]["format_version"] - 1}}
    torch.save(older, state_path)
    with pytest.raises(UsageError, match="different settings"):
        _train(tl_dir, tmp_path / "cut2", epochs=3, checkpoint_every=2, reproducible_noise=True)
    state["model"].pop(next(iter(state["model"])))
    torch.save(state, state_path)
    with pytest.raises(UsageError, match="does not build"):
        _train(tl_dir, tmp_path / "cut2", epochs=3, checkpoint_every=2, reproducible_noise=True)


def test_learning_rate_warms_up_linearly_then_stays():
    tc = TrainConfig(lr=0.01, warmup_frac=0.25)
    lrs = [lr_at(tc, step, 20) for step in range(20)]
    assert lrs[:5] == pytest.approx([0.002, 0.004, 0.006, 0.008, 0.01])
    assert lrs[5:] == [0.01] * 15
    assert lr_at(TrainConfig(lr=0.01, warmup_frac=0.0), 0, 20) == 0.01


def test_bad_inputs(tl_dir, tmp_path):
    with pytest.raises(PrivacyBudgetError, match="positive"):
        _train(tl_dir, tmp_path / "m", epsilon=0.0)
    with pytest.raises(PrivacyBudgetError):
        _train(tl_dir, tmp_path / "m", epsilon=-1.0)
    with pytest.raises(PrivacyBudgetError, match="delta"):
        _train(tl_dir, tmp_path / "m", delta=2.0)
    with pytest.raises(UsageError, match="not found"):
        _train(tmp_path / "missing", tmp_path / "m")
    empty = write_dir(tmp_path / "empty", 0)
    with pytest.raises(InputError, match="no patients"):
        _train(empty, tmp_path / "m")
    with pytest.raises(UsageError, match="epochs"):
        _train(tl_dir, tmp_path / "m", epochs=0)
    with pytest.raises(UsageError, match="warmup"):
        _train(tl_dir, tmp_path / "m", warmup_frac=1.0)


def test_without_epochs_a_small_dp_cohort_trains_min_dp_steps_and_a_plain_one_ten_epochs(tl_dir, tmp_path):
    """--epochs not given: 48 patients at batch 16 make ~3 steps per epoch, so DP training runs the fewest epochs
    that reach MIN_DP_STEPS (more than the usual 10); without DP it stays at DEFAULT_EPOCHS. Given epochs win."""
    from fhirsynth.model.config import DEFAULT_EPOCHS, MIN_DP_STEPS
    from fhirsynth.model.train import steps_per_epoch_for

    rep = _train(tl_dir, tmp_path / "dp", epochs=None)
    per_epoch = steps_per_epoch_for(rep["n_estimate"], 16)
    assert rep["epochs"] > DEFAULT_EPOCHS and rep["steps"] == rep["epochs"] * per_epoch
    assert rep["steps"] >= MIN_DP_STEPS > (rep["epochs"] - 1) * per_epoch  # the fewest epochs that reach it
    saved = json.loads((tmp_path / "dp" / "config.json").read_text())["training"]
    assert saved["epochs"] == rep["epochs"]
    plain = _train(tl_dir, tmp_path / "plain", epochs=None, dp=False)
    assert plain["epochs"] == DEFAULT_EPOCHS and plain["steps"] == DEFAULT_EPOCHS * steps_per_epoch_for(48, 16)
    assert _train(tl_dir, tmp_path / "given", epochs=3)["epochs"] == 3


def test_dp_regime_plans_the_noise_train_used(tl_dir, tmp_path):
    """benchmarks/dp_regime.py recomputes from privacy.json alone the noise multiplier train picked for the run's
    own batch and epochs (and more noise for more steps at the same budget)."""
    from bench_module import benchmark_module

    rep = _train(tl_dir, tmp_path / "m")  # epochs 2, batch 16
    rows = {(r["batch"], r["epochs"]): r for r in benchmark_module("dp_regime").regime_rows(rep, [16], [2, 8])}
    assert rows[16, 2]["steps"] == rep["steps"]
    assert rows[16, 2]["sigma"] == pytest.approx(rep["noise_multiplier"], rel=1e-6)
    assert rows[16, 8]["sigma"] > rows[16, 2]["sigma"]
