"""The incremental decoding path (KV cache) computes the same logits as the full causal forward pass."""

from __future__ import annotations

import pytest
import torch

from fhirsynth.model.config import ModelConfig
from fhirsynth.model.transformer import Transformer


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_cached_steps_equal_the_full_forward_pass(n_kv_heads: int) -> None:
    cfg = ModelConfig(vocab_size=37, d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, d_ff=64, max_len=24)
    torch.manual_seed(3)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # random weights are near-uniform; scale them up so a wrong cache shows
        for p in model.parameters():
            p.mul_(8.0)
    idx = torch.randint(0, cfg.vocab_size, (5, cfg.max_len))
    ages = torch.randint(0, cfg.n_age_ids, (5, cfg.max_len))
    with torch.no_grad():
        full = model(idx, ages)
    cache = model.new_cache(5, torch.device("cpu"))
    for pos in range(cfg.max_len):
        step = model.step(idx[:, pos], ages[:, pos], pos, cache)
        torch.testing.assert_close(step, full[:, pos], rtol=1e-3, atol=1e-3)


def test_cache_select_keeps_the_chosen_rows() -> None:
    cfg = ModelConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, max_len=8)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (4, cfg.max_len))
    ages = torch.randint(0, cfg.n_age_ids, (4, cfg.max_len))
    with torch.no_grad():
        full = model(idx, ages)
    cache = model.new_cache(4, torch.device("cpu"))
    keep = torch.tensor([3, 1])
    rows = torch.arange(4)
    for pos in range(cfg.max_len):
        if pos == 3:  # rows 0 and 2 finish: the batch shrinks mid-sequence
            cache.select(keep)
            rows = keep
        step = model.step(idx[rows, pos], ages[rows, pos], pos, cache)
        torch.testing.assert_close(step, full[rows, pos], rtol=1e-3, atol=1e-3)


def _learned_share_of_short_records(loss_fn) -> float:
    """Train a tiny model on 20% short and 80% long records that differ in their second token; return the
    probability it learned for the short records' token."""
    cfg = ModelConfig(vocab_size=8, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, max_len=48)
    torch.manual_seed(0)
    model = Transformer(cfg)
    seqs = torch.zeros((50, cfg.max_len), dtype=torch.long)
    seqs[:, 0] = 1  # BOS
    seqs[:10, 1:3] = torch.tensor([2, 3])  # short records: token 2, then one more
    seqs[10:, 1] = 4  # long records: token 4, then 46 tokens
    seqs[10:, 2:] = 5
    ages = torch.zeros_like(seqs)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(150):
        loss_fn(model(seqs[:, :-1], ages[:, :-1]), seqs[:, 1:]).mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        p = torch.softmax(model(seqs[:1, :1], ages[:1, :1])[0, 0], dim=0)
    return float(p[2] / (p[2] + p[4]))


def test_every_token_weighs_the_same_in_the_training_loss() -> None:
    """The patient loss (summed NLL / max_len) learns the data's share of short records (20%); the per-sequence
    mean, which it replaced, inflates it (each token of a short record weighs more)."""
    from fhirsynth.model.transformer import patient_loss, sequence_loss

    assert abs(_learned_share_of_short_records(lambda lg, t: patient_loss(lg, t, 48)) - 0.2) < 0.05
    assert _learned_share_of_short_records(sequence_loss) > 0.5
