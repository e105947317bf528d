"""One-run DP audit bound (Steinke, Nasr, Jagielski 2023) on scores whose privacy is known."""

from __future__ import annotations

import math
from datetime import timedelta

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


def test_canaries_carry_every_clinical_kind_with_its_attributes():
    """A drug list or a vaccine history identifies a patient as well as diagnoses do: canaries draw from every
    clinical kind of the pool, each item a copy of a real one (category, status, reason, duration) at the canary's
    own visit."""
    from dataclasses import replace as copy_with

    from fhirsynth.timeline.types import Event

    pool = toy_timelines(30, seed=7)
    rx = "http://www.nlm.nih.gov/research/umls/rxnorm"
    for k, t in enumerate(pool):
        visit = next(e for e in t.events if e.kind == "encounter")
        t.events += [
            Event(time=visit.time, kind="medication", system=rx, code=f"31{k % 3}", display="drug", status="active",
                  value_system="http://snomed.info/sct", value_code="44054006", encounter_id=visit.encounter_id,
                  end_time=visit.time + timedelta(days=30)),
            Event(time=visit.time, kind="immunization", system="http://hl7.org/fhir/sid/cvx", code="140",
                  status="completed", encounter_id=visit.encounter_id)]
    canaries = make_canaries(pool, 40, seed=2)
    items = [(c, e) for c in canaries for e in c.events if e.kind != "encounter"]
    kinds = {e.kind for _, e in items}
    assert {"medication", "immunization", "condition", "observation"} <= kinds
    visits = {(c.patient.patient_id, e.encounter_id): e.time for c in canaries for e in c.events
              if e.kind == "encounter"}
    for c, e in items:
        assert visits[(c.patient.patient_id, e.encounter_id)] == e.time  # at the canary's own visit
        if e.kind == "medication":
            assert (e.status, e.value_code, e.end_time - e.time) == ("active", "44054006", timedelta(days=30))
        if e.kind == "immunization":
            assert copy_with(e, time=None, encounter_id=None) == Event(
                time=None, kind="immunization", system="http://hl7.org/fhir/sid/cvx", code="140",
                status="completed")


def test_canary_runner_with_real_training(tmp_path):
    from fhirsynth.evaluate.audit import run_canary_audit
    from fhirsynth.timeline.io import write_timelines

    write_timelines(toy_timelines(60, seed=6, visits_per_year=0.3), tmp_path / "train")
    res = run_canary_audit(tmp_path / "train", 20, epsilon=1.0, seed=3, workdir=tmp_path / "work",
                           train_kwargs={"epochs": 1, "device": "cpu"})
    assert res["m"] == 20 and res["dp"] is True
    assert not res["exceeds_claim"], res
    assert res["score_auc"] is None or 0.0 <= res["score_auc"] <= 1.0


# ---------------------------------------------------------------- against the paper's own code
def _paper_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """p_value_DP_audit transcribed literally from Steinke, Nasr, Jagielski (2023), Algorithm/Appendix code
    (a plain loop, independent of the vectorised version under test)."""
    from scipy import stats

    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha = 0.0
    total = 0.0
    for i in range(1, v + 1):
        total += stats.binom.pmf(v - i, r, q)
        if total > i * alpha:
            alpha = total / i
    return min(beta + alpha * delta * 2 * m, 1.0)


def _paper_eps(m: int, r: int, v: int, delta: float, p: float) -> float:
    """get_eps_audit from the paper: linear search for an upper end, then 30 bisection steps."""
    lo, hi = 0.0, 1.0
    while _paper_p_value(m, r, v, hi, delta) < p:
        hi += 1
    for _ in range(30):
        mid = (lo + hi) / 2
        if _paper_p_value(m, r, v, mid, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


@pytest.mark.parametrize("m,r,v,eps,delta", [(1000, 200, 180, 2.0, 1e-5), (1000, 200, 200, 5.0, 1e-5),
                                             (100, 20, 14, 0.5, 1e-3), (10000, 1000, 620, 0.3, 1e-6),
                                             (1000, 200, 120, 1.0, 0.0), (50, 50, 0, 1.0, 1e-5)])
def test_p_value_matches_paper_code(m, r, v, eps, delta):
    assert p_value_dp_audit(m, r, v, eps, delta) == pytest.approx(_paper_p_value(m, r, v, eps, delta), rel=1e-9,
                                                                   abs=1e-15)


@pytest.mark.parametrize("m,r,v,delta", [(1000, 200, 200, 1e-5), (1000, 200, 170, 1e-5), (1000, 100, 90, 0.0),
                                         (5000, 1000, 700, 1e-5), (100, 20, 11, 1e-5)])
def test_eps_bound_matches_paper_code(m, r, v, delta):
    assert eps_from_counts(m, r, v, delta, 0.05) == pytest.approx(_paper_eps(m, r, v, delta, 0.05), abs=1e-6)


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_correct_closed_form(r):
    """delta = 0, all r guesses correct: the null is rejected iff q^r < p with q = e^eps / (1 + e^eps), so the
    bound is exactly log(q* / (1 - q*)) with q* = p^(1/r) (r=100: 3.49; r=1000: 5.81 at 95%)."""
    q = 0.05 ** (1 / r)
    expected = math.log(q / (1 - q))
    assert eps_from_counts(10 * r, r, r, 0.0, 0.05) == pytest.approx(expected, abs=1e-6)
    # with delta > 0 the bound can only be weaker, and it is capped by what delta*2m allows
    assert eps_from_counts(10 * r, r, r, 1e-5, 0.05) <= expected + 1e-9


def test_hundred_canaries_cannot_certify_much():
    """Why 100 canaries were uninformative: even perfect guessing of 20 (k = m/5) certifies only ~1.8."""
    best = eps_from_counts(100, 20, 20, 1e-5, 0.05)
    assert 1.0 < best < 2.5
    assert eps_from_counts(1000, 200, 200, 1e-5, 0.05) > 2 * best


def test_audit_guesses_flag_is_checked(tmp_path, capsys):
    from fhirsynth.cli import main
    from fhirsynth.timeline.io import write_timelines

    write_timelines(toy_timelines(10, seed=8), tmp_path / "real")
    rc = main(["evaluate", "--real", str(tmp_path / "real"), "--synthetic", str(tmp_path / "real"),
               "--out", str(tmp_path / "o"), "--audit-canaries", "50", "--audit-guesses", "80"])
    assert rc == 2 and "--audit-guesses" in capsys.readouterr().err
    assert not (tmp_path / "o" / "report.json").exists()
