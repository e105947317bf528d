"""Utility tasks with a horizon (issue 20): no label leakage, the age-only flag, shuffled codes score lower than a
fresh real sample, and targets are chosen only when positives suffice. Toy cohorts with injected structure:

- PRE -> TGT: 40% of patients get PRE, then TGT 1.05-2 years later (5% get TGT alone): a code-driven task.
- AGE60: everybody gets it on their 60th birthday: age alone determines the label.
- RARE (8 patients) and UNIV (every patient, at a random time): targets that must not be chosen.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from fhirsynth.evaluate.cohort import Cohort, _with_visits, load_cohort
from fhirsynth.evaluate.tables import feature_spec, flatten
from fhirsynth.evaluate.toy import toy_timelines
from fhirsynth.evaluate.utility import (
    MIN_POSITIVES,
    build_landmarks,
    eligible_targets,
    follow_up_end,
    landmark_features,
    onset_counts,
    onset_labels,
    utility_report,
)
from fhirsynth.timeline.io import write_timelines
from fhirsynth.timeline.types import Event, PatientInfo, Timeline

SNOMED = "http://snomed.info/sct"
PRE, TGT, AGE60, RARE, UNIV, LEAK = "900001", "900002", "900060", "900099", "900100", "900777"
TOKEN = {c: f"condition|{SNOMED}|{c}" for c in (PRE, TGT, AGE60, RARE, UNIV, LEAK)}
YEAR = timedelta(days=365.25)
END = datetime(2025, 1, 1, tzinfo=timezone.utc)


def _cond(code: str, t: datetime) -> Event:
    return Event(time=t, kind="condition", system=SNOMED, code=code, display=f"test condition {code}")


def _inject(timelines: list[Timeline], seed: int) -> list[Timeline]:
    rng = np.random.default_rng(seed)
    for i, tl in enumerate(timelines):
        first = min(e.time for e in tl.events)
        end = tl.patient.death_date or END
        extra = []
        lo, hi = first + 1.2 * YEAR, end - 2.2 * YEAR
        if rng.random() < 0.4 and hi > lo:
            t_pre = lo + rng.random() * (hi - lo)
            t_tgt = t_pre + rng.uniform(1.05, 2.0) * YEAR
            extra += [_cond(PRE, t_pre), _cond(TGT, t_tgt), _cond(LEAK, t_tgt)]  # LEAK: only on the onset day
        elif rng.random() < 0.05 and end - first > 1.5 * YEAR:
            t_tgt = first + 1.1 * YEAR + rng.random() * (end - first - 1.1 * YEAR)
            extra += [_cond(TGT, t_tgt), _cond(LEAK, t_tgt)]
        born = datetime.combine(tl.patient.birth_date, datetime.min.time(), timezone.utc)
        t60 = born + 60 * YEAR
        if first + YEAR < t60 < end:
            extra.append(_cond(AGE60, t60))
        if i < 8 and end - first > 4 * YEAR:
            extra.append(_cond(RARE, first + 3 * YEAR))
        if end - first > 1.1 * YEAR:
            extra.append(_cond(UNIV, first + 1.05 * YEAR + rng.random() * (end - first - 1.1 * YEAR)))
        tl.events.extend(extra)
        tl.sorted()
    return timelines


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict[str, Cohort]:
    root = tmp_path_factory.mktemp("utility")
    out = {}
    for name, n, seed in (("real", 300, 11), ("holdout", 250, 12), ("fresh", 250, 13)):
        tls = _inject(toy_timelines(n, seed=seed, visits_per_year=0.8, id_prefix=name[0]), seed + 100)
        write_timelines(tls, root / name)
        out[name] = load_cohort(root / name, name)
    return out


@pytest.fixture(scope="module")
def spec(cohorts):
    s = feature_spec(cohorts["real"])
    assert TOKEN[PRE] in s.conditions and TOKEN[LEAK] in s.conditions
    return s


def _shuffled(c: Cohort, seed: int = 0) -> Cohort:
    """Codes (with their values) permuted across all events of a kind: every patient keeps their dates, visits,
    age and sex, but which codes they carry is random."""
    rng = np.random.default_rng(seed)
    ev = c.events.copy()
    tok, val = ev["token"].astype(str).to_numpy(), ev["value"].to_numpy(float).copy()
    for kind in ("condition", "observation"):
        idx = np.flatnonzero((ev["kind"] == kind).to_numpy())
        perm = rng.permutation(idx)
        tok[idx], val[idx] = tok[perm], val[perm]
    ev["token"], ev["value"] = pd.Categorical(tok), val
    return Cohort(f"{c.name}-shuffled", ev, c.patients, c.displays)


def _moved(c: Cohort, token: str, day: float) -> Cohort:
    """A copy in which every event of token is moved to one day."""
    ev = c.events.drop(columns=["visit", "vrank"]).copy()
    m = (ev["token"].astype(str) == token).to_numpy()
    ev.loc[m, "day"] = day
    ev.loc[m, "iday"] = int(np.floor(day))
    return Cohort(f"{c.name}-moved", _with_visits(ev), c.patients, c.displays)


# ------------------------------------------------------------------------------------------------ index dates
def test_landmark_features_match_flatten_at_a_cutoff(cohorts, spec):
    real = cohorts["real"]
    lm = build_landmarks(real, spec, 365, 365)
    assert len(lm.rows) > 5 * real.n
    for k in (1, 5):
        r = lm.rows[lm.rows["k"] == k]
        want = flatten(real, spec, pd.Series(r["day"].to_numpy(float), index=r["pidx"].to_numpy()))
        got = lm.x[(lm.rows["k"] == k).to_numpy()].set_index(r["pidx"].to_numpy())
        assert list(got.columns) == list(want.columns)
        np.testing.assert_allclose(got.to_numpy(float), want.to_numpy(float), rtol=1e-9, atol=1e-9)


def test_index_dates_need_no_future_and_windows_do_not_overlap(cohorts, spec):
    real = cohorts["real"]
    lm = build_landmarks(real, spec, 365, 365)
    rows = lm.rows
    # dates are the first event's day plus whole steps, the window ends within follow-up, the patient is alive
    base = np.floor(real.first_day.to_numpy())[rows["pidx"]]
    assert np.array_equal(rows["day"].to_numpy(), base + 365 * rows["k"].to_numpy())
    assert (rows["day"] + 365 <= lm.end_day).all() and lm.end_day == follow_up_end(real)
    death = real.patients["death_day"].to_numpy()[rows["pidx"]]
    assert not (death < rows["day"].to_numpy()).any()
    # each onset is a positive at most once; counts agree with the labels
    keep, y = onset_labels(real, lm, TOKEN[TGT], 365)
    pos_pats = rows["pidx"].to_numpy()[keep][y == 1]
    assert len(pos_pats) == len(set(pos_pats)) > 50
    counts = onset_counts(real, lm).loc[TOKEN[TGT]]
    assert counts["positives"] == y.sum() and counts["negatives"] == len(y) - y.sum()


# ----------------------------------------------------------------------------------------- (a) label leakage
def test_no_label_leakage_target_after_horizon_gives_no_signal(cohorts, spec):
    real, holdout = cohorts["real"], cohorts["holdout"]
    # the target moved to just after the cohort's follow-up: after the horizon of every index date
    moved = _moved(real, TOKEN[TGT], follow_up_end(real) + 1.0)
    assert follow_up_end(moved) <= follow_up_end(real) + 1.0
    res = utility_report(real, moved, spec, holdout=holdout, targets=[TGT], bootstrap=50)
    task = res["tasks"][f"onset_{TGT}"]
    assert task["positives"]["synthetic"] == 0
    assert task["tstr_auroc"] is None and "0 positives" in task["tstr_reason"]
    assert task["computable"] is False and task["trtr_auroc"] > 0.75
    # the same data with the target where it was: the task has signal, so the check above could fail
    same = utility_report(real, real, spec, holdout=holdout, targets=[TGT], bootstrap=50)
    assert same["tasks"][f"onset_{TGT}"]["tstr_auroc"] > 0.75


def test_no_feature_leakage_marker_on_onset_day_is_never_seen(cohorts, spec):
    """LEAK sits on every TGT onset day: features from the index date on would see it for every positive."""
    real = cohorts["real"]
    lm = build_landmarks(real, spec, 365, 365)
    keep, y = onset_labels(real, lm, TOKEN[TGT], 365)
    col = f"cond:{LEAK}"
    assert (lm.x.loc[keep, col] == 0).all()
    # peeking to the end of the window would see the marker on (almost) every positive: the check can fail
    rows = lm.rows[keep]
    peek = landmark_features(real, spec, rows["pidx"].to_numpy(), rows["day"].to_numpy() + 365)
    assert peek[col].to_numpy()[y == 1].mean() > 0.95


# ------------------------------------------------------------------------ (b) age flag, (c) shuffled codes
@pytest.fixture(scope="module")
def fresh_run(cohorts, spec):
    return utility_report(cohorts["real"], cohorts["fresh"], spec, holdout=cohorts["holdout"],
                          targets=[TGT, AGE60])


def test_task_determined_by_age_is_flagged(fresh_run):
    age_task = fresh_run["tasks"][f"onset_{AGE60}"]
    assert age_task["computable"], age_task
    assert age_task["age_only_auroc"] >= age_task["trtr_auroc"] - 0.02
    assert age_task["measures_age"] is True
    code_task = fresh_run["tasks"][f"onset_{TGT}"]
    assert code_task["measures_age"] is False and code_task["signal"] is True
    assert code_task["trtr_auroc"] > code_task["age_only_auroc"] + 0.1
    summary = fresh_run["summary"]
    assert f"onset_{AGE60}" in summary["measures_age"] and f"onset_{AGE60}" not in summary["tasks_used"]
    assert f"onset_{TGT}" in summary["tasks_used"]


def test_shuffled_codes_score_lower_than_a_fresh_real_sample(cohorts, spec, fresh_run):
    shuffled = utility_report(cohorts["real"], _shuffled(cohorts["real"]), spec, holdout=cohorts["holdout"],
                              targets=[TGT, AGE60])
    fresh, shuf = fresh_run["tasks"][f"onset_{TGT}"], shuffled["tasks"][f"onset_{TGT}"]
    assert fresh["ratio"] > 0.9 and fresh["ratio_ci"][0] <= 1.0 <= fresh["ratio_ci"][1] + 0.02
    assert shuf["tstr_auroc"] < fresh["tstr_auroc"] - 0.15
    assert shuf["ratio_ci"][1] < fresh["ratio_ci"][0]
    assert shuffled["summary"]["mean_ratio"] < fresh_run["summary"]["mean_ratio"] - 0.15
    for task in (fresh, shuf):
        lo, hi = task["tstr_ci"]
        assert lo <= task["tstr_auroc"] <= hi


# ------------------------------------------------------------------------------------------ (d) target choice
def test_eligibility_needs_enough_positives_and_negatives():
    idx = ["a", "b", "c", "d", "e"]
    train = pd.DataFrame({"positives": [50, 19, 50, 50, 80], "negatives": [500, 500, 500, 500, 20]}, index=idx)
    test = pd.DataFrame({"positives": [20, 40, 19, 40, 30], "negatives": [300, 300, 300, 300, 300]}, index=idx)
    prevalence = pd.Series([0.2, 0.2, 0.2, 0.9, 0.3], index=idx)
    e = eligible_targets(train, test, prevalence, min_positives=20)
    assert e.loc["a", "reason"] is None and e.loc["e", "reason"] is None
    assert "training" in e.loc["b", "reason"] and "test set" in e.loc["c", "reason"]
    assert "near-universal" in e.loc["d", "reason"]


def test_targets_chosen_only_when_positives_suffice(cohorts, spec):
    real, holdout = cohorts["real"], cohorts["holdout"]
    res = utility_report(real, cohorts["fresh"], spec, holdout=holdout, n_targets=3, bootstrap=50)
    chosen = res["targets"]["chosen"]
    # the code-driven target passes the screen; LEAK (recorded with TGT) has the same positives: one of the two
    assert len({TOKEN[TGT], TOKEN[LEAK]} & set(chosen)) == 1
    assert TOKEN[UNIV] not in chosen and TOKEN[RARE] not in chosen
    for task in res["tasks"].values():
        if task["kind"] == "condition_onset":
            assert task["positives"]["real_train"] >= MIN_POSITIVES and task["positives"]["test"] >= MIN_POSITIVES
            assert task["n"]["test"] - task["positives"]["test"] >= MIN_POSITIVES
    lm_real, lm_hold = build_landmarks(real, spec, 365, 365), build_landmarks(holdout, spec, 365, 365)
    assert onset_counts(real, lm_real).loc[TOKEN[RARE], "positives"] < MIN_POSITIVES
    assert onset_counts(holdout, lm_hold).loc[TOKEN[UNIV], "positives"] >= MIN_POSITIVES  # excluded only as universal
    reasons = {c["token"]: c["reason"] for c in res["targets"]["candidates"]}
    assert "near-universal" in reasons[TOKEN[UNIV]]
    assert "same positives" in (reasons[TOKEN[LEAK]] or reasons[TOKEN[TGT]])
    # nothing has this many positives: no condition task, mortality still reported
    none = utility_report(real, cohorts["fresh"], spec, holdout=holdout, min_positives=10**6, bootstrap=0)
    assert none["targets"]["chosen"] == [] and list(none["tasks"]) == ["mortality"]


def test_tiny_cohort_is_not_computable_with_a_reason(tmp_path):
    t0 = datetime(2010, 3, 1, tzinfo=timezone.utc)
    tls = [Timeline(PatientInfo(f"y{i}", sex="female", birth_date=datetime(1990, 1, 1).date()),
                    [Event(time=t0 + k * YEAR, kind="observation", system="http://loinc.org", code="8867-4",
                           value=70.0 + k, unit="/min") for k in range(6)]) for i in range(12)]
    write_timelines(tls, tmp_path / "tiny")
    tiny = load_cohort(tmp_path / "tiny")
    res = utility_report(tiny, tiny, feature_spec(tiny))
    mort = res["tasks"]["mortality"]
    assert mort["computable"] is False and "positives" in mort["reason"]
    assert res["summary"]["mean_ratio"] is None and res["summary"]["reason"]
