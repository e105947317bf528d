"""Privacy regression suite: each test fails when the guarantee breaks, not when it merely changes.

Against a default `fhirsynth train`: two runs with identical arguments differ in every DP output; the replay and the
count-recovery attacks (which succeed against a --reproducible-noise run, shown as a control) fail; no file of the
model dir holds the exact n, a noise seed or a loss, and no private state is left beside it; the epsilon in
privacy.json is recomputed independently from its own (sigma, q, steps, delta); the accountant's rate is the
sampler's for the step counts where Opacus' int(1/q) differs; the noise that reaches the weights has std
sigma * C."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_model_helpers import make_timelines

from fhirsynth.cli import main
from fhirsynth.errors import PrivacyBudgetError
from fhirsynth.model.config import ModelConfig
from fhirsynth.model.dpnoise import NoiseSource
from fhirsynth.model.train import (
    SeqDataset,
    _quiet_opacus,
    accounted_steps,
    as_batch,
    default_work_dir,
    make_private,
    pad_collate,
    steps_per_epoch_for,
    train_model,
)
from fhirsynth.model.transformer import Transformer, patient_loss
from fhirsynth.model.vocab import SEXES
from fhirsynth.timeline.io import TimelineWriter

torch.set_num_threads(1)
N = 48
TINY = ["--d-model", "16", "--layers", "1", "--heads", "2", "--max-len", "64", "--epochs", "1",
        "--batch-size", "16", "--max-physical-batch", "8", "--device", "cpu", "--reference-date", "2026-01-01",
        "--max-items-per-patient", "8"]


def _write(path, timelines):
    with TimelineWriter(path) as w:
        for tl in timelines:
            w.add(tl)
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """The full training set, and the same set without its last patient (the replay attack's two hypotheses)."""
    d = tmp_path_factory.mktemp("cohort")
    tls = make_timelines(N, seed=11)
    return _write(d / "with-target", tls), _write(d / "without-target", tls[:-1]), tls


def _train_cli(tl_dir, out, *extra, capsys=None) -> dict:
    assert main(["train", str(tl_dir), "--out", str(out), *TINY, *extra]) == 0
    if capsys is not None:
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return json.loads((out / "privacy.json").read_text())


@pytest.fixture(scope="module")
def released(cohort, tmp_path_factory):
    """What a data holder publishes after a default `fhirsynth train --epsilon 8`."""
    out = tmp_path_factory.mktemp("released") / "model"
    _train_cli(cohort[0], out, "--epsilon", "8")
    return out


def _weights(model_dir):
    return torch.load(model_dir / "model.pt", weights_only=True)


def _dp_statistics(model_dir) -> tuple:
    vocab = json.loads((model_dir / "vocab.json").read_text())
    privacy = json.loads((model_dir / "privacy.json").read_text())
    return (vocab["sex_shares"], vocab["death_shares"], privacy["n_estimate"], vocab["private_value_bins"])


def test_two_default_runs_differ_in_every_dp_output(cohort, released, tmp_path):
    again = tmp_path / "again"
    _train_cli(cohort[0], again, "--epsilon", "8")
    a, b = _weights(released), _weights(again)
    # every parameter tensor gets its own noise at every step: none may come out equal
    same = [k for k in a if torch.equal(a[k], b[k])]
    assert not same, f"identical after two default runs (noise not secret): {same}"
    assert _dp_statistics(released) != _dp_statistics(again)
    # and a DP run is not a non-DP run with the same seed
    plain = tmp_path / "plain"
    _train_cli(cohort[0], plain, "--no-dp")
    c = _weights(plain)
    assert all(not torch.equal(a[k], c[k]) for k in a if k in c and a[k].shape == c[k].shape)


def _replay(cohort_dir, out, released_dir, *extra) -> bool:
    """The attacker reruns the pipeline with the settings of config.json; True when it reproduces the release."""
    cfg = json.loads((released_dir / "config.json").read_text())
    _train_cli(cohort_dir, out, "--epsilon", "8", "--seed", str(cfg["training"]["seed"]), *extra)
    a, b = _weights(released_dir), _weights(out)
    return all(torch.equal(a[k], b[k]) for k in a) and \
        (released_dir / "vocab.json").read_bytes() == (out / "vocab.json").read_bytes()


def test_replay_attack_works_on_reproducible_noise_and_fails_by_default(cohort, released, tmp_path):
    with_target, without_target, _ = cohort
    # control: with replayable noise the attack decides membership with certainty
    rep = tmp_path / "reproducible"
    privacy = _train_cli(with_target, rep, "--epsilon", "8", "--reproducible-noise")
    assert privacy["guarantee"].startswith("NONE") and privacy["reproducible_noise"] is True
    assert _replay(with_target, tmp_path / "r-in", rep, "--reproducible-noise")
    assert not _replay(without_target, tmp_path / "r-out", rep, "--reproducible-noise")
    # the default release: neither hypothesis reproduces it, so replaying tells the attacker nothing
    assert not _replay(with_target, tmp_path / "d-in", released)
    assert not _replay(with_target, tmp_path / "d-in-r", released, "--reproducible-noise")


def _count_recovery(model_dir) -> int:
    """The audit's attack without background knowledge: replay the first noise draws from the seed in
    config.json (the sex histogram is the first DP release) and subtract them from the released total."""
    cfg = json.loads((model_dir / "config.json").read_text())
    privacy = json.loads((model_dir / "privacy.json").read_text())
    seed, n_est = cfg["training"]["seed"], privacy["n_estimate"]
    eps_sex = privacy["vocabulary"]["sex_marginal"]["epsilon"]
    replayed, _ = NoiseSource.reproducible(seed).laplace(np.zeros(len(SEXES), dtype=np.int64), eps_sex, "replay")
    return int(n_est - replayed.sum())


def test_count_recovery_attack_works_on_reproducible_noise_and_fails_by_default(cohort, tmp_path):
    rep = tmp_path / "reproducible"
    _train_cli(cohort[0], rep, "--epsilon", "1", "--reproducible-noise")
    assert _count_recovery(rep) == N  # control: the attack is real
    # default runs at epsilon 1 (sex-histogram total: std ~110): each guess hits N with probability ~0.4%, all
    # three only if the noise were replayable
    guesses = []
    for i in range(3):
        _train_cli(cohort[0], tmp_path / f"d{i}", "--epsilon", "1")
        guesses.append(_count_recovery(tmp_path / f"d{i}"))
        assert isinstance(json.loads((tmp_path / f"d{i}" / "privacy.json").read_text())["n_estimate"], int)
    assert guesses != [N, N, N]


def _json_keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | set().union(*(_json_keys(v) for v in obj.values()))
    if isinstance(obj, list):
        return set().union(*(_json_keys(v) for v in obj)) if obj else set()
    return set()


def test_model_dir_holds_no_exact_n_noise_seed_or_loss(cohort, tmp_path, capsys):
    out = tmp_path / "m"
    summary = _train_cli(cohort[0], out, "--epsilon", "8", capsys=capsys)
    assert "n" not in summary and isinstance(summary["n_estimate"], int)
    # nothing but the model dir next to the inputs: no work dir, no checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "measurements.json", "model.pt", "privacy.json",
                                                    "training-curve.csv", "training-curve.json", "vocab.json"]
    for f in out.iterdir():
        if f.suffix == ".json":
            keys = _json_keys(json.loads(f.read_text()))
            assert not keys & {"n", "n_patients", "loss", "losses", "noise_seed"}, (f.name, keys)
        if f.suffix == ".csv":
            assert "loss" not in f.read_text().splitlines()[0]
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["reproducible_noise"] is False and "no noise seed exists" in privacy["noise_source"]
    assert "seeded" not in privacy["noise_source"] and "NONE" not in privacy["guarantee"]
    assert "os.urandom" in privacy["noise_source"] and "OpenDP" in privacy["noise_source"]
    assert privacy["adjacency"].startswith("add/remove one patient")
    assert "OpenDP" in privacy["vocabulary"]["noise_source"]
    # every size-dependent setting is a function of the DP estimate, not of N
    spe = steps_per_epoch_for(privacy["n_estimate"], privacy["batch_size"])
    assert privacy["sample_rate"] == 1.0 / spe and privacy["steps"] == spe * privacy["epochs"]
    assert privacy["delta"] == pytest.approx(min(1e-5, privacy["n_estimate"] ** -1.1))
    curve = json.loads((out / "training-curve.json").read_text())
    assert curve[-1]["step"] == privacy["steps"]


