"""The OS-CSPRNG uniforms, Gaussian noise and Poisson batches have the right distributions (that a default training
run really uses them is tested in test_privacy_guarantee.py)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from fhirsynth.model.securerng import (
    secure_gaussian_noise,
    secure_normal,
    secure_poisson_batches,
    secure_uniform,
)


def _passes_ks(draw, dist: str) -> bool:
    """KS test at p > 1e-4 on a fresh draw, retried once: the draws are the OS's and cannot be replayed, so a
    correct generator fails one test in 10,000 by chance (CI saw p = 7e-6 once); a biased one fails both."""
    return any(stats.kstest(draw(), dist).pvalue > 1e-4 for _ in range(2))


def test_uniform_and_normal_distributions():
    u = secure_uniform(200_000)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert _passes_ks(lambda: secure_uniform(200_000), "uniform")
    assert not np.array_equal(secure_uniform(16), secure_uniform(16))
    z = secure_normal(200_001)
    assert z.shape == (200_001,) and np.isfinite(z).all()
    assert _passes_ks(lambda: secure_normal(200_001), "norm")


def test_gaussian_noise_has_the_requested_std_shape_and_dtype():
    like = torch.zeros(300, 400, dtype=torch.float32)
    noise = secure_gaussian_noise(2.5, like)
    assert noise.shape == like.shape and noise.dtype == torch.float32
    assert abs(float(noise.std()) - 2.5) < 0.03 and abs(float(noise.mean())) < 0.03
    assert _passes_ks(lambda: secure_gaussian_noise(2.5, like).flatten().double().numpy() / 2.5, "norm")
    assert torch.count_nonzero(secure_gaussian_noise(0.0, like)) == 0


def test_poisson_batches_sample_each_patient_with_the_rate():
    sizes = [len(b) for b in secure_poisson_batches(1000, 0.05, 400)]
    assert len(sizes) == 400
    assert abs(np.mean(sizes) - 50) < 2.0 and abs(np.var(sizes) - 1000 * 0.05 * 0.95) < 12
