"""The independent-codes DP peer of benchmarks/bench_records.py: a real Gaussian release of per-code patient
counts (bounded contributions, set-union threshold) and independent draws from it."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from bench_module import benchmark_module
from test_model_helpers import make_timelines

from fhirsynth.model.dpnoise import NoiseSource, gaussian_sigma
from fhirsynth.timeline.types import Event

dpi = benchmark_module("dp_independent")


def _cohort(n: int = 400):
    tls = make_timelines(n, seed=11)
    tl = next(t for t in tls if t.events)
    t = tl.events[0].time
    tl.events.append(Event(time=t, kind="condition", system="http://snomed.info/sct", code="only-one"))
    return tls


def test_release_is_near_the_true_prevalence_and_hides_single_patient_codes():
    tls = _cohort()
    rel = dpi.release_counts(tls, 8.0, 1e-5, max_codes=16, noise=NoiseSource.reproducible(3), seed=1)
    assert math.isclose(rel.sigma, gaussian_sigma(8.0, 0.5e-5, math.sqrt(17)))
    assert rel.epsilon <= 8.0 * (1 + 1e-6)
    assert ("condition", "http://snomed.info/sct", "only-one") not in rel.keys  # one patient: under the threshold
    assert abs(rel.n_patients - len(tls)) < 6 * rel.sigma
    true = {}
    for tl in tls:
        for k in dpi.patient_keys(tl):
            true[k] = true.get(k, 0) + 1
    # every patient keeps at most 16 codes, so a count can only fall (bounded contribution) or move by noise
    for k, c in zip(rel.keys, rel.counts):
        assert c <= true[k] + 6 * rel.sigma
    common = [(k, c) for k, c in zip(rel.keys, rel.counts) if true[k] > 0.5 * len(tls)]
    assert common  # the cohort has codes most patients hold, and they are released


def test_codes_are_drawn_independently_at_the_released_prevalence():
    rel = dpi.Release(keys=[("condition", "s", "a"), ("condition", "s", "b"), ("observation", "s", "c")],
                      counts=np.array([500.0, 250.0, 0.0]), n_patients=1000.0, sigma=1.0, threshold=1.0,
                      epsilon=1.0, delta=1e-5, n_candidates=3)
    tls = dpi.sample(rel, 4000, seed=2)
    has = np.array([[("condition", "s", "a") in dpi.patient_keys(t), ("condition", "s", "b") in dpi.patient_keys(t),
                     ("observation", "s", "c") in dpi.patient_keys(t)] for t in tls])
    assert abs(has[:, 0].mean() - 0.5) < 0.03 and abs(has[:, 1].mean() - 0.25) < 0.03 and not has[:, 2].any()
    assert abs((has[:, 0] & has[:, 1]).mean() - 0.125) < 0.02  # independence
    assert dpi.sample(replace(rel, counts=np.array([2000.0, 0.0, 0.0])), 10, seed=1)[0].events  # p clipped at 1


def test_exact_counts_are_every_code_at_its_true_patient_count():
    tls = _cohort(60)
    rel = dpi.exact_counts(tls)
    true: dict = {}
    for tl in tls:
        for k in dpi.patient_keys(tl):
            true[k] = true.get(k, 0) + 1
    assert rel.keys == sorted(true) and ("condition", "http://snomed.info/sct", "only-one") in rel.keys
    assert [int(c) for c in rel.counts] == [true[k] for k in rel.keys]
    assert rel.n_patients == 60 and rel.epsilon == math.inf
