"""The privacy accounting of a whole training run: every DP release composed in Rényi DP (issue 15).

A DP training run releases, from the same patients: the sex marginal and the deaths per birth band (discrete
Laplace), the vocabulary's set union, the value kinds and the value bins (discrete Gaussian, two of them with a
threshold), the calibration measurements (discrete Gaussian per family) and the model (DP-SGD). Adding up their
epsilons (basic composition) overstates the loss a lot: at epsilon 8 the release that basic composition called
8.0 was 4.95 in Rényi DP. This module composes them the way the accountants do:

  * discrete Gaussian, L2 sensitivity s, scale sigma: rho-zCDP with rho = s^2 / (2 sigma^2) (Canonne, Kamath,
    Steinke 2020, Thm 14), i.e. RDP a * rho at every order a;
  * discrete Laplace at epsilon (pure DP): RDP min(epsilon, a epsilon^2 / 2) (Bun and Steinke 2016, Prop. 3.3);
  * a threshold on noisy counts (DP set union) fails with probability delta_threshold: that delta is added
    outside the RDP curve (approximate zCDP);
  * DP-SGD: Opacus' RDP of the Poisson-subsampled Gaussian (compute_rdp) for the accountant's history;
  * RDP adds up order by order (adaptive composition, Mironov 2017); the sum is converted to (epsilon, delta_conv)
    by Opacus' get_privacy_spent, delta = delta_conv + the thresholds' deltas.

The budget: the target (epsilon, delta) is a zCDP budget rho_total (the rho whose conversion is epsilon);
the preprocessing and the measurements are calibrated at their shares of rho_total (rho adds up under
composition, epsilon does not), and DP-SGD takes the noise multiplier that fills what the released parts left:
the smallest one whose composed epsilon, with the others' actual RDP, stays at or under the target.
Opacus' PRV accountant cannot take the Laplace and discrete Gaussian parts, so the composed epsilon is RDP's; the
PRV epsilon of the training alone is reported beside it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fhirsynth.errors import PrivacyBudgetError

# Opacus' default orders plus larger ones: small rho (a release alone) reaches its best conversion at high orders
ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64))
                                  + [80, 96, 128, 192, 256, 384, 512, 1024])


@dataclass(frozen=True)
class Release:
    """One DP release of the run, as the accountant sees it."""

    name: str
    rho: float = 0.0  # zCDP parameter (Gaussian releases)
    pure_epsilon: float = 0.0  # pure-DP releases (Laplace)
    threshold_delta: float = 0.0  # failure probability of a threshold, added to delta

    def rdp(self, orders: Iterable[float] = ORDERS) -> np.ndarray:
        a = np.asarray(list(orders), dtype=float)
        e = self.pure_epsilon
        return a * self.rho + np.minimum(e, a * e * e / 2.0)


def gaussian(name: str, sigma: float, sensitivity: float, threshold_delta: float = 0.0) -> Release:
    if not sigma > 0 or not sensitivity > 0:
        raise PrivacyBudgetError(f"{name}: a Gaussian release needs sigma > 0 and sensitivity > 0 "
                                 f"(got {sigma}, {sensitivity})")
    return Release(name, rho=sensitivity ** 2 / (2.0 * sigma ** 2), threshold_delta=threshold_delta)


def laplace(name: str, epsilon: float) -> Release:
    if not epsilon > 0:
        raise PrivacyBudgetError(f"{name}: a Laplace release needs epsilon > 0 (got {epsilon})")
    return Release(name, pure_epsilon=epsilon)


def sgd_rdp(history: Iterable[tuple[float, float, int]], orders: Iterable[float] = ORDERS) -> np.ndarray:
    """RDP of DP-SGD from an Opacus accountant history [(noise_multiplier, sample_rate, steps), ...]."""
    from opacus.accountants.analysis.rdp import compute_rdp

    orders = list(orders)
    total = np.zeros(len(orders))
    for sigma, q, steps in history:
        total += np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders), dtype=float)
    return total


def epsilon_of(rdp: np.ndarray, delta: float, orders: Iterable[float] = ORDERS) -> float:
    """Opacus' conversion of an RDP curve to epsilon at delta."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    if not 0 < delta < 1:
        raise PrivacyBudgetError(f"the conversion needs 0 < delta < 1 (got {delta})")
    if not np.any(rdp > 0):
        return 0.0
    return float(get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)[0])


def rho_budget(epsilon: float, delta: float) -> float:
    """The zCDP rho whose conversion (as epsilon_of does it) is epsilon at delta: the budget in additive units."""
    a = np.asarray(ORDERS)
    lo, hi = 0.0, max(epsilon, 1.0)
    for _ in range(100):
        mid = (lo + hi) / 2
        if epsilon_of(a * mid, delta) <= epsilon:
            lo = mid
        else:
            hi = mid
    return lo


