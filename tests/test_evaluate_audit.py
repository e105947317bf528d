"""One-run DP audit bound (Steinke, Nasr, Jagielski 2023) on scores whose privacy is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fhirsynth.evaluate.audit import eps_from_counts, eps_lower_bound, make_canaries, p_value_dp_audit
from fhirsynth.evaluate.toy import toy_timelines


def _randomized_response(m: int, eps: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Canary scores from an eps-DP mechanism: each canary's bit is reported truthfully w.p. e^eps/(1+e^eps)."""
    rng = np.random.default_rng(seed)
    inc = rng.random(m) < 0.5
    truthful = rng.random(m) < 1 / (1 + math.exp(-eps))
    out = np.where(truthful, inc, ~inc).astype(float)
    return out + rng.random(m) * 1e-3, inc  # tiny jitter only orders the guesses


def test_all_guesses_correct_gives_positive_epsilon():
    rng = np.random.default_rng(0)
    inc = rng.random(1000) < 0.5
    res = eps_lower_bound(inc.astype(float) + rng.random(1000) * 1e-3, inc, 200, delta=1e-5)
    assert res["correct"] == res["guesses"] == 200
    assert res["eps_lower_bound"] > 3.0


def test_random_scores_give_about_zero():
    bounds = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        inc = rng.random(1000) < 0.5
        bounds.append(eps_lower_bound(rng.random(1000), inc, 200, delta=1e-5)["eps_lower_bound"])
    assert np.mean(bounds) < 0.1 and max(bounds) < 0.5


@pytest.mark.parametrize("eps", [0.5, 2.0])
def test_bound_does_not_exceed_true_epsilon(eps):
    """Against an exactly eps-DP mechanism the bound may exceed eps only with probability <= p (0.05)."""
    bounds = [eps_lower_bound(*_randomized_response(2000, eps, seed), 1000, delta=0.0)["eps_lower_bound"]
              for seed in range(20)]
    assert sum(b > eps for b in bounds) <= 3
    assert np.median(bounds) > 0.3 * eps  # and the audit is not vacuous


def test_p_value_is_monotone_and_validates():
    ps = [p_value_dp_audit(100, 50, 40, e, 1e-5) for e in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(a <= b for a, b in zip(ps, ps[1:]))
    assert eps_from_counts(100, 0, 0, 1e-5) == 0.0
    with pytest.raises(ValueError):
        p_value_dp_audit(10, 20, 5, 1.0, 1e-5)
    with pytest.raises(ValueError):
        eps_lower_bound([1.0, 2.0], [True], 1, 1e-5)
    with pytest.raises(ValueError):
        eps_lower_bound([1.0, 2.0], [True, False], (2, 1), 1e-5)


def test_asymmetric_guesses_and_delta_weaken_bound():
    scores, inc = _randomized_response(1000, 3.0, 0)
    a = eps_lower_bound(scores, inc, (100, 0), delta=0.0)
    assert a["k_plus"] == 100 and a["k_minus"] == 0
    strict = eps_lower_bound(scores, inc, 200, delta=0.0)["eps_lower_bound"]
    loose = eps_lower_bound(scores, inc, 200, delta=1e-3)["eps_lower_bound"]
    assert loose <= strict


def test_make_canaries_use_pool_codes():
    pool = toy_timelines(20, seed=5)
    canaries = make_canaries(pool, 8, seed=1)
    assert len(canaries) == 8 and len({c.patient.patient_id for c in canaries}) == 8
    pool_codes = {e.code for t in pool for e in t.events}
    assert all(e.code in pool_codes for c in canaries for e in c.events if e.kind != "encounter")
    sequences = {tuple(e.code for e in c.events) for c in canaries}
    assert len(sequences) == 8  # distinct, memorisable trajectories


def test_canary_runner_with_real_training(tmp_path):
    pytest.importorskip("fhirsynth.model.train")
    pytest.importorskip("fhirsynth.model.scoring")
    from fhirsynth.evaluate.audit import run_canary_audit
    from fhirsynth.timeline.io import write_timelines

    write_timelines(toy_timelines(60, seed=6, visits_per_year=0.3), tmp_path / "train")
    res = run_canary_audit(tmp_path / "train", 20, epsilon=1.0, seed=3, workdir=tmp_path / "work",
                           train_kwargs={"epochs": 1, "device": "cpu"})
    assert res["m"] == 20 and res["dp"] is True
    assert not res["exceeds_claim"], res
