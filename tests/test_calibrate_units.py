"""calibrate.py piece by piece (issue 21's mutation goals): the targets read from a release, the fitted weights
against an independent minimisation of the documented objective, the inclusion probabilities against an
independent solution, the systematic draw, and calibrate's report recomputed from the patients it returns."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import brentq, minimize
from test_model_helpers import CodeVocab

from fhirsynth.model import calibrate as cb
from fhirsynth.model import measurements as ms
from fhirsynth.model.dpnoise import NoiseSource
from fhirsynth.timeline.types import Event, PatientInfo, Timeline

T0 = datetime(2020, 1, 1, tzinfo=timezone.utc)
A = ("condition", "http://snomed.info/sct", "1001")
B = ("condition", "http://snomed.info/sct", "1002")
C = ("observation", "http://loinc.org", "1003-1")


def cohort(n: int, share_a: float, seed: int) -> list[Timeline]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        codes = [C] + ([A] if rng.random() < share_a else []) + ([B] if rng.random() < 0.5 else [])
        evs = [Event(time=T0 + timedelta(days=d), kind=k, system=s, code=c, encounter_id=f"e{i}-{d}")
               for d in range(1 + i % 4) for (k, s, c) in codes]
        out.append(Timeline(PatientInfo(f"p{i}", sex="female" if i % 2 else "male",
                                        birth_date=date(1950 + i % 60, 1, 1), deceased=i % 5 == 0), evs))
    return out


def exact_doc(tls: list[Timeline], pair_codes: int = ms.DEFAULT_PAIR_CODES) -> dict:
    return ms.measure(tls, CodeVocab([A, B, C]), dp=False, epsilon=None, delta=None, noise=NoiseSource.reproducible(1),
                      pair_codes=pair_codes)[0]


# ---------------------------------------------------------------- targets and errors
def test_targets_are_clipped_shares_of_the_noisy_patient_count():
    doc = exact_doc(cohort(50, 0.4, 0))
    fams = doc["families"]
    fams["cells"]["counts"] = [10, -3, 0, 5, 0, 0, 0, 0]  # noisy: n_hat = 15 (negatives and zeros add nothing)
    fams["prevalence"]["counts"] = [30, -2, 6]
    for f in fams:
        fams[f]["sigma"] = 0.3 if f == "prevalence" else 0.01
    tg = cb.targets(doc)
    assert tg.n_hat == 15.0
    lo, hi = tg.offsets["prevalence"]
    assert tg.target[lo:hi].tolist() == [1.0, 0.0, 6 / 15]
    assert tg.scale[lo:hi].tolist() == [0.3 / 15] * 3  # sigma in share units
    c_lo, _ = tg.offsets["cells"]
    assert tg.scale[c_lo] == cb.FLOOR  # 0.01 / 15 is below the floor
    assert tg.family_of[lo:hi].tolist() == [tg.families.index("prevalence")] * 3
    # nobody at all: the count is taken as 1
    fams["cells"]["counts"] = [0, -1, 0, 0, 0, 0, 0, 0]
    tg = cb.targets(doc)
    assert tg.n_hat == 1.0 and tg.target[lo:hi].tolist() == [1.0, 0.0, 1.0]


def test_targets_skip_families_without_queries_only():
    tls = cohort(50, 0.4, 0)
    spec_sizes = ms.Spec(codes=[A, B, C], pair_codes=[A, B]).sizes()
    assert spec_sizes["pairs_absent"] == 1
    tg = cb.targets(exact_doc(tls, pair_codes=2))  # A and B are in the 5-95% band: one pair
    assert tg.families == list(spec_sizes) and tg.offsets["pairs_absent"][1] - tg.offsets["pairs_absent"][0] == 1
    tg = cb.targets(exact_doc(tls, pair_codes=0))  # no pair codes: the families over them have no query
    empty = {"pairs_absent", "top_prevalence", "top_held"}
    assert ms.Spec(codes=[A, B, C]).sizes().keys() == spec_sizes.keys()
    assert {f for f, n in ms.Spec(codes=[A, B, C]).sizes().items() if n == 0} == empty
    assert tg.families == [f for f in spec_sizes if f not in empty] and not empty & set(tg.offsets)
    # a cumulative family has one query fewer than its histogram (bucket 0 and above is everyone)
    assert len(tg.target) == sum(n - (f in cb.CUMULATIVE_FAMILIES) for f, n in spec_sizes.items() if f not in empty)
    assert spec_sizes["top_prevalence"] == 2 and spec_sizes["top_held"] == 3  # with A and B: 0, 1 or 2 held


def test_errors_are_max_or_mean_absolute_share_differences():
    Q = sp.csr_matrix(np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1]], dtype=float))
    tg = cb.Targets(spec=None, families=["x", "y", "z"], offsets={"x": (0, 1), "y": (1, 3), "z": (3, 3)},
                    target=np.array([0.5, 0.1, 0.9]), scale=np.full(3, 0.01), family_of=np.array([0, 1, 1]),
                    n_hat=4.0)
    w = np.array([0.4, 0.3, 0.2, 0.1])
    shares = [0.4 + 0.2, 0.3 + 0.2, 0.4 + 0.3 + 0.1]  # weights of the patients holding each query
    gaps = [abs(shares[0] - 0.5), abs(shares[1] - 0.1), abs(shares[2] - 0.9)]
    assert cb.errors(Q, w, tg) == pytest.approx({"x": gaps[0], "y": max(gaps[1:]), "z": 0.0})
    assert cb.errors(Q, w, tg, "mean") == pytest.approx({"x": gaps[0], "y": (gaps[1] + gaps[2]) / 2, "z": 0.0})


def test_tail_counts_combine_the_sum_above_and_the_count_minus_the_sum_below():
    c = np.array([1.0, 2.0, 3.0, 4.0])
    up, sd = cb.tail_counts(c, 0.0, 10.0, 0.0)  # exact: the sums from bucket j up
    assert up.tolist() == [9.0, 7.0, 4.0] and sd.tolist() == [0.0, 0.0, 0.0]
    # noisy: above j sums 3, 2, 1 buckets (variance 3, 2, 1), below j 1, 2, 3 buckets plus the count's variance 0
    tail, sd = cb.tail_counts(c, 1.0, 12.0, 0.0)
    below = np.array([11.0, 9.0, 6.0])  # 12 - 1, 12 - 3, 12 - 6
    v_up, v_below = np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.0, 3.0])
    assert tail == pytest.approx((np.array([9.0, 7.0, 4.0]) / v_up + below / v_below) / (1 / v_up + 1 / v_below))
    assert sd == pytest.approx((1 / v_up + 1 / v_below) ** -0.5)
    # a noisier patient count moves the estimate toward the sums above
    assert np.all(np.abs(cb.tail_counts(c, 1.0, 12.0, 100.0)[0] - [9.0, 7.0, 4.0]) < np.abs(tail - [9.0, 7.0, 4.0]))


def test_the_measured_cohort_meets_every_exact_target_and_lengths_are_cumulative():
    """Exact measurements of a cohort, read back on the same cohort: every query's share is its target; the
    events and visits queries are "at least bucket j" (a patient counts toward every edge up to its bucket), and
    so are the top_held ones ("holds at least j of the pair codes")."""
    tls = cohort(40, 0.3, 2)
    doc = exact_doc(tls, pair_codes=2)
    tg = cb.targets(doc)
    assert set(tg.cumulative) == {"visits", "events", "top_held"}
    Q = cb.query_matrix(tls, tg)
    assert np.allclose(Q.T @ np.full(len(tls), 1 / len(tls)), tg.target)
    lo, hi = tg.offsets["events"]
    n_events = [sum(e.kind in ms.CODE_KINDS for e in tl.events) for tl in tls]
    for i, n in enumerate(n_events):
        row = Q[i, lo:hi].toarray().ravel()
        assert row.tolist() == [1.0 if n >= ms.BUCKET_EDGES[j] else 0.0 for j in range(1, hi - lo + 1)]
    lo, hi = tg.offsets["top_held"]
    pair = set(tg.spec.pair_codes)
    assert hi - lo == len(pair) == 2
    for i, tl in enumerate(tls):
        k = len({(e.kind, e.system, e.code) for e in tl.events} & pair)
        assert Q[i, lo:hi].toarray().ravel().tolist() == [1.0 if k >= j else 0.0 for j in range(1, 3)]


# ---------------------------------------------------------------- fit_weights
def _problem():
    """12 pooled patients, 6 queries in two families of different sizes; the targets are reachable except one."""
    rng = np.random.default_rng(4)
    M = (rng.random((12, 6)) < 0.4).astype(float)
    wstar = np.array([4, 4, 3, 1, 1, 1, 1, 1, 1, 0.5, 0.5, 0.5])
    target = M.T @ (wstar / wstar.sum())
    target[5] = min(1.0, target[5] + 0.15)
    tg = cb.Targets(spec=None, families=["a", "b"], offsets={"a": (0, 2), "b": (2, 6)}, target=target,
                    scale=np.array([0.02, 0.02, 0.03, 0.03, 0.03, 0.03]), family_of=np.array([0, 0, 1, 1, 1, 1]),
                    n_hat=100.0)
    return sp.csr_matrix(M), tg


def objective(w: np.ndarray, Q, tg: cb.Targets, n_out: int, tau: float) -> float:
    """The module docstring's objective, written out family by family."""
    a = Q.T @ w
    fit = 0.0
    for f in tg.families:
        lo, hi = tg.offsets[f]
        h = np.maximum(np.abs(a[lo:hi] - tg.target[lo:hi]) / tg.scale[lo:hi] - cb.DEADZONE, 0.0)
        h = np.where(h <= cb.HUBER, h ** 2, 2 * cb.HUBER * h - cb.HUBER ** 2)
        fit += cb.FAMILY_WEIGHTS.get(f, 1.0) * np.mean(h) / len(tg.families)
    kl = float(np.sum(w * np.log(w)) + np.log(len(w)))  # KL(w || uniform)
    return fit + tau * kl + cb.CAP_PENALTY * float(np.sum(np.maximum(n_out * w - 1.0, 0.0) ** 2))


