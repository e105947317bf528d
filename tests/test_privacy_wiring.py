"""train.make_private and securerng's installers, fast (issue 21's mutation goals): the collate a DP loader pads
with, the distributed branch (a one-process gloo group: the same code path torchrun's workers take), where the
batches' randomness comes from, and who adds the noise."""

from __future__ import annotations

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
    # secure: os.urandom, so the same seed gives other batches
    secure_loader = _private(ds, q=0.25, secure=True, seed=3, dctx=one_process_group)[2]
    assert _batches(secure_loader) != _batches(secure_loader)
    # the default collate pads patients of different lengths
    loader = _private(ds, q=1.0, secure=False, seed=3, dctx=one_process_group)[2]
    batch = as_batch(next(iter(loader)))
    assert torch.equal(batch, pad_collate([ds[i] for i in _batches(loader)[0]]))  # q = 1: all, in the shard order
