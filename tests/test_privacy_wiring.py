"""train.make_private and securerng's installers, fast (issue 21's mutation goals): the collate a DP loader pads
with, the distributed branch (a one-process gloo group: the same code path torchrun's workers take), where the
batches' randomness comes from, and who adds the noise."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from fhirsynth.model import distributed as dd
from fhirsynth.model import securerng
from fhirsynth.model.train import SeqDataset, _quiet_opacus, as_batch, make_private, pad_collate
from fhirsynth.model.transformer import ModelConfig, Transformer, patient_loss

torch.set_num_threads(1)


def _seqs(n: int) -> SeqDataset:
    """Patients of different lengths (3 to 8 tokens): batches need padding."""
    return SeqDataset([([1] + [5 + i % 7] * (1 + i % 6) + [2], [0] * (3 + i % 6)) for i in range(n)])


def _private(ds, *, q: float, secure: bool, seed: int = 1, dctx=None, collate=None, sigma: float = 1.0):
    from opacus import PrivacyEngine

    _quiet_opacus()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=20, max_len=12, d_model=8, n_layers=1, n_heads=1, d_ff=16))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return make_private(PrivacyEngine(accountant="prv", secure_mode=False), model, opt, ds, q=q,
                        n_estimate=len(ds), sigma=sigma, max_grad_norm=1.0, batch_size=max(1, round(q * len(ds))),
                        secure=secure, seed=seed, dctx=dctx, collate=collate)


def _batches(loader) -> list[list[int]]:
    return [list(b) for b in loader.batch_sampler]


def test_dp_loader_pads_patients_of_different_lengths_by_default():
    ds = _seqs(12)
    _, _, loader = _private(ds, q=1.0, secure=False)  # q = 1: one batch of everyone
    batch = as_batch(next(iter(loader)))
    assert batch.shape[:2] == (12, 8)
    assert torch.equal(batch, pad_collate([ds[i] for i in range(12)]))


def test_secure_sampling_does_not_follow_torchs_seed():
    """Opacus' Poisson sampler draws from torch's global generator (replayed by torch.manual_seed); after
    install_sampling the batches come from os.urandom and a replayed seed gives other batches."""
    _, _, loader = _private(_seqs(200), q=0.5, secure=False)
    torch.manual_seed(5)
    first = _batches(loader)
    torch.manual_seed(5)
    assert _batches(loader) == first  # the control: Opacus' own sampler replays
    securerng.install_sampling(loader)
    torch.manual_seed(5)
    again = _batches(loader)
    assert again != first and len(again) == len(first) == 2
    torch.manual_seed(5)
    assert _batches(loader) != again


def test_install_sampling_refuses_a_loader_without_poisson_sampling():
    with pytest.raises(TypeError, match=r"^expected Opacus' Poisson sampler, got BatchSampler$"):
        securerng.install_sampling(DataLoader(_seqs(4), batch_size=2, collate_fn=pad_collate))


@pytest.mark.parametrize("q,n", [(0.25, 4), (0.125, 4), (0.5, 10)])
def test_expected_batch_is_q_times_the_estimate_but_at_least_one(q, n):
    """Opacus divides the summed clipped gradients by the expected batch: q n from the DP estimate of n, floored at
    1 (a smaller divisor would scale the noise up, a larger one the signal down)."""
    _, opt, _ = _private(_seqs(n), q=q, secure=False)
    assert opt.expected_batch_size == max(q * n, 1.0)


def test_box_muller_pairs_are_independent():
    """Both outputs of a Box-Muller pair are used: they must be uncorrelated (a wrong angle in one correlates them,
    and correlated noise coordinates break the Gaussian mechanism's analysis)."""
    z = securerng.secure_normal(400_000)
    assert abs(np.corrcoef(z[:200_000], z[200_000:])[0, 1]) < 0.015
    assert abs(z.mean()) < 0.01 and z.std() == pytest.approx(1.0, abs=0.01)


def test_dpnoise_enables_the_opendp_features_it_needs_itself():
    """A fresh interpreter (nothing else has enabled OpenDP's "contrib" measurements) calibrates the same sigma as
    this process and draws noise. (The in-process call also lets mutmut know this test runs `_opendp`.)"""
    import os
    from pathlib import Path

    import fhirsynth
    from fhirsynth.model.dpnoise import gaussian_sigma

    here = gaussian_sigma(1.0, 1e-6, 1.0)
    code = ("from fhirsynth.model.dpnoise import NoiseSource, gaussian_sigma; import numpy as np; "
            "print(repr(gaussian_sigma(1.0, 1e-6, 1.0))); "
            "print(len(NoiseSource.secure_source().gaussian(np.zeros(3, dtype=np.int64), 2.0)))")
    # the package this test imported (under mutmut: its mutants/ copy), not whatever the new interpreter finds
    root = str(Path(fhirsynth.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=root)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [repr(here), "3"]


def _summed_grads(model, opt, loader) -> list[torch.Tensor]:
    """One real DP step up to the noise: per-sample gradients, clipped and summed by Opacus."""
    batch = as_batch(next(iter(loader)))
    patient_loss(model(batch[:, :-1, 0], batch[:, :-1, 1]), batch[:, 1:, 0], 12).sum().backward()
    opt.clip_and_accumulate()
    return [p.summed_grad.clone() for p in opt.params]


def test_secure_noise_is_added_by_rank_zero_only_and_once_per_step():
    model, opt, loader = _private(_seqs(8), q=1.0, secure=True, sigma=2.0)
    summed = _summed_grads(model, opt, loader)
    opt.add_noise()
    noise = torch.cat([(p.grad - s).reshape(-1) for p, s in zip(opt.params, summed)])
    assert noise.std().item() == pytest.approx(2.0, rel=0.1)  # sigma x clip
    # the same summed gradients noised twice would spend the step's budget twice: Opacus' flag refuses it
    with pytest.raises(ValueError, match="zero_grad"):
        opt.add_noise()
    # a distributed worker of rank > 0 passes its sum on unchanged (rank 0 adds the one noise of the step)
    model, opt, loader = _private(_seqs(8), q=1.0, secure=True, sigma=2.0)
    summed = _summed_grads(model, opt, loader)
    opt.rank = 1
    opt.add_noise()
    assert all(torch.equal(p.grad, s) for p, s in zip(opt.params, summed))


@pytest.fixture
def one_process_group(tmp_path):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield dd.DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), owns_group=True)
    finally:
        dist.destroy_process_group()