def independent_epsilon(p: dict) -> float:
    """privacy.json's total recomputed here from the released scales alone, with Opacus' RDP functions (not
    through fhirsynth's composition module): every Gaussian release as RDP a * s^2 / (2 sigma^2), every Laplace
    one as min(eps, a eps^2 / 2), DP-SGD by compute_rdp, converted at delta minus the thresholds' deltas."""
    import numpy as np
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    a = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [80, 96, 128, 192, 256, 384, 512,
                                                                                  1024])
    v, m = p["vocabulary"], p["measurements"]
    gauss = [(v["sigma"], math.sqrt(v["max_items_per_patient"])),
             (v["value_kinds"]["sigma"], math.sqrt(v["value_kinds"]["max_pairs_per_patient"])),
             (v["value_bins"]["sigma"], math.sqrt(2 * v["value_bins"]["max_codes_per_patient"]))]
    gauss += [(f["sigma"], f["sensitivity"]) for f in (m["families"].values() if m else [])]
    rdp = sum(a * s * s / (2 * sg * sg) for sg, s in gauss)
    for e in (v["sex_marginal"]["epsilon"], v["death_by_birth_band"]["epsilon"]):
        rdp = rdp + np.minimum(e, a * e * e / 2)
    rdp = rdp + np.asarray(compute_rdp(q=p["sample_rate"], noise_multiplier=p["noise_multiplier"], steps=p["steps"],
                                       orders=list(a)))
    thresholds = v["delta"] / 2 + v["value_bins"]["delta"] / 2  # the set-union thresholds' share of their delta
    return float(get_privacy_spent(orders=list(a), rdp=rdp, delta=p["delta"] - thresholds)[0])


