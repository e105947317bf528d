"""Value bins for numeric observation codes without a public reference range, released under DP.

Codes of mappings/reference-ranges.toml get public bins (bins.py). Any other observation code the DP vocabulary
released (a lab of another generator, a local score) would otherwise lose its values. For those codes:
  * each patient contributes at most m codes (the ones they have most values of; ties by code), and for each
    one value, their median in their most frequent unit for it, plus that unit;
  * a histogram of those values per code over a fixed public grid (symmetric log scale, 16 cells per decade
    from 1e-4 to 1e6, a cell around 0, negatives mirrored) and a count per (code, unit) get discrete Gaussian
    noise (dpnoise.py: OpenDP, OS CSPRNG); one patient changes 2m counts by 1, so the L2 sensitivity is sqrt(2m)
    and sigma is calibrated by OpenDP for (epsilon, delta / 2);
  * a unit string is released only if its noisy count passes T = 1 + sigma * sqrt(2 ln(2m / delta)) (DP set
    union: a string only the added patient has is released with probability below delta / 2 over their m);
    the code takes the released unit with the largest count, or gets no bins;
  * the edges are post-processing of the noisy histogram: the range runs over the cells whose noisy count
    passes T, inner edges at the N_BINS-quantiles of the clipped noisy counts (linear inside a cell), rounded
    to 3 significant digits.
With dp=False the same computation runs on exact counts with threshold min_count (no privacy).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

from fhirsynth.model.bins import ValueBins
from fhirsynth.model.dpnoise import NoiseSource, gaussian_sigma, set_union_threshold
from fhirsynth.model.vocab import Item
from fhirsynth.timeline.types import Timeline

N_BINS = 8  # bins per private code (public setting)
# 16 cells per decade (15% wide): finer cells resolve quantiles better but each holds fewer patients, and a
# cell must pass the threshold (several sigma) to count as support
_POS = 10.0 ** (np.arange(-64, 97) / 16.0)  # 1e-4 .. 1e6
GRID = np.concatenate([-_POS[::-1], _POS])  # cell i = [GRID[i], GRID[i+1]); the cell [-1e-4, 1e-4) holds 0
CodeKey = tuple[str, str]


def _cell(x: float) -> int:
    return int(min(max(np.searchsorted(GRID, x, side="right") - 1, 0), len(GRID) - 2))


def patient_contributions(tl: Timeline, codes: set[CodeKey], m: int) -> dict[CodeKey, tuple[float, str]]:
    """(median value, unit) of at most m of the given codes for one patient."""
    by_code: dict[CodeKey, list[tuple[float, str]]] = {}
    for ev in tl.events:
        key = (ev.system, ev.code)
        if ev.kind == "observation" and ev.value is not None and ev.unit and key in codes \
                and math.isfinite(ev.value):
            by_code.setdefault(key, []).append((float(ev.value), ev.unit))
    chosen = sorted(by_code, key=lambda k: (-len(by_code[k]), k))[:m]
    out = {}
    for key in chosen:
        unit = Counter(u for _, u in by_code[key]).most_common(1)[0][0]
        out[key] = (statistics.median(v for v, u in by_code[key] if u == unit), unit)
    return out


def _round_sig(x: float, digits: int = 3) -> float:
    return 0.0 if x == 0 else round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def _edges(counts: np.ndarray, threshold: float) -> tuple[float, ...] | None:
    """Bin edges from a (noisy) grid histogram, or None when too little mass passes the threshold."""
    support = np.nonzero(counts >= threshold)[0]
    if len(support) == 0:
        return None
    first, last = int(support[0]), int(support[-1])
    mass = np.clip(counts[first:last + 1], 0.0, None)
    cum = np.concatenate([[0.0], np.cumsum(mass)])
    zero = _cell(0.0)  # the cell around 0 stands for 0 itself: no invented negatives or 1e-4 steps
    lo = 0.0 if first == zero else float(GRID[first])
    hi = 0.0 if last == zero - 1 else float(GRID[last + 1])
    inner = []
    for q in np.arange(1, N_BINS) / N_BINS:
        target = q * cum[-1]
        i = int(min(np.searchsorted(cum, target, side="right") - 1, len(mass) - 1))
        frac = (target - cum[i]) / mass[i] if mass[i] > 0 else 0.0
        a, b = GRID[first + i], GRID[first + i + 1]
        inner.append(_round_sig(float(a + frac * (b - a))))
    edges = sorted({_round_sig(lo), *[e for e in inner if lo < e < hi], _round_sig(hi)})
    return tuple(edges) if len(edges) >= 2 else None


def _decimals(edges: tuple[float, ...]) -> int:
    """Enough decimals for 3 significant digits of the smallest non-zero edge magnitude (at most 4)."""
    mags = [abs(e) for e in edges if e != 0]
    if not mags:
        return 0
    return int(min(max(2 - math.floor(math.log10(min(mags))), 0), 4))


def release_value_bins(
    timelines: Iterable[Timeline],
    items: list[Item],
    *,
    public_codes: set[CodeKey],
    m: int,
    dp: bool,
    epsilon: float | None,
    delta: float | None,
    min_count: int,
    noise: NoiseSource,
) -> tuple[dict[CodeKey, ValueBins], dict[str, Any]]:
    """Bins for the vocabulary's non-public observation codes; (epsilon, delta)-DP under dp."""
    first_item: dict[CodeKey, Item] = {}
    for it in items:
        key = (it.system or "", it.code or "")
        if it.kind == "observation" and not it.public and key not in public_codes:
            first_item.setdefault(key, it)
    codes = sorted(first_item)
    hist = {c: np.zeros(len(GRID) - 1) for c in codes}
    units: Counter = Counter()
    wanted = set(codes)
    for tl in timelines:
        # the contribution bound is a DP device: without DP every code of every patient counts
        for key, (value, unit) in patient_contributions(tl, wanted, m if dp else len(wanted)).items():
            hist[key][_cell(value)] += 1
            units[(key, unit)] += 1
    if dp:
        if epsilon is None or delta is None:
            raise ValueError("release_value_bins with dp=True needs epsilon and delta")
        sigma = gaussian_sigma(epsilon, delta / 2, math.sqrt(2 * m))
        threshold = set_union_threshold(sigma, delta, m)
        for c in codes:  # fixed order: the noise draw does not depend on dict order
            hist[c] = noise.gaussian(hist[c].astype(np.int64), sigma).astype(np.float64)
        unit_keys = sorted(units)
        noisy = noise.gaussian(np.array([units[k] for k in unit_keys], dtype=np.int64), sigma)
        noisy_units = {k: float(z) for k, z in zip(unit_keys, noisy)}
        report: dict[str, Any] = {
            "mechanism": "discrete gaussian grid histograms of per-patient medians + thresholded unit counts",
            "max_codes_per_patient": m, "sigma": sigma, "threshold": threshold, "epsilon": epsilon, "delta": delta}
    else:
        threshold = float(min_count)
        noisy_units = {k: float(c) for k, c in units.items()}
        report = {"mechanism": "exact counts (no DP)", "min_count": min_count, "epsilon": None, "delta": None}
    best_unit: dict[CodeKey, tuple[float, str]] = {}
    for (c, unit), count in sorted(noisy_units.items()):
        if count >= threshold and (c not in best_unit or count > best_unit[c][0]):
            best_unit[c] = (count, unit)
    out: dict[CodeKey, ValueBins] = {}
    for c in codes:
        edges = _edges(hist[c], threshold) if c in best_unit else None
        if edges is None:
            continue
        it = first_item[c]
        out[c] = ValueBins(c[0], c[1], it.display or c[1], it.category or "laboratory", best_unit[c][1], (),
                           _decimals(edges), edges)
    report.update({"candidate_codes": len(codes), "codes_with_bins": len(out), "bins_per_code": N_BINS})
    return out, report