def test_distributed_branch_samples_with_the_runs_rate_seed_and_source(one_process_group):
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    ds = _seqs(40)
    model, opt, loader = _private(ds, q=0.25, secure=False, seed=3, dctx=one_process_group)
    assert isinstance(model._module, DPDDP)  # Opacus' GradSampleModule around the DDP wrapper
    assert loader.sample_rate == 0.25 and loader.batch_sampler.sample_rate == 0.25
    batches = _batches(loader)
    assert len(batches) == 4 and len(loader) == 4  # round(1 / q) steps
    # replayable noise: the seed decides the batches (per rank and step, not torch's global generator)
    torch.manual_seed(99)
    assert _batches(_private(ds, q=0.25, secure=False, seed=3, dctx=one_process_group)[2]) == batches
    assert _batches(_private(ds, q=0.25, secure=False, seed=4, dctx=one_process_group)[2]) != batches
    # secure: os.urandom, so two loaders of the same seed give other batches
    secure = [_batches(_private(ds, q=0.25, secure=True, seed=3, dctx=one_process_group)[2]) for _ in range(2)]
    assert secure[0] != secure[1] and len(secure[0]) == 4
    # the default collate pads patients of different lengths
    loader = _private(ds, q=1.0, secure=False, seed=3, dctx=one_process_group)[2]
    batch = as_batch(next(iter(loader)))
    assert torch.equal(batch, pad_collate([ds[i] for i in _batches(loader)[0]]))  # q = 1: all, in the shard order


