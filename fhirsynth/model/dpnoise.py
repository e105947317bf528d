"""The one source of noise for every DP statistic released before training (vocabulary, sex and death
shares, value bins, the patient-count estimate).

Default (`NoiseSource.secure()`): OpenDP's integer-valued mechanisms, whose noise comes from the operating
system's CSPRNG and is exact on the integers (no floating-point attack on the Laplace / Gaussian mechanism,
Mironov 2012):
  * `laplace`: discrete Laplace on an integer count vector with L1 sensitivity 1 -> epsilon-DP;
  * `gaussian`: discrete Gaussian (Canonne, Kamath & Steinke 2020) on an integer vector of given L2 sensitivity:
    rho-zCDP, converted to (epsilon, delta) by OpenDP's zCDP -> approximate-DP map. `gaussian_sigma` calibrates the
    scale with OpenDP's own privacy map, so the epsilon is the library's, not ours.
Nothing about this noise is stored or derivable from a seed.

`NoiseSource.reproducible(seed)` draws the same kinds of integer noise from numpy seeded by `seed`: for tests and
research only. Its noise can be replayed from the seed, so a model trained with it has NO privacy guarantee and
its privacy.json says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fhirsynth.errors import PrivacyBudgetError


def _opendp():
    import opendp.prelude as dp

    dp.enable_features("contrib")  # the discrete Laplace / Gaussian measurements are "contrib" in OpenDP
    return dp


def _int_vector_space(dp, metric: str):
    if metric == "l1":
        return dp.vector_domain(dp.atom_domain(T=int)), dp.l1_distance(T=int)
    return dp.vector_domain(dp.atom_domain(T=int)), dp.l2_distance(T=float)


@dataclass
class NoiseSource:
    """Integer noise for count vectors; `secure` says whether it comes from the OS CSPRNG (OpenDP)."""

    secure: bool
    seed: int | None = None
    _rng: np.random.Generator | None = field(default=None, repr=False)

    @classmethod
    def secure_source(cls) -> NoiseSource:
        return cls(secure=True)

    @classmethod
    def reproducible(cls, seed: int) -> NoiseSource:
        return cls(secure=False, seed=seed, _rng=np.random.default_rng(seed))

    @property
    def description(self) -> str:
        if self.secure:
            return "OpenDP discrete Laplace / discrete Gaussian, OS CSPRNG (secret, not reproducible)"
        return "numpy PCG64 seeded from a stored seed: reproducible, NO privacy guarantee"

    def laplace(self, counts: np.ndarray, epsilon: float, what: str) -> tuple[np.ndarray, float]:
        """counts (integers) + discrete Laplace(1/epsilon): epsilon-DP when one patient changes one count by 1.
        Returns the noisy integer counts and the scale."""
        if epsilon is None or not epsilon > 0:
            raise PrivacyBudgetError(f"{what} needs epsilon > 0 (got {epsilon})")
        scale = 1.0 / epsilon
        ints = _as_ints(counts)
        if self.secure:
            dp = _opendp()
            meas = _int_vector_space(dp, "l1") >> dp.m.then_laplace(scale=scale)
            spent = float(meas.map(1))
            if spent > epsilon * (1 + 1e-9):
                raise PrivacyBudgetError(f"{what}: OpenDP accounts epsilon {spent} > {epsilon} (scale {scale})")
            noisy = np.asarray(meas(ints.tolist()) if len(ints) else [], dtype=np.int64)
        else:
            assert self._rng is not None
            # discrete Laplace = difference of two geometric variables with p = 1 - exp(-1/scale)
            p = -math.expm1(-1.0 / scale)
            noisy = ints + self._rng.geometric(p, len(ints)) - self._rng.geometric(p, len(ints))
        return noisy.reshape(np.shape(counts)), scale

    def gaussian(self, counts: np.ndarray, sigma: float) -> np.ndarray:
        """counts (integers) + discrete Gaussian noise of scale sigma (privacy: see gaussian_sigma)."""
        ints = _as_ints(counts)
        if self.secure:
            dp = _opendp()
            meas = _int_vector_space(dp, "l2") >> dp.m.then_gaussian(scale=sigma)
            noisy = np.asarray(meas(ints.tolist()) if len(ints) else [], dtype=np.int64)
        else:
            assert self._rng is not None
            noisy = ints + np.rint(self._rng.normal(0.0, sigma, len(ints))).astype(np.int64)
        return noisy.reshape(np.shape(counts))


def _as_ints(counts: np.ndarray) -> np.ndarray:
    arr = np.asarray(counts).reshape(-1)
    ints = np.rint(arr).astype(np.int64)
    if not np.array_equal(ints, arr):
        raise ValueError("DP counts must be integers")
    return ints


def gaussian_sigma(epsilon: float, delta: float, l2_sensitivity: float) -> float:
    """Smallest discrete-Gaussian scale that OpenDP certifies (epsilon, delta)-DP for this L2 sensitivity
    (zCDP of the discrete Gaussian converted to approximate DP by OpenDP)."""
    if not epsilon > 0 or not 0 < delta < 1:
        raise PrivacyBudgetError(f"the Gaussian mechanism needs epsilon > 0 and 0 < delta < 1 (got {epsilon}, {delta})")
    dp = _opendp()
    space = _int_vector_space(dp, "l2")

    def meas(scale: float):
        return dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(space >> dp.m.then_gaussian(scale=scale)), delta)

    return float(dp.binary_search_param(meas, d_in=float(l2_sensitivity), d_out=(epsilon, delta)))


def gaussian_epsilon(sigma: float, delta: float, l2_sensitivity: float) -> float:
    """OpenDP's epsilon at delta of the discrete Gaussian with this scale (for reports and tests)."""
    dp = _opendp()
    meas = dp.c.make_zCDP_to_approxDP(_int_vector_space(dp, "l2") >> dp.m.then_gaussian(scale=sigma))
    return float(meas.map(float(l2_sensitivity)).epsilon(delta))


def set_union_threshold(sigma: float, delta: float, k: int) -> float:
    """T = 1 + sigma * sqrt(2 ln(2k / delta)): the discrete Gaussian is sigma^2-subgaussian (Canonne et al. 2020,
    Cor. 23), so a key that only the added patient has (count 1) passes T for any of their k keys with probability
    below k * exp(-(T-1)^2 / (2 sigma^2)) = delta / 2 (union bound)."""
    return 1.0 + sigma * math.sqrt(2.0 * math.log(2.0 * k / delta))
