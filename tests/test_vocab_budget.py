"""Issue 15: the vocabulary's share of the budget and its per-patient bound k chosen from the cohort size."""

from __future__ import annotations

import math
from datetime import date, datetime, timedelta, timezone

import pytest

from fhirsynth.model.config import TokenizerConfig
from fhirsynth.model.dpnoise import NoiseSource, gaussian_sigma, set_union_threshold
from fhirsynth.model.valuekinds import KIND_EPSILON_FRACTION
from fhirsynth.model.vocab import (AUTO_ITEMS_LADDER, AUTO_THRESHOLD_SHARE, auto_items_per_patient, build_vocab,
                                   split_preprocessing)
from fhirsynth.timeline.types import Event, PatientInfo, Timeline


def threshold(k: int, eps: float, delta: float) -> float:
    return set_union_threshold(gaussian_sigma(eps, delta / 2, math.sqrt(k)), delta, k)


@pytest.mark.parametrize("n", [20, 120, 200, 800, 100_000])
@pytest.mark.parametrize("eps", [0.24, 1.92])
def test_auto_k_is_the_largest_whose_threshold_fits_the_cohort(n, eps):
    delta = 4.5e-7
    k = auto_items_per_patient(n, eps, delta)
    assert k in AUTO_ITEMS_LADDER
    fits = [j for j in AUTO_ITEMS_LADDER if threshold(j, eps, delta) <= AUTO_THRESHOLD_SHARE * n]
    assert k == (max(fits) if fits else AUTO_ITEMS_LADDER[0])


def test_auto_k_grows_with_the_cohort_and_the_budget():
    ks = [auto_items_per_patient(n, 1.92, 4.5e-7) for n in (60, 120, 400, 5000)]
    assert ks == sorted(ks) and ks[0] < ks[-1] == AUTO_ITEMS_LADDER[-1]
    assert auto_items_per_patient(120, 0.24, 4.5e-7) < auto_items_per_patient(120, 1.92, 4.5e-7)


def test_items_get_most_of_the_preprocessing_budget():
    parts = split_preprocessing(1.0, 1e-6)
    # in zCDP rho (what adds up): the items' Gaussian (sensitivity 1) against every other part
    items = 1 / (2 * gaussian_sigma(parts.items[0], parts.items[1] / 2, 1.0) ** 2)
    kinds = 1 / (2 * gaussian_sigma(*parts.kinds, 1.0) ** 2)
    values = 1 / (2 * gaussian_sigma(parts.values[0], parts.values[1] / 2, 1.0) ** 2)
    assert items > max(kinds, values, parts.sex ** 2 / 2, parts.death ** 2 / 2)
    assert items / kinds == pytest.approx((1 - KIND_EPSILON_FRACTION) / KIND_EPSILON_FRACTION, rel=5e-3)


def _cohort(n: int) -> list[Timeline]:
    t0 = datetime(2020, 1, 1, tzinfo=timezone.utc)
    out = []
    for i in range(n):
        evs = [Event(time=t0 + timedelta(days=j), kind="condition", system="http://snomed.info/sct",
                     code=str(900000 + j)) for j in range(30)]
        out.append(Timeline(PatientInfo(f"p{i}", sex="female" if i % 2 else "male", birth_date=date(1960, 1, 1)),
                            evs))
    return out


def test_build_vocab_uses_the_auto_k_and_reports_it():
    tls = _cohort(150)
    cfg = TokenizerConfig(reference_date="2026-01-01")
    assert cfg.max_items_per_patient == 0  # the default is auto
    _, report = build_vocab(tls, cfg, dp=True, epsilon=1.0, delta=1e-6, noise=NoiseSource.reproducible(3))
    n_hat = report["sex_marginal"]["n_estimate"]
    items_eps = report["epsilon"]
    assert report["max_items_per_patient"] == auto_items_per_patient(n_hat, items_eps, report["delta"])
    assert report["max_items_per_patient"] < AUTO_ITEMS_LADDER[-1]  # 150 patients: smaller than the cap
    assert report["value_kinds"]["max_pairs_per_patient"] == report["max_items_per_patient"]
    fixed = TokenizerConfig(reference_date="2026-01-01", max_items_per_patient=5)
    _, report = build_vocab(tls, fixed, dp=True, epsilon=1.0, delta=1e-6, noise=NoiseSource.reproducible(3))
    assert report["max_items_per_patient"] == 5  # an explicit k is kept