def _softmax(theta: np.ndarray) -> np.ndarray:
    w = np.exp(theta - theta.max())
    return w / w.sum()


def reference_weights(Q, tg, n_out: int, tau: float) -> np.ndarray:
    """The objective's minimum by BFGS on finite differences (no analytic gradient: independent of fit_weights)."""
    res = minimize(lambda th: objective(_softmax(th), Q, tg, n_out, tau), np.zeros(Q.shape[0]), method="BFGS",
                   options={"gtol": 1e-12, "maxiter": 20000})
    return _softmax(res.x)


# entropy weights where L-BFGS converges tightly (with tau 0.02 it stops within 1e-3 of the minimum), the cap
# binding in the first; a family weighed twice or a cap gradient 1.5 times too steep misses by 1e-4 or more
@pytest.mark.parametrize("n_out,tau", [(5, 0.2), (4, 0.5), (2, 1.0)])
def test_fit_weights_reach_the_minimum_of_the_documented_objective(n_out, tau):
    Q, tg = _problem()
    w = cb.fit_weights(Q, tg, n_out, tau=tau)
    ref = reference_weights(Q, tg, n_out, tau)
    assert w.sum() == pytest.approx(1.0) and (w > 0).all()
    assert objective(w, Q, tg, n_out, tau) <= objective(ref, Q, tg, n_out, tau) * (1 + 2e-5)
    assert np.abs(w - ref).max() < 2e-4


