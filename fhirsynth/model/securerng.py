"""The default DP-SGD randomness: Poisson sampling and Gaussian noise from the OS CSPRNG (os.urandom).

Opacus' own secure mode needs torchcsprng, which has no build for current torch releases. This module protects
the same two random choices with the OS generator instead:
  * which patients are in each batch (Poisson sampling): one 53-bit uniform per patient per step;
  * the Gaussian noise: Box-Muller on 53-bit uniforms, and, like Opacus' secure mode against floating-point
    attacks on the Gaussian mechanism (Holohan & Braghin 2021, sect. 5.1), every noise value is the sum of four
    draws of std sigma, halved (still std sigma).
A pseudo-random generator, however well seeded, is a deterministic expansion whose state can in principle be
recovered; os.urandom is the kernel's CSPRNG. Cost: 8 bytes per uniform, so ~4 x 8 bytes per noise value per
step (about 0.1 s per step for the default 1M-parameter model). Runs are not reproducible by design; a
resumed secure run continues with the stored accountant state, so its epsilon is still exact.
"""

from __future__ import annotations

import math
import os
import types

import numpy as np
import torch

_TWO_POW_53 = float(2**53)


def secure_uniform(n: int) -> np.ndarray:
    """n floats uniform on [0, 1) with 53 random bits each, from os.urandom."""
    bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return bits.astype(np.float64) / _TWO_POW_53


def secure_normal(n: int) -> np.ndarray:
    """n standard normal float64 values (Box-Muller, both outputs used)."""
    half = (n + 1) // 2
    u1 = 1.0 - secure_uniform(half)  # (0, 1]: log is finite
    u2 = secure_uniform(half)
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2.0 * math.pi * u2), r * np.sin(2.0 * math.pi * u2)])
    return z[:n]


def secure_gaussian_noise(std: float, like: torch.Tensor) -> torch.Tensor:
    """Noise N(0, std^2) shaped like `like`: the sum of four N(0, std^2) draws, halved (floating-point safe)."""
    if std == 0:
        return torch.zeros_like(like)
    n = like.numel()
    z = sum(secure_normal(n) for _ in range(4)) * (std / 2.0)
    return torch.from_numpy(z).to(dtype=like.dtype, device=like.device).view_as(like)


def secure_poisson_batches(num_samples: int, sample_rate: float, steps: int):
    """Index lists of `steps` Poisson-sampled batches (each sample in with probability sample_rate)."""
    for _ in range(steps):
        yield np.flatnonzero(secure_uniform(num_samples) < sample_rate).tolist()


def _secure_iter(sampler):  # noqa: ANN001 - Opacus' UniformWithReplacementSampler
    return secure_poisson_batches(sampler.num_samples, sampler.sample_rate, sampler.steps)


def install_sampling(loader) -> None:  # noqa: ANN001 - Opacus' DPDataLoader
    """Switch a make_private()'d Poisson data loader to the OS CSPRNG."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sampler = loader.batch_sampler
    if not isinstance(sampler, UniformWithReplacementSampler):
        raise TypeError(f"expected Opacus' Poisson sampler, got {type(sampler).__name__}")
    # DataLoader forbids replacing its batch_sampler, so the instance gets a subclass whose __iter__ is secure
    sampler.__class__ = type("SecureUniformWithReplacementSampler", (type(sampler),), {"__iter__": _secure_iter})


def install_noise(optimizer) -> None:  # noqa: ANN001 - Opacus' DPOptimizer or DistributedDPOptimizer
    """Switch a make_private()'d optimizer's Gaussian noise to the OS CSPRNG. In distributed training only rank 0
    adds noise (as Opacus' DistributedDPOptimizer does); the others pass their summed gradients on."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    def add_noise(self) -> None:  # mirrors DPOptimizer.add_noise with the secure noise source
        std = self.noise_multiplier * self.max_grad_norm if getattr(self, "rank", 0) == 0 else 0.0
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + secure_gaussian_noise(std, p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = types.MethodType(add_noise, optimizer)
    optimizer.secure_mode = True