def test_epsilon_is_recomputed_independently_and_parts_add_up(released):
    from opacus.accountants import PRVAccountant, RDPAccountant

    p = json.loads((released / "privacy.json").read_text())
    assert p["epsilon_total"] == pytest.approx(independent_epsilon(p), rel=1e-6)
    # calibrated: DP-SGD fills the budget the releases before it left, not wildly conservative, never over
    assert 0.97 * p["epsilon_target"] <= p["epsilon_total"] <= p["epsilon_target"] * (1 + 1e-9)
    history = [(p["noise_multiplier"], p["sample_rate"], p["steps"])]
    prv, rdp = PRVAccountant(), RDPAccountant()
    prv.history, rdp.history = list(history), list(history)
    assert prv.get_epsilon(p["delta_conversion"]) == pytest.approx(p["epsilon_prv"], rel=1e-6)
    assert rdp.get_epsilon(p["delta_conversion"]) == pytest.approx(p["epsilon_rdp"], rel=1e-6)
    # each part alone is below the composed total, and the parts' epsilons over-count it (why RDP composes)
    parts = (p["epsilon_preprocessing"], p["epsilon_measurements"], p["epsilon_training"])
    assert max(parts) < p["epsilon_total"] < sum(parts)
    v = p["vocabulary"]
    assert v["delta"] + v["value_kinds"]["delta"] + v["value_bins"]["delta"] == pytest.approx(
        p["delta_preprocessing"], rel=1e-12)
    assert p["delta_thresholds"] == pytest.approx(v["delta"] / 2 + v["value_bins"]["delta"] / 2, rel=1e-12)
    assert p["delta_conversion"] + p["delta_thresholds"] == pytest.approx(p["delta"], rel=1e-12)


def _tiny_private(n_seqs: int, *, q: float, n_estimate: int, sigma: float, clip: float, secure: bool, lr: float):
    from opacus import PrivacyEngine

    _quiet_opacus()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=20, max_len=8, d_model=8, n_layers=1, n_heads=1, d_ff=16)
    model = Transformer(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ds = SeqDataset([([1, 5, 6, 2], [0, 1, 1, 1])] * n_seqs)
    engine = PrivacyEngine(accountant="prv", secure_mode=False)
    model, opt, loader = make_private(engine, model, opt, ds, q=q, n_estimate=n_estimate, sigma=sigma,
                                      max_grad_norm=clip, batch_size=round(q * n_estimate), secure=secure, seed=1,
                                      dctx=None)
    return engine, model, opt, loader, cfg


@pytest.mark.parametrize("steps", [93, 99, 105])  # int(1 / (1 / steps)) != steps in floating point
def test_accountant_rate_and_steps_are_the_loops(steps):
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    assert int(1 / (1 / steps)) != steps
    n_est = 4 * steps - 1  # ceil(n_est / 4) == steps
    assert steps_per_epoch_for(n_est, 4) == steps
    q = 1.0 / steps
    engine, model, opt, loader, cfg = _tiny_private(4 * steps, q=q, n_estimate=n_est, sigma=1.0, clip=1.0,
                                                    secure=True, lr=0.0)
    assert loader.batch_sampler.sample_rate == q and loader.sample_rate == q
    taken = 0
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=64, optimizer=opt) as batches:
        for batch in batches:
            batch = as_batch(batch)
            patient_loss(model(batch[:, :-1, 0], batch[:, :-1, 1]), batch[:, 1:, 0], cfg.max_len).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            taken += not opt._is_last_step_skipped
    assert taken == steps
    assert engine.accountant.history == [(1.0, q, steps)]
    assert accounted_steps(engine.accountant.history) == steps


