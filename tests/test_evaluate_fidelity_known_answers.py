"""Fidelity metrics on known-answer sets (issue 20): each headline figure must land on the right side of its
real-vs-real bootstrap null. A holdout passed off as synthetic is as close as another sample of real patients;
the training codes shuffled across patients and visits are not; two samples of one distribution score clearly
closer on the 2-way marginal distance than a clearly different distribution does."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fhirsynth.evaluate.cohort import Cohort, _with_visits, load_cohort
from fhirsynth.evaluate.fidelity import (
    NULL_HEADLINES,
    _CodeStats,
    canonical_order,
    compare_vectors,
    cooccurrence,
    fidelity_report,
    gaussian_copula_hellinger,
    marginal_distance_1way,
    marginal_distance_2way,
    null_design,
    prevalence,
    top_visit_tokens,
    transitions,
)
from fhirsynth.evaluate.tables import feature_spec, flatten
from fhirsynth.evaluate.toy import toy_timelines
from fhirsynth.timeline.io import write_timelines


def _figure(m: dict, path: tuple[str, ...], key: str) -> dict:
    d = m
    for p in path:
        d = d[p]
    assert key in d and "null" in d, f"{path} has no {key} or no null"
    return d


def shuffle_codes(cohort: Cohort, seed: int = 0) -> Cohort:
    """The cohort's condition and observation codes (with their values) permuted across all its patients and
    visits within each kind: every patient keeps its timeline shape (visits, days, events per visit)."""
    rng = np.random.default_rng(seed)
    ev = cohort.events.copy()
    tok = ev["token"].astype(str).to_numpy().copy()
    val = ev["value"].to_numpy(float).copy()
    kind = ev["kind"].astype(str).to_numpy()
    for k in ("condition", "observation"):
        i = np.flatnonzero(kind == k)
        p = rng.permutation(i)
        tok[i], val[i] = tok[p], val[p]
    ev["token"] = pd.Categorical(tok)
    ev["value"] = val
    return Cohort(f"{cohort.name}-shuffled", ev, cohort.patients.copy(), cohort.displays)


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict[str, Cohort]:
    root = tmp_path_factory.mktemp("fidelity-known")
    specs = {"train": {"n": 300, "seed": 21}, "holdout": {"n": 150, "seed": 22, "id_prefix": "h"},
             "small_holdout": {"n": 90, "seed": 23, "id_prefix": "q"},
             "shifted": {"n": 150, "seed": 24, "id_prefix": "x", "hazard_scale": 4.0, "visits_per_year": 1.6}}
    out = {}
    for name, kw in specs.items():
        kw = {"visits_per_year": 0.8, **kw}
        write_timelines(toy_timelines(kw.pop("n"), **kw), root / name)
        out[name] = load_cohort(root / name, name)
    out["shuffled"] = shuffle_codes(out["train"])
    return out


@pytest.fixture(scope="module")
def reports(cohorts) -> dict[str, dict]:
    train = cohorts["train"]
    spec = feature_spec(train)
    t_train = flatten(train, spec)
    # detection refits a classifier per null draw (~0.5 s each here): the holdout gets the default 20 draws,
    # the shuffled set 10 (it lands far outside), the others none (their known answers are about other figures)
    det_draws = {"holdout": 20, "small_holdout": 0, "shuffled": 10, "shifted": 0}
    out = {}
    for name, draws in det_draws.items():
        other = cohorts[name]
        out[name], _ = fidelity_report(train, other, real_table=t_train, other_table=flatten(other, spec),
                                       detection_null_draws=draws)
    return out


@pytest.mark.parametrize("name", ["holdout", "small_holdout"])
def test_holdout_within_null_on_every_headline(reports, name):
    m = reports[name]
    # 300 vs 150 cannot be split into disjoint samples of those sizes: resampled; 300 vs 90 can: split
    assert m["bootstrap"]["null_method"] == ("bootstrap" if name == "holdout" else "split")
    boot = m["bootstrap"]
    assert boot["null_draws"] == 40 and boot["ci_draws"] == 20
    for _key, path, fig, _sign in NULL_HEADLINES:
        d = _figure(m, path, fig)
        null = d["null"]
        if fig == "auc" and name == "small_holdout":
            assert null is None and d["within_null"] is None  # no detection draws asked for
            continue
        draws = boot["detection_null_draws"] if fig == "auc" else boot["null_draws"]
        assert null is not None and null["n"] == draws >= 20, (path, null)
        assert null["lo"] <= null["median"] <= null["hi"]
        assert d["within_null"] is True and d["vs_null"] == "within", (path, d[fig], null)
        if fig != "auc":
            lo, hi = d["ci"]
            assert lo <= d[fig] <= hi, (path, d[fig], d["ci"])
        else:
            assert d["ci"] is None  # no interval for detection: one refit per draw
    assert "hellinger_copula" not in m


def test_shuffled_codes_fail_cooccurrence_and_detection(reports):
    m = reports["shuffled"]
    co = m["cooccurrence"]
    assert co["vs_null"] == "farther" and co["r2"] < co["null"]["lo"], co
    assert co["ci"][1] < co["null"]["lo"]  # the whole interval lies outside the null
    det = m["detection"]
    assert det["auc"] > 0.6 and det["vs_null"] == "farther", det
    assert m["transitions"]["vs_null"] == "farther"
    # per-patient tables: codes no longer follow age and sex, values are averaged over strangers' events
    assert m["marginal_2way"]["vs_null"] == "farther"
    # the holdout, compared the same way, is not: these checks can fail
    assert reports["holdout"]["cooccurrence"]["r2"] > co["ci"][1]
    assert reports["holdout"]["detection"]["auc"] < 0.6


def test_2way_distance_ranks_iid_sample_below_a_different_distribution(reports):
    iid, far = reports["holdout"]["marginal_2way"], reports["shifted"]["marginal_2way"]
    assert iid["vs_null"] == "within" and far["vs_null"] == "farther"
    assert far["tvd"] > far["null"]["hi"] + 2 * (far["null"]["hi"] - far["null"]["lo"])
    assert far["n_pairs"] == iid["n_pairs"] > 100


def _gaussian(rng: np.random.Generator, n: int, p: int, shift: float) -> pd.DataFrame:
    f = rng.normal(size=(n, 1))
    x = np.sqrt(0.4) * rng.normal(size=(n, p)) + np.sqrt(0.6) * f + shift
    return pd.DataFrame(x, columns=[f"c{i}" for i in range(p)])


def _ranks(metric, draws: int = 3) -> bool:
    """Two independent samples of one Gaussian (400 vs 185 rows, 59 columns, the audit's sizes) must score
    less than half as far apart as a sample of a clearly different Gaussian (every mean shifted by 1 sd)."""
    for s in range(draws):
        rng = np.random.default_rng(s)
        a, b, c = _gaussian(rng, 400, 59, 0.0), _gaussian(rng, 185, 59, 0.0), _gaussian(rng, 185, 59, 1.0)
        if not metric(a, b) < 0.5 * metric(a, c):
            return False
    return True


def test_2way_distance_is_not_degenerate_at_audit_sizes():
    assert _ranks(lambda a, b: marginal_distance_2way(a, b)["tvd"])
    assert _ranks(lambda a, b: marginal_distance_1way(a, b)["tvd"])
    # the same criterion rejects the Gaussian-copula Hellinger the report no longer shows (~0.94 vs 1.0)
    assert not _ranks(gaussian_copula_hellinger, draws=1)


def test_marginal_distances_basics():
    half = np.r_[np.zeros(50), np.ones(50)]
    a = pd.DataFrame({"x": half, "y": half})  # y = x
    b = pd.DataFrame({"x": half, "y": 1 - half})  # y = not x: same marginals, opposite dependence
    assert marginal_distance_1way(a, a)["tvd"] == 0.0 and marginal_distance_2way(a, a)["tvd"] == 0.0
    assert marginal_distance_1way(a, b)["tvd"] == 0.0  # 1-way cannot see it
    assert marginal_distance_2way(a, b)["tvd"] == pytest.approx(1.0)  # 2-way sees disjoint joints
    c = pd.DataFrame({"x": np.r_[np.zeros(80), np.ones(20)], "y": half})
    assert marginal_distance_1way(a, c)["tvd"] == pytest.approx(0.3 / 2)  # x: 0.5 -> 0.2 flagged; y: same
    # missing values are a bin of their own: a column that loses them moves exactly that share
    rng = np.random.default_rng(0)
    m = pd.DataFrame({"m": np.where(rng.random(500) < 0.3, np.nan, rng.normal(size=500))})
    assert marginal_distance_1way(m, m.fillna(0.0))["tvd"] == pytest.approx(m["m"].isna().mean())
    # quantile bins of the real data: a sample of the same distribution is near, a shifted one far
    x = pd.DataFrame({"v": rng.normal(size=2000)})
    assert marginal_distance_1way(x, pd.DataFrame({"v": rng.normal(size=2000)}))["tvd"] < 0.06
    assert marginal_distance_1way(x, pd.DataFrame({"v": rng.normal(size=2000) + 2}))["tvd"] > 0.6
    # the pair cap draws a fixed subset
    wide = pd.DataFrame(rng.normal(size=(50, 30)), columns=[f"c{i}" for i in range(30)])
    assert marginal_distance_2way(wide, wide)["n_pairs"] == 435
    capped = marginal_distance_2way(wide, wide.iloc[::-1], max_pairs=100)
    assert capped["n_pairs"] == 100 and capped == marginal_distance_2way(wide, wide.iloc[::-1], max_pairs=100)


def test_null_design_sizes():
    d = null_design(800, 200)
    a, b = d["sizes"]
    assert d["method"] == "split" and a + b <= 800
    assert 1 / a + 1 / b == pytest.approx(1 / 800 + 1 / 200, rel=0.02)  # the comparison's two-sample noise
    d = null_design(800, 600)
    assert d["method"] == "bootstrap" and d["sizes"] == [800, 600]
    assert d["detection_rows"] == 400 and d["detection_noise_ratio"] == pytest.approx(np.sqrt(600 / 400))


def test_resampled_code_statistics_match_the_cohort_functions(cohorts):
    train, hold = cohorts["train"], cohorts["holdout"]
    rs, hs = _CodeStats(train), _CodeStats(hold)
    w_r, w_h = np.ones(train.n), np.ones(hold.n)
    tokens = top_visit_tokens(train, 60)
    assert set(rs.top_visit_tokens(w_r, 60)) == set(tokens)
    for kind in ("condition", "observation"):
        assert compare_vectors(rs.prevalence(w_r, kind), hs.prevalence(w_h, kind))["r2"] == pytest.approx(
            compare_vectors(prevalence(train, kind), prevalence(hold, kind))["r2"])
    np.testing.assert_allclose(hs.cooccurrence(w_h, tokens), cooccurrence(hold, tokens).to_numpy())
    np.testing.assert_allclose(hs.transitions(w_h, tokens), transitions(hold, tokens).to_numpy())
    # weights are copies: patient 0 weighted twice == a cohort holding patient 0 twice
    idx = np.r_[0, np.arange(hold.n)]
    ev0 = hold.events[hold.events["pidx"] == 0].copy()
    ev0["pidx"] = hold.n
    events = _with_visits(pd.concat([hold.events, ev0], ignore_index=True).drop(columns=["visit", "vrank"]))
    doubled = Cohort("d", events, pd.concat([hold.patients, hold.patients.iloc[[0]]], ignore_index=True))
    np.testing.assert_allclose(hs.cooccurrence(hs.weights(idx), tokens), cooccurrence(doubled, tokens).to_numpy())
    np.testing.assert_allclose(hs.transitions(hs.weights(idx), tokens), transitions(doubled, tokens).to_numpy())


def test_interval_does_not_depend_on_patient_order(cohorts):
    train, hold = cohorts["train"], cohorts["small_holdout"]
    spec = feature_spec(train)
    t_train = flatten(train, spec)
    perm = np.random.default_rng(5).permutation(hold.n)
    shuffled_order = hold.subset(perm)
    shuffled_order.patients["patient_id"] = [f"other{i}" for i in range(hold.n)]  # new ids, as after ingest
    kw = {"real_table": t_train, "null_draws": 3, "ci_draws": 5, "detection_null_draws": 0}
    m1, _ = fidelity_report(train, hold, other_table=flatten(hold, spec), **kw)
    m2, _ = fidelity_report(train, shuffled_order, other_table=flatten(shuffled_order, spec), **kw)
    # the canonical order names the same patients in both (positions differ: shuffled_order[i] = hold[perm[i]])
    assert (perm[canonical_order(shuffled_order)] == canonical_order(hold)).all()
    for key in ("cooccurrence", "transitions", "marginal_1way", "marginal_2way"):
        assert m1[key]["ci"] == pytest.approx(m2[key]["ci"]), key
        assert m1[key]["null"] == pytest.approx(m2[key]["null"]), key
