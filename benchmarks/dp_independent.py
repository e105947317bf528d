"""The simplest DP peer of a generator, for benchmarks/bench_records.py: per-code patient counts released once
with the Gaussian mechanism, then every code drawn independently per synthetic patient.

What it can be compared on: per-code patient prevalence (what it releases) and patient-level co-occurrence (which
it can only get from independence: P(a and b) = P(a) P(b)). It has no visits, times or values.

Mechanism (add / remove one patient):
  * each patient's distinct (kind, system, code) keys of conditions and observations, at most `max_codes` of them
    (a seeded random choice, independent of everyone else's data), plus one count of the patient itself;
  * the vector of these counts has L2 sensitivity sqrt(max_codes + 1); discrete Gaussian noise (dpnoise.py, the
    project's secret noise source by default) with sigma calibrated by OpenDP for (epsilon, delta / 2);
  * the key set is the data's, so a key is released only when its noisy count reaches the set-union threshold
    (dpnoise.set_union_threshold at delta / 2): a key held by one patient alone passes with probability below
    delta / 2 (the same argument as the vocabulary's release, vocab.py).
So the release is (epsilon, delta)-DP; the epsilon is OpenDP's for the calibrated sigma.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, datetime, timezone

import numpy as np

from fhirsynth.model.dpnoise import NoiseSource, gaussian_epsilon, gaussian_sigma, set_union_threshold
from fhirsynth.timeline.types import Event, PatientInfo, Timeline

KINDS = ("condition", "observation")


@dataclass
class Release:
    keys: list[tuple[str, str, str]]  # (kind, system, code) released
    counts: np.ndarray  # their noisy patient counts (clipped at 0)
    n_patients: float  # the noisy patient count (at least 1)
    sigma: float
    threshold: float
    epsilon: float  # OpenDP's epsilon of the Gaussian part at delta / 2
    delta: float
    n_candidates: int  # distinct keys in the data (not released: what the threshold removed is private)


def patient_keys(tl: Timeline) -> set[tuple[str, str, str]]:
    return {(e.kind, e.system, e.code) for e in tl.events if e.kind in KINDS}


def release_counts(timelines: list[Timeline], epsilon: float, delta: float, *, max_codes: int = 256,
                   noise: NoiseSource | None = None, seed: int = 0) -> Release:
    """The DP per-code patient counts of the cohort (see the module docstring)."""
    if not epsilon > 0 or not 0 < delta < 1:
        raise ValueError(f"epsilon must be > 0 and 0 < delta < 1 (got {epsilon}, {delta})")
    noise = noise or NoiseSource.secure_source()
    rng = np.random.default_rng(seed)
    counts: dict[tuple[str, str, str], int] = {}
    for tl in timelines:
        keys = sorted(patient_keys(tl))
        if len(keys) > max_codes:  # bound the contribution: a random choice, independent of the others' data
            keys = [keys[i] for i in rng.choice(len(keys), size=max_codes, replace=False)]
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
    sens = math.sqrt(max_codes + 1)
    sigma = gaussian_sigma(epsilon, delta / 2, sens)
    keys = sorted(counts)
    raw = np.array([counts[k] for k in keys] + [len(timelines)], dtype=np.int64)
    noisy = noise.gaussian(raw, sigma).astype(np.float64)
    thr = set_union_threshold(sigma, delta / 2, max_codes)
    keep = noisy[:-1] >= thr
    return Release(keys=[k for k, ok in zip(keys, keep) if ok], counts=np.clip(noisy[:-1][keep], 0, None),
                   n_patients=max(float(noisy[-1]), 1.0), sigma=sigma, threshold=thr,
                   epsilon=gaussian_epsilon(sigma, delta / 2, sens), delta=delta, n_candidates=len(keys))


def exact_counts(timelines: list[Timeline]) -> Release:
    """The same shape without noise or threshold (the epsilon = infinity column): every key, its exact count."""
    counts: dict[tuple[str, str, str], int] = {}
    for tl in timelines:
        for k in patient_keys(tl):
            counts[k] = counts.get(k, 0) + 1
    keys = sorted(counts)
    return Release(keys=keys, counts=np.array([counts[k] for k in keys], dtype=np.float64),
                   n_patients=float(max(len(timelines), 1)), sigma=0.0, threshold=0.0, epsilon=math.inf,
                   delta=0.0, n_candidates=len(keys))


def sample(release: Release, n: int, seed: int, when: date = date(2020, 1, 1)) -> list[Timeline]:
    """n patients, each released code present independently with its noisy prevalence (one event per code, all
    on one day: this peer has no times)."""
    rng = np.random.default_rng(seed)
    p = np.clip(release.counts / release.n_patients, 0.0, 1.0)
    t = datetime(when.year, when.month, when.day, tzinfo=timezone.utc)
    out = []
    for i in range(n):
        present = np.nonzero(rng.random(len(p)) < p)[0]
        events = [Event(time=t, kind=release.keys[j][0], system=release.keys[j][1], code=release.keys[j][2])
                  for j in present]
        out.append(Timeline(PatientInfo(patient_id=f"indep-{i}", birth_date=date(1970, 1, 1)), events))
    return out