def nominal_epsilon(rho: float, delta: float) -> float:
    """The epsilon at delta of a discrete Gaussian of zCDP rho, as OpenDP converts it: what a release calibrated
    by dpnoise.gaussian_sigma(epsilon, delta, s) must be given to have that rho (sigma = s / sqrt(2 rho))."""
    from fhirsynth.model.dpnoise import gaussian_epsilon

    if not rho > 0:
        raise PrivacyBudgetError(f"a release needs a positive share of the budget (rho {rho})")
    return gaussian_epsilon(1.0 / math.sqrt(2.0 * rho), delta, 1.0)


def releases_of(vocab_report: dict[str, Any], meas_report: dict[str, Any] | None) -> list[Release]:
    """The Release of every mechanism in the vocabulary's and the measurements' reports (as train.py writes them
    into privacy.json). A report part that spent budget but is not known here is an error, never left out."""
    out: list[Release] = []
    known = {"sex_marginal", "death_by_birth_band", "value_bins", "value_kinds"}
    out.append(gaussian("vocabulary items", vocab_report["sigma"], math.sqrt(vocab_report["max_items_per_patient"]),
                        vocab_report["delta"] / 2.0))  # set_union_threshold: delta / 2 for the threshold
    for key in ("sex_marginal", "death_by_birth_band"):
        out.append(laplace(key, vocab_report[key]["epsilon"]))
    bins = vocab_report["value_bins"]
    out.append(gaussian("value_bins", bins["sigma"], math.sqrt(2 * bins["max_codes_per_patient"]),
                        bins["delta"] / 2.0))
    kinds = vocab_report["value_kinds"]
    out.append(gaussian("value_kinds", kinds["sigma"], math.sqrt(kinds["max_pairs_per_patient"])))
    for key, part in vocab_report.items():
        if isinstance(part, dict) and part.get("epsilon") is not None and key not in known:
            raise PrivacyBudgetError(f"the vocabulary report holds a release the accountant does not know: {key}")
    if meas_report is not None:
        for fam, part in meas_report["families"].items():
            out.append(gaussian(f"measurements.{fam}", part["sigma"], part["sensitivity"]))
    return out


def released_rdp(releases: Iterable[Release]) -> np.ndarray:
    return sum((r.rdp() for r in releases), np.zeros(len(ORDERS)))


def conversion_delta(releases: Iterable[Release], delta: float) -> float:
    """delta minus the thresholds' failure probabilities: the delta the summed RDP curve is converted at."""
    d_thr = sum(r.threshold_delta for r in releases)
    if not delta - d_thr > 0:
        raise PrivacyBudgetError(f"the thresholds' delta {d_thr:g} leaves nothing of delta {delta:g}")
    return delta - d_thr


def compose(releases: list[Release], history: list[tuple[float, float, int]], delta: float) -> dict[str, Any]:
    """The composed guarantee: epsilon at delta - the thresholds' deltas, and the parts."""
    d_conv = conversion_delta(releases, delta)
    total = released_rdp(releases) + sgd_rdp(history)
    return {"epsilon": epsilon_of(total, d_conv), "delta": delta, "delta_conversion": d_conv,
            "delta_thresholds": delta - d_conv,
            "rho": {r.name: (r.rho if r.rho else r.pure_epsilon ** 2 / 2.0) for r in releases}}


def sgd_noise_multiplier(epsilon: float, delta_conv: float, q: float, steps: int, released: np.ndarray,
                         *, tolerance: float = 0.005) -> float:
    """The smallest noise multiplier (to `tolerance` in epsilon) whose DP-SGD, composed with the released parts'
    RDP, stays at or under epsilon at delta_conv."""
    def eps(sigma: float) -> float:
        return epsilon_of(released + sgd_rdp([(sigma, q, steps)]), delta_conv)

    spent = epsilon_of(released, delta_conv)
    if spent >= epsilon:
        raise PrivacyBudgetError(f"the releases before training already spend epsilon {spent:.3f} of {epsilon:g}: "
                                 "lower their shares")
    lo, hi = 0.0, 1.0
    e_hi = eps(hi)  # each multiplier's epsilon is computed once (compute_rdp over every order)
    while e_hi > epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise PrivacyBudgetError(f"cannot reach epsilon={epsilon:g} with sample rate {q:g} and {steps} steps")
        e_hi = eps(hi)
    while hi - lo > 1e-4 and not (e_hi > epsilon - tolerance):
        mid = (lo + hi) / 2
        e_mid = eps(mid)
        if e_mid > epsilon:
            lo = mid
        else:
            hi, e_hi = mid, e_mid
    return hi