def test_fit_weights_reach_the_minimum_with_a_target_out_of_reach_and_a_weighted_family():
    """A target HUBER noise standard deviations beyond what any weighting reaches (the linear part of the loss)
    and a family with a FAMILY_WEIGHTS weight."""
    Q, tg = _problem()
    far = tg.target.copy()
    far[1] = 1.0  # query 1 is held by a few patients only: no weighting reaches a share of 1
    tg = cb.Targets(**{**tg.__dict__, "target": far, "families": ["a", "events"],
                       "offsets": {"a": tg.offsets["a"], "events": tg.offsets["b"]}})
    assert cb.FAMILY_WEIGHTS["events"] != 1.0
    w = cb.fit_weights(Q, tg, 5, tau=0.2)
    ref = reference_weights(Q, tg, 5, 0.2)
    assert abs((Q.T @ w)[1] - 1.0) / tg.scale[1] - cb.DEADZONE > cb.HUBER  # the linear part is where it ends
    assert objective(w, Q, tg, 5, 0.2) <= objective(ref, Q, tg, 5, 0.2) * (1 + 2e-5)
    assert np.abs(w - ref).max() < 2e-4


def length_cohort(n: int, holds_a, seed: int) -> list[Timeline]:
    """Patients of 1-22 days with C and either A or B every day (the same events per day whichever they hold)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        days = 1 + 3 * (i % 8)
        codes = [C, A if holds_a(days, rng) else B]
        evs = [Event(time=T0 + timedelta(days=d), kind=k, system=s, code=c, encounter_id=f"e{i}-{d}")
               for d in range(days) for (k, s, c) in codes]
        out.append(Timeline(PatientInfo(f"p{i}", sex="female" if i % 2 else "male",
                                        birth_date=date(1950 + i % 60, 1, 1)), evs))
    return out


def test_a_code_share_out_of_reach_does_not_cost_the_record_lengths():
    """80% of the real patients hold A at every length; in the pool only some one-day patients do, too few for
    any draw of 100 to reach 80%. Squared, the pull toward A took the draw's mass to the one-day records (events
    per patient 0.42 from the measured distribution, KS); with the Huber loss and the length families' weight
    the lengths stay within 0.2 (A's share is left to repair)."""
    real = length_cohort(200, lambda d, r: r.random() < 0.8, 1)
    pool = length_cohort(400, lambda d, r: d == 1 and r.random() < 0.5, 2)
    tg = cb.targets(exact_doc(real))
    Q = cb.query_matrix(pool, tg)
    squared = cb.errors(Q, cb.fit_weights(Q, tg, 100, weights={}, huber_sd=np.inf), tg)
    default = cb.errors(Q, cb.fit_weights(Q, tg, 100), tg)
    assert squared["events"] > 0.35 and default["events"] < 0.2 and default["visits"] < 0.2
    assert squared["prevalence"] < default["prevalence"]  # what the lengths were traded for


def test_fit_weights_keep_every_weight_under_one_over_n():
    Q, tg = _problem()
    free = reference_weights(Q, tg, 1, 0.02)  # n_out 1: the cap never binds
    n_out = 5
    assert n_out * free.max() > 1.15  # the targets alone would put more than 1/n on a patient
    w = cb.fit_weights(Q, tg, n_out, tau=0.02)
    assert n_out * w.max() <= 1.01


def test_fit_weights_follow_the_family_weights_and_the_entropy():
    """With the pool already on target the optimum is uniform (the entropy term alone); a larger tau pulls a fit
    towards uniform."""
    Q, tg = _problem()
    on_target = cb.Targets(**{**tg.__dict__, "target": Q.T @ np.full(12, 1 / 12)})
    assert np.allclose(cb.fit_weights(Q, on_target, 5), 1 / 12, atol=1e-4)
    spread = [float(np.sum(cb.fit_weights(Q, tg, 5, tau=tau) ** 2)) for tau in (0.002, 0.05, 1.0)]
    assert spread[0] > spread[1] > spread[2] > 1 / 12


def test_fit_weights_honour_max_iter():
    Q, tg = _problem()
    one = cb.fit_weights(Q, tg, 5, tau=0.02, max_iter=1)
    done = cb.fit_weights(Q, tg, 5, tau=0.02)
    assert objective(one, Q, tg, 5, 0.02) > 1.5 * objective(done, Q, tg, 5, 0.02)


# ---------------------------------------------------------------- inclusion and the draw
def reference_inclusion(w: np.ndarray, n: int) -> np.ndarray:
    """min(1, c w) with the c that makes them sum to n, found by root finding."""
    if n == len(w):
        return np.ones(len(w))
    c = brentq(lambda c: np.minimum(1.0, c * w).sum() - n, 0.0, n / w[w > 0].min() + 1.0, xtol=1e-14)
    return np.minimum(1.0, c * w)


@pytest.mark.parametrize("w,n", [([0.5, 0.2, 0.12, 0.1, 0.04, 0.04], 4), ([0.45, 0.45, 0.05, 0.05], 3),
                                 ([0.3, 0.29, 0.28, 0.05, 0.04, 0.02, 0.01, 0.01], 5),
                                 ([0.4, 0.3, 0.2, 0.1], 4), ([0.25, 0.25, 0.25, 0.25], 2), ([0.7, 0.2, 0.1, 0.0], 2)])
def test_inclusion_probabilities_cap_at_one_and_sum_to_n(w, n):
    w = np.asarray(w)
    pi = cb.inclusion(w, n)
    assert pi == pytest.approx(reference_inclusion(w, n), abs=1e-9)
    assert pi.sum() == pytest.approx(n) and pi.max() <= 1.0


def test_systematic_draw_normalises_the_probabilities():
    pi = cb.inclusion(np.array([0.3, 0.25, 0.2, 0.1, 0.1, 0.05]), 3)
    for seed in range(20):
        a = cb.systematic_draw(pi, 3, np.random.default_rng(seed))
        b = cb.systematic_draw(pi * 0.5, 3, np.random.default_rng(seed))  # same shape, other total
        assert a.tolist() == b.tolist() and len(set(a.tolist())) == 3


def test_systematic_draw_replaces_a_repeat_by_the_likeliest_others():
    """A probability above 1 (round-off in real use) covers two sampling points: the repeat is replaced by the
    likeliest patients not drawn, never by one of probability 0."""
    pi = np.array([2.5, 0.3, 0.2, 0.0])
    for seed in range(30):
        assert cb.systematic_draw(pi, 3, np.random.default_rng(seed)).tolist() == [0, 1, 2]


# ---------------------------------------------------------------- calibrate's report
def _shares(tls: list[Timeline], spec: ms.Spec, families) -> dict[str, np.ndarray]:
    """Each query's share; for a cumulative family (visits, events) of its histogram's tails, bucket 1 up."""
    return {f: (np.cumsum(c[::-1])[::-1][1:] if f in cb.CUMULATIVE_FAMILIES else c) / len(tls)
            for f, c in ms.exact_counts(tls, spec, tuple(families)).items()}


def test_calibrate_reports_errors_recomputed_from_its_output():
    real, pool, n = cohort(300, 0.8, 1), cohort(200, 0.3, 2), 40
    doc = exact_doc(real)
    out, rep = cb.calibrate(pool, doc, n, seed=5, repair=False)
    repaired, rep_r = cb.calibrate(pool, doc, n, seed=5)
    spec = ms.Spec.from_json(doc["spec"])
    fams = [f for f, size in spec.sizes().items() if size]
    want = _shares(real, spec, fams)  # exact measurements: the targets are the real cohort's shares
    for key, tls, agg in (("before", pool, np.max), ("before_mean", pool, np.mean), ("drawn", out, np.max),
                          ("drawn_mean", out, np.mean)):
        got = _shares(tls, spec, fams)
        assert rep[key] == pytest.approx({f: float(agg(np.abs(got[f] - want[f]))) for f in fams}), key
        assert rep_r[key] == pytest.approx(rep[key]), key  # repair comes after the draw: the same draw
    got = _shares(repaired, spec, fams)
    assert rep_r["repaired"] == pytest.approx({f: float(np.max(np.abs(got[f] - want[f]))) for f in fams})
    assert "repaired" not in rep and rep_r["repaired"]["prevalence"] <= rep_r["drawn"]["prevalence"]
    # (that repair moves codes toward their targets is tests/test_repair.py's; in this draw every cell that needs
    # a code lacks a donor: rep_r["repair"]["codes_short"])
    assert (rep["pool"], rep["n"]) == (200, n)
    assert n / 1.2 <= rep["effective_pool"] < 200
    assert 0 <= rep["capped"] <= n


def test_calibrating_a_pool_that_already_matches_keeps_it_uniform():
    pool = cohort(120, 0.5, 3)
    doc = exact_doc(pool)
    out, rep = cb.calibrate(pool, doc, 30, seed=0, repair=False)
    assert rep["effective_pool"] == pytest.approx(120, rel=1e-3) and rep["capped"] == 0
    # other seeds, of either parity, draw other patients; the same seed the same ones
    draws = {seed: [id(t) for t in cb.calibrate(pool, doc, 30, seed=seed, repair=False)[0]] for seed in (0, 2, 3)}
    assert draws[0] == [id(t) for t in out] and draws[0] != draws[2] and draws[0] != draws[3]


def test_calibrate_may_take_the_whole_pool_but_not_more():
    pool = cohort(40, 0.5, 4)
    doc = exact_doc(cohort(100, 0.9, 5))
    out, rep = cb.calibrate(pool, doc, 40, seed=1, repair=False)
    assert sorted(id(t) for t in out) == sorted(id(t) for t in pool)
    assert rep["capped"] == 40
    with pytest.raises(ValueError, match=r"the pool \(40\) is smaller than the requested count \(41\)"):
        cb.calibrate(pool, doc, 41, seed=1)


def test_summary_lists_every_statistic_before_and_after():
    rep = {"pool": 50, "n": 10, "effective_pool": 31.6, "before": {"cells": 0.1234, "visits": 0.05},
           "drawn": {"cells": 0.01, "visits": 0.0049}, "before_mean": {"cells": 0.02, "visits": 0.01},
           "drawn_mean": {"cells": 0.001, "visits": 0.002}}
    assert cb.summary(rep) == ("calibration: pool 50 -> 10 patients (effective pool 32); max error by statistic "
                               "before [cells 0.123, visits 0.050], after [cells 0.010, visits 0.005]; mean error "
                               "before [cells 0.020, visits 0.010], after [cells 0.001, visits 0.002]")


# ---------------------------------------------------------------- when generation calibrates
@pytest.mark.parametrize("constraint", [{"sex": "female"}, {"age": (30, 40)}, {"condition": A[1:]}])
def test_any_constraint_skips_the_measurements_and_says_so(tmp_path, caplog, constraint):
    (tmp_path / ms.MEASUREMENTS).write_text('{"format": 0}')  # never read: a constraint decides first
    caplog.set_level("INFO", logger=cb.log.name)
    assert cb.measurements_to_calibrate_to(tmp_path, {"seed": 1, "sex": None, **constraint}) is None
    assert [r.getMessage() for r in caplog.records if r.name == cb.log.name] == [
        "sex / age / condition constraint given: not calibrated (the measurements describe the whole cohort)"]


def test_measurements_are_read_without_constraints_and_their_absence_is_logged(tmp_path, caplog):
    caplog.set_level("INFO", logger=cb.log.name)
    sample = {"seed": 1, "sex": None, "age": None, "condition": None}
    assert cb.measurements_to_calibrate_to(tmp_path, sample) is None
    assert [r.getMessage() for r in caplog.records if r.name == cb.log.name] == [
        "the model holds no measurements (trained before calibration or with measurement share 0): not calibrated"]
    caplog.clear()
    doc = exact_doc(cohort(30, 0.5, 6))
    (tmp_path / ms.MEASUREMENTS).write_text(json.dumps(doc))
    assert cb.measurements_to_calibrate_to(tmp_path, sample) == doc
    assert not [r for r in caplog.records if r.name == cb.log.name]