@pytest.mark.parametrize("secure", [True, False])
def test_noise_reaching_the_weights_has_std_sigma_times_clip(secure):
    """A zero loss gives zero per-patient gradients: what moves the weights is the added noise alone, divided by
    the expected batch. Its std must be sigma * C (removing or scaling the noise fails this)."""
    sigma, clip, n_est, q = 2.0, 0.5, 40, 0.25
    engine, model, opt, loader, cfg = _tiny_private(40, q=q, n_estimate=n_est, sigma=sigma, clip=clip,
                                                    secure=secure, lr=1.0)
    assert opt.expected_batch_size == pytest.approx(q * n_est)
    before = [p.detach().clone() for p in model.parameters()]
    batch = as_batch(next(iter(loader)))
    (model(batch[:, :-1, 0], batch[:, :-1, 1]).sum() * 0.0).backward()
    opt.step()
    moved = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    noise = moved * opt.expected_batch_size  # SGD with lr 1: w -= (sum of clipped grads + noise) / expected batch
    assert moved.numel() > 2000
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.08)
    assert abs(float(noise.mean())) < 0.1 * sigma * clip


def test_empty_first_poisson_batch_is_a_noise_only_step():
    """Opacus yields a list for an empty batch drawn before any non-empty one; the loop trains on it as [0, L, 2]."""
    from opacus.data_loader import DPDataLoader

    ds = SeqDataset([([1, 5, 2], [0, 1, 1])] * 3)
    loader = DPDataLoader(ds, sample_rate=1e-12, collate_fn=pad_collate)
    first = next(iter(loader))
    assert not isinstance(first, torch.Tensor) or first.shape[0] == 0
    batch = as_batch(first)
    assert batch.shape[0] == 0 and batch.dim() == 3
    cfg = ModelConfig(vocab_size=20, max_len=8, d_model=8, n_layers=1, n_heads=1, d_ff=16)
    loss = patient_loss(Transformer(cfg)(batch[:, :-1, 0], batch[:, :-1, 1]), batch[:, 1:, 0], cfg.max_len)
    assert loss.shape == (0,)


def test_work_dir_beside_the_model_dir_kept_on_interrupt_removed_on_abort(cohort, tmp_path):
    kw = dict(epsilon=8.0, epochs=1, batch_size=8, max_physical_batch=8, device="cpu", checkpoint_every=1,
              model_config=ModelConfig(d_model=8, n_layers=1, n_heads=1, d_ff=16))
    out = tmp_path / "m"
    work = default_work_dir(out)
    assert work.parent == out.resolve().parent

    def stop(exc, at):
        def hook(step):
            if step >= at:
                raise exc
        return hook

    with pytest.raises(KeyboardInterrupt):
        train_model(cohort[0], out, on_step=stop(KeyboardInterrupt(), 2), **kw)
    assert (work / "state.pt").is_file()  # kept to resume, outside what a user would share
    assert not out.exists() or not any(out.iterdir())
    state = torch.load(work / "state.pt", weights_only=True)
    assert all("loss" not in row for row in state["curve"])  # the DP loss is not even stored privately
    with pytest.raises(PrivacyBudgetError):
        train_model(cohort[0], out, on_step=stop(PrivacyBudgetError("abort"), 0), **kw)
    assert not work.exists()  # an abort leaves no private state behind
    with pytest.raises(Exception, match="must not be inside"):
        train_model(cohort[0], out, work_dir=out / "work", **kw)
    assert math.isfinite(train_model(cohort[0], out, **kw)["epsilon_total"])
    assert not work.exists()