# ---------------------------------------------------------------- the measurement share of the budget
def _tc(**kw):
    from dataclasses import replace

    from fhirsynth.model.config import TrainConfig

    # every fraction given here: the defaults are a policy that may change, the rules below are not
    base = dict(dp=True, epsilon=1.0, delta=1e-6, vocab_epsilon_fraction=0.3, vocab_delta_fraction=0.3,
                measure_epsilon_fraction=0.1, measure_delta_fraction=0.1)
    return replace(TrainConfig(), **{**base, **kw})


@pytest.mark.parametrize("kw", [{"measure_epsilon_fraction": 1.0}, {"measure_epsilon_fraction": -0.1},
                                {"measure_delta_fraction": 1.0}, {"measure_delta_fraction": -0.1},
                                {"measure_delta_fraction": 0.0}, {"measure_epsilon_fraction": 0.0}])
def test_measurement_fractions_are_in_0_1_and_both_zero_or_both_positive(kw):
    from fhirsynth.errors import PrivacyBudgetError
    from fhirsynth.model.train import _validate

    with pytest.raises(PrivacyBudgetError) as err:
        _validate(_tc(**kw))
    assert err.value.message == f"must be in [0, 1) (got {_tc(**kw).measure_epsilon_fraction})"
    assert err.value.where == "--measure-epsilon-fraction"


def test_measurement_and_vocabulary_shares_must_leave_training_some():
    from fhirsynth.errors import PrivacyBudgetError
    from fhirsynth.model.train import _validate

    _validate(_tc(measure_epsilon_fraction=0.0, measure_delta_fraction=0.0))  # no measurements at all
    _validate(_tc(vocab_delta_fraction=0.5, measure_delta_fraction=0.44))
    for kw in ({"vocab_delta_fraction": 0.5, "measure_delta_fraction": 0.45},
               {"vocab_epsilon_fraction": 0.5, "measure_epsilon_fraction": 0.45}):
        with pytest.raises(PrivacyBudgetError) as err:
            _validate(_tc(**kw))
        assert err.value.message == "the vocabulary and measurement shares leave (almost) nothing for training"
        assert err.value.where == "--measure-epsilon-fraction"


def test_measurement_fraction_is_checked_without_dp_too():
    from fhirsynth.errors import UsageError
    from fhirsynth.model.train import _validate

    _validate(_tc(dp=False, measure_epsilon_fraction=0.0, measure_delta_fraction=0.0))
    for value in (1.0, 1.5):
        with pytest.raises(UsageError) as err:
            _validate(_tc(dp=False, measure_epsilon_fraction=value))
        assert err.value.message == f"--measure-epsilon-fraction must be in [0, 1) (got {value})"


def test_privacy_report_names_the_measurement_mechanism_or_its_absence():
    from fhirsynth.model.train import _privacy_report

    args = (500, 1.3, 0.02, 800, 6.1, 6.4, {"mechanism": "m", "epsilon": 0.5, "epsilon_total": 1.2,
                                            "delta_total": 4e-6})
    composed = {"epsilon": 7.9, "delta_conversion": 9.7e-6, "delta_thresholds": 3e-7, "rho": {}}
    with_meas = _privacy_report(_tc(epsilon=8.0), *args, {"mechanism": "x", "epsilon": 0.8, "delta": 1e-6},
                                composed)
    assert with_meas["mechanisms"]["measurements"] == ("calibration statistics (measurements.json): discrete Gaussian "
                                                       "per family, zCDP composition (see measurements)")
    without = _privacy_report(_tc(epsilon=8.0, measure_epsilon_fraction=0.0, measure_delta_fraction=0.0), *args, None,
                              composed)
    assert without["mechanisms"]["measurements"] == "none (measurement share 0)"
    assert (without["epsilon_measurements"], without["delta_measurements"]) == (0.0, 0.0)
    assert (with_meas["epsilon_measurements"], with_meas["delta_measurements"]) == (0.8, 1e-6)
