"""Evaluator metrics on constructed cohorts whose answers are known."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from fhirsynth.evaluate.cohort import load_cohort
from fhirsynth.evaluate.fidelity import (
    compare_vectors,
    detection_auc,
    fidelity_report,
    gaussian_copula_hellinger,
    r2_identity,
)
from fhirsynth.evaluate.plausibility import plausibility_report
from fhirsynth.evaluate.privacy import code_sets, copy_rates, dcr_overfitting, distance_attack, min_hamming
from fhirsynth.evaluate.tables import feature_spec, flatten
from fhirsynth.evaluate.toy import toy_timelines
from fhirsynth.evaluate.utility import utility_report
from fhirsynth.timeline.io import write_timelines
from fhirsynth.timeline.types import Event, PatientInfo, Timeline

N = 200


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    specs = {"real": dict(seed=1), "holdout": dict(seed=2, id_prefix="h"), "fresh": dict(seed=3, id_prefix="s"),
             "disjoint": dict(seed=4, code_prefix="X", id_prefix="x")}
    out = {}
    for name, kw in specs.items():
        write_timelines(toy_timelines(N, visits_per_year=0.8, **kw), root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def cohorts(dirs):
    return {name: load_cohort(path, name) for name, path in dirs.items()}


def test_load_cohort_visits_and_patients(cohorts):
    real = cohorts["real"]
    assert real.n == N
    assert real.events["pidx"].between(0, N - 1).all()
    # visits are patient-days: unique (pidx, day) pairs, numbered in order within each patient
    v = real.visits
    assert len(v) == len(real.events[["pidx", "iday"]].drop_duplicates())
    assert (v.groupby("pidx")["vrank"].apply(lambda s: (s.to_numpy() == np.arange(len(s))).all())).all()


def test_r2_basics():
    x = np.array([0.1, 0.5, 0.9])
    assert r2_identity(x, x) == 1.0
    assert r2_identity(x, x[::-1]) < 0
    assert r2_identity(np.ones(3), x) is None  # undefined when real has no variance


def test_identical_cohort_is_perfect(cohorts):
    real = cohorts["real"]
    spec = feature_spec(real)
    table = flatten(real, spec)
    m, plots = fidelity_report(real, real, real_table=table, other_table=table)
    for kind in ("condition", "observation"):
        assert m["prevalence"][kind]["r2"] == pytest.approx(1.0)
    assert m["cooccurrence"]["r2"] == pytest.approx(1.0)
    assert m["transitions"]["r2"] == pytest.approx(1.0)
    assert m["marginal"]["condition"]["kl"] == pytest.approx(0.0, abs=1e-12)
    for name in ("age_at_first_event_years", "events_per_patient", "visits_per_patient", "days_between_visits"):
        assert m["distributions"][name]["ks"] == 0.0
    assert m["ordering"]["mean_abs_diff"] == 0.0
    assert m["marginal_1way"]["tvd"] == pytest.approx(0.0, abs=1e-12)
    assert m["marginal_2way"]["tvd"] == pytest.approx(0.0, abs=1e-12)
    assert abs(m["detection"]["auc"] - 0.5) < 0.1
    assert plots["prevalence_condition"] and all(a == b for a, b in plots["prevalence_condition"])


def test_iid_sample_close_disjoint_codes_far(cohorts):
    real, fresh, disjoint = cohorts["real"], cohorts["fresh"], cohorts["disjoint"]
    spec = feature_spec(real)
    t_real = flatten(real, spec)
    iid, _ = fidelity_report(real, fresh, real_table=t_real, other_table=flatten(fresh, spec))
    far, _ = fidelity_report(real, disjoint, real_table=t_real, other_table=flatten(disjoint, spec))
    assert iid["prevalence"]["condition"]["r2"] > 0.8
    assert far["prevalence"]["condition"]["r2"] < 0.0
    assert far["prevalence"]["condition"]["n_only_other"] > 0
    assert far["marginal"]["condition"]["kl"] > 10 * iid["marginal"]["condition"]["kl"]
    assert far["cooccurrence"]["r2"] < 0.2 < iid["cooccurrence"]["r2"]
    assert far["detection"]["auc"] > 0.9
    assert iid["detection"]["auc"] < 0.7
    assert far["marginal_2way"]["tvd"] > 2 * iid["marginal_2way"]["tvd"]
    assert far["marginal_2way"]["vs_null"] == "farther"


def test_compare_vectors_counts_missing_keys():
    import pandas as pd

    out = compare_vectors(pd.Series({"a": 0.5, "b": 0.2}), pd.Series({"b": 0.2, "c": 0.1}))
    assert out["n_keys"] == 3 and out["n_only_real"] == 1 and out["n_only_other"] == 1


def test_hellinger_gaussian_shift():
    import pandas as pd

    rng = np.random.default_rng(0)
    a = pd.DataFrame(rng.normal(size=(2000, 3)), columns=list("xyz"))
    b = pd.DataFrame(rng.normal(size=(2000, 3)), columns=list("xyz"))
    c = b + 3.0
    assert gaussian_copula_hellinger(a, b) < 0.1
    assert gaussian_copula_hellinger(a, c) > 0.9
    assert detection_auc(a, c)["auc"] > 0.95


def test_dcr_and_distance_attack(cohorts):
    real, holdout, fresh = cohorts["real"], cohorts["holdout"], cohorts["fresh"]
    tr, ho, fr = code_sets([real, holdout, fresh])
    rng = np.random.default_rng(0)
    iid = dcr_overfitting(fr, tr, ho, rng)
    assert 0.35 < iid["share_closer_to_training"] < 0.65
    copied = dcr_overfitting(tr, tr, ho, rng)  # a generator that replays its training data
    assert copied["share_closer_to_training"] > iid["share_closer_to_training"] + 0.1
    assert copied["median_dcr_training"] == 0.0
    assert abs(distance_attack(tr, ho, fr)["auc"] - 0.5) < 0.1
    assert distance_attack(tr, ho, tr)["auc"] > 0.6  # coarse toy code sets: many patients share one


def test_distance_attack_detects_replayed_records():
    import scipy.sparse as sp

    rng = np.random.default_rng(2)
    members = sp.csr_matrix((rng.random((300, 200)) < 0.05).astype(np.float32))
    nonmembers = sp.csr_matrix((rng.random((300, 200)) < 0.05).astype(np.float32))
    fresh = sp.csr_matrix((rng.random((300, 200)) < 0.05).astype(np.float32))
    leak = distance_attack(members, nonmembers, members[:150])  # half the members copied into the output
    assert leak["auc"] > 0.7 and leak["tpr_at_1pct_fpr"] > 0.3
    clean = distance_attack(members, nonmembers, fresh)
    assert abs(clean["auc"] - 0.5) < 0.08 and clean["tpr_at_1pct_fpr"] < 0.1


def test_min_hamming_matches_brute_force():
    import scipy.sparse as sp

    rng = np.random.default_rng(1)
    a = (rng.random((7, 12)) < 0.4).astype(np.float32)
    b = (rng.random((5, 12)) < 0.4).astype(np.float32)
    brute = np.abs(a[:, None, :] - b[None, :, :]).sum(2).min(1)
    assert np.array_equal(min_hamming(sp.csr_matrix(a), sp.csr_matrix(b), chunk=3), brute)


def test_exact_copies(cohorts):
    real, holdout, fresh = cohorts["real"], cohorts["holdout"], cohorts["fresh"]
    assert copy_rates(real, real, holdout)["synthetic_trajectory_copy_rate"] == 1.0
    rates = copy_rates(real, fresh, holdout)
    assert rates["synthetic_trajectory_copy_rate"] == 0.0 and rates["holdout_trajectory_copy_rate"] == 0.0


def test_utility_tasks_and_not_computable(cohorts, tmp_path):
    real, holdout, fresh = cohorts["real"], cohorts["holdout"], cohorts["fresh"]
    spec = feature_spec(real)
    res = utility_report(real, fresh, spec, holdout=holdout)
    mort = res["tasks"]["mortality"]
    assert mort["computable"], mort
    assert 0.5 < mort["trtr_auroc"] <= 1.0 and 0.5 < mort["tstr_auroc"] <= 1.0
    assert mort["ratio"] == pytest.approx(mort["tstr_auroc"] / mort["trtr_auroc"])
    # nobody dies in a 12-patient cohort made of young patients: the task must say why it is not computable
    write_timelines([_patient(f"y{i}", [(2020, "8867-4", 70.0), (2021, "8867-4", 72.0), (2022, "8867-4", 75.0)])
                     for i in range(12)], tmp_path / "tiny")
    tiny = load_cohort(tmp_path / "tiny")
    res2 = utility_report(tiny, tiny, feature_spec(tiny))
    assert res2["tasks"]["mortality"]["computable"] is False
    assert "positives" in res2["tasks"]["mortality"]["reason"]


def _patient(pid: str, obs: list[tuple[int, str, float]], *, sex: str = "female", birth: date = date(1990, 1, 1),
             death: datetime | None = None, extra: list[Event] = ()) -> Timeline:
    events = [Event(time=datetime(y, 3, 1, tzinfo=timezone.utc), kind="observation", system="http://loinc.org",
                    code=c, value=v, unit="/min") for y, c, v in obs]
    return Timeline(PatientInfo(pid, sex=sex, birth_date=birth, death_date=death, deceased=death is not None),
                    events + list(extra)).sorted()


def test_plausibility_counts_each_violation(tmp_path):
    t0 = datetime(2020, 1, 1, tzinfo=timezone.utc)
    bad = [
        _patient("a", [(1980, "8867-4", 70.0)]),  # before birth (1990)
        _patient("b", [(2020, "8867-4", 70.0), (2023, "8867-4", 70.0)],
                 death=datetime(2021, 1, 1, tzinfo=timezone.utc)),  # event after death
        _patient("c", [(2020, "8867-4", 900.0)]),  # heart rate out of range
        _patient("d", [(2020, "8867-4", 70.0)], sex="male",
                 extra=[Event(time=t0, kind="condition", system="http://snomed.info/sct", code="72892002")]),
        _patient("e", [(2020, "8867-4", 70.0)],
                 extra=[Event(time=t0, kind="condition", system="http://snomed.info/sct", code="444814009",
                              end_time=t0 - timedelta(days=3))]),
    ]
    write_timelines(bad, tmp_path / "bad")
    c = load_cohort(tmp_path / "bad")
    rep = plausibility_report({"synthetic": c}, None)["synthetic"]
    for key in ("events_before_birth", "events_after_death", "physiologic_range", "sex_specific_code",
                "abatement_before_onset"):
        assert rep[key]["events"] == 1, (key, rep[key])
        assert rep[key]["patient_rate"] == pytest.approx(1 / 5)


def test_plausibility_clean_toy_data(cohorts):
    rep = plausibility_report({"real": cohorts["real"]}, None)["real"]
    assert all(v["events"] == 0 for v in rep.values() if isinstance(v, dict) and "events" in v)
    assert rep["enforced_by_sampler"] is True and rep["held_out_rules"]["enforced_by_sampler"] is False


def test_attack_auc_interval_covers_chance_and_separation():
    import numpy as np

    from fhirsynth.evaluate.privacy import attack_metrics

    rng = np.random.default_rng(3)
    same = attack_metrics(rng.normal(size=300), rng.normal(size=300))
    lo, hi = same["auc_ci95"]
    assert lo < 0.5 < hi and hi - lo < 0.2
    apart = attack_metrics(rng.normal(5, 1, 300), rng.normal(size=300))
    assert apart["auc"] > 0.99 and apart["auc_ci95"][0] > 0.98


def test_ks_interval_brackets_the_statistic_and_separates_a_shift():
    import numpy as np

    from fhirsynth.evaluate.fidelity import compare_samples

    rng = np.random.default_rng(5)
    same = compare_samples(rng.normal(size=400), rng.normal(size=300))
    shifted = compare_samples(rng.normal(size=400), rng.normal(1.0, 1.0, size=300))
    for r in (same, shifted):
        assert r["ks_ci95"][0] <= r["ks"] <= r["ks_ci95"][1]
    assert shifted["ks_ci95"][0] > same["ks_ci95"][1]


def test_code_sets_see_medications_vaccines_procedures_and_allergies(tmp_path):
    """The distance attack's code sets cover issue 18's kinds: two patients who differ only in a drug differ."""
    t0 = datetime(2020, 1, 1, tzinfo=timezone.utc)
    kinds = [("medication", "http://www.nlm.nih.gov/research/umls/rxnorm", "314076"),
             ("immunization", "http://hl7.org/fhir/sid/cvx", "140"),
             ("procedure", "http://snomed.info/sct", "430193006"), ("allergy", "http://snomed.info/sct", "300913006")]
    tls = [Timeline(PatientInfo(f"p{i}", sex="female", birth_date=date(1970, 1, 1)),
                    [Event(time=t0, kind="condition", system="http://snomed.info/sct", code="44054006")]
                    + [Event(time=t0, kind=k, system=s, code=c)])
               for i, (k, s, c) in enumerate(kinds + [kinds[0]])]
    write_timelines(tls, tmp_path / "c")
    (m,) = code_sets([load_cohort(tmp_path / "c", "c")])
    rows = m.toarray()
    assert rows.shape == (5, 5)  # the condition and the four kinds' codes
    assert len({tuple(r) for r in rows[:4]}) == 4 and (rows[0] == rows[4]).all()
