"""Known answers of the issue-18 fidelity metrics (records_metrics: per-kind prevalence, drug-for-disease
co-occurrence, vaccine timing) on hand-made cohorts."""

from __future__ import annotations

import math
from datetime import date, datetime, timedelta, timezone

import numpy as np
import pytest

from fhirsynth.records_metrics import (
    Records,
    condition_medication_cooc_r2,
    condition_medication_shares,
    first_year,
    kind_prevalence,
    kind_prevalence_r2,
    rest_compare,
    vaccine_age_shares,
)
from fhirsynth.timeline.types import Event, PatientInfo, Timeline

SCT, RX, CVX = "http://snomed.info/sct", "http://www.nlm.nih.gov/research/umls/rxnorm", "http://hl7.org/fhir/sid/cvx"
BIRTH = date(2000, 1, 1)


def _at(years: float) -> datetime:
    return datetime(2000, 1, 1, tzinfo=timezone.utc) + timedelta(days=years * 365.25)


def _tl(pid: str, *events: tuple[str, str, str, float]) -> Timeline:
    return Timeline(PatientInfo(pid, sex="female", birth_date=BIRTH),
                    [Event(time=_at(age), kind=kind, system=system, code=code) for kind, system, code, age in events])


def _cohort(med_a: str) -> list[Timeline]:
    """Patients 0, 1: condition A with drug med_a; patient 2: condition B with drug Y; patient 3: two vaccines."""
    return [
        _tl("p0", ("condition", SCT, "A", 30), ("medication", RX, med_a, 30)),
        _tl("p1", ("condition", SCT, "A", 40), ("medication", RX, med_a, 41)),
        _tl("p2", ("condition", SCT, "B", 50), ("medication", RX, "Y", 50)),
        _tl("p3", ("immunization", CVX, "08", 0.5), ("immunization", CVX, "140", 30)),
    ]


def test_prevalence_and_pairs_known_answers() -> None:
    real = Records(_cohort("X"))
    prev = kind_prevalence(real, "medication")
    assert prev[f"medication|{RX}|X"] == 0.5 and prev[f"medication|{RX}|Y"] == 0.25
    conds = [f"condition|{SCT}|A", f"condition|{SCT}|B"]
    meds = [f"medication|{RX}|X", f"medication|{RX}|Y"]
    assert condition_medication_shares(real, conds, meds).tolist() == [[0.5, 0.0], [0.0, 0.25]]
    assert vaccine_age_shares(real).tolist() == pytest.approx([0.5, 0, 0, 0, 0, 0.5, 0])


def test_identical_cohorts_score_one_and_a_swapped_drug_scores_what_the_formula_says() -> None:
    real = Records(_cohort("X"))
    assert kind_prevalence_r2(real, Records(_cohort("X")), "medication") == (1.0, 2)
    assert condition_medication_cooc_r2(real, Records(_cohort("X"))) == (1.0, 4)
    # A's patients get Y instead of X: pairs (A,X), (A,Y), (B,X), (B,Y) = real [.5, 0, 0, .25], other [0, .5, 0, .25]
    r, o = np.array([0.5, 0, 0, 0.25]), np.array([0, 0.5, 0, 0.25])
    expected = 1 - ((r - o) ** 2).sum() / ((r - r.mean()) ** 2).sum()
    got, n = condition_medication_cooc_r2(real, Records(_cohort("Y")))
    assert n == 4 and got == pytest.approx(expected) and got < 0
    # medication prevalence: real X .5, Y .25; other X 0, Y .75
    pr, po = np.array([0.5, 0.25]), np.array([0.0, 0.75])
    exp_prev = 1 - ((pr - po) ** 2).sum() / ((pr - pr.mean()) ** 2).sum()
    assert kind_prevalence_r2(real, Records(_cohort("Y")), "medication")[0] == pytest.approx(exp_prev)


def test_vaccine_band_difference_in_points() -> None:
    real = Records(_cohort("X"))
    # other: both vaccines in infancy -> band 0-1y share 1.0 against 0.5: 50 points
    other = Records([_tl("q", ("immunization", CVX, "08", 0.2), ("immunization", CVX, "08", 0.7))])
    table = rest_compare(real, other)
    assert table["vaccine_age_band_max_diff_points"] == pytest.approx(50.0)
    assert table["vaccine_share_0-1y"] == 1.0 and table["vaccine_share_65y+"] == 0.0
    assert table["immunization_patient_share"] == 1.0 and table["medication_patient_share"] == 0.0
    assert math.isnan(table["allergy_prevalence_r2"]) and table["allergy_codes"] == 0.0


def test_first_year_counts_who_reaches_it_and_its_vaccines_per_encounter() -> None:
    enc = ("encounter", "http://terminology.hl7.org/CodeSystem/v3-ActCode", "AMB")
    cohort = Records([
        _tl("a", (*enc, 0.2), ("immunization", CVX, "08", 0.2), ("immunization", CVX, "20", 0.2), (*enc, 0.5),
            ("immunization", CVX, "20", 0.5), (*enc, 3.0), ("immunization", CVX, "03", 3.0)),
        _tl("b", (*enc, 0.9)),
        _tl("c", ("condition", SCT, "A", 30))])  # never seen as an infant
    assert first_year(cohort) == pytest.approx({"first_year_reached_share": 2 / 3,
                                                "first_year_encounters_per_patient": 1.5,
                                                "first_year_vaccines_per_encounter": 1.0})
    assert rest_compare(cohort, Records([_tl("c", ("condition", SCT, "A", 30))]))[
        "first_year_reached_share"] == 0.0


def test_evaluate_reports_the_rest_of_the_patient_only_where_real_has_it(tmp_path) -> None:
    from fhirsynth.evaluate.cohort import load_cohort
    from fhirsynth.evaluate.fidelity import rest_of_patient
    from fhirsynth.timeline.io import write_timelines

    write_timelines(_cohort("X"), tmp_path / "real")
    write_timelines(_cohort("Y"), tmp_path / "other")
    real, other = load_cohort(tmp_path / "real"), load_cohort(tmp_path / "other")
    got = rest_of_patient(real, other)
    assert set(got["prevalence"]) == {"medication", "immunization"}  # the kinds real has
    assert got["prevalence"]["immunization"]["r2"] is None or got["prevalence"]["immunization"]["r2"] == 1.0
    r, o = np.array([0.5, 0, 0, 0.25]), np.array([0, 0.5, 0, 0.25])
    expected = 1 - ((r - o) ** 2).sum() / ((r - r.mean()) ** 2).sum()
    assert got["drug_for_disease"]["n_pairs"] == 4 and got["drug_for_disease"]["r2"] == pytest.approx(expected)
    assert got["vaccine_age_bands"]["max_diff_points"] == 0.0
    assert got["vaccine_age_bands"]["real"]["0-1y"] == 0.5
    # a real cohort without these kinds: no section at all (the report of such cohorts is unchanged)
    write_timelines([_tl("c", ("condition", SCT, "A", 3))], tmp_path / "plain")
    assert rest_of_patient(load_cohort(tmp_path / "plain"), other) is None


def test_plausibility_flags_a_course_running_past_the_death(tmp_path) -> None:
    from fhirsynth.evaluate.cohort import load_cohort
    from fhirsynth.evaluate.plausibility import plausibility_report
    from fhirsynth.timeline.io import write_timelines

    dead = _tl("d", ("medication", RX, "X", 30), ("medication", RX, "Y", 30))
    dead.patient.death_date = _at(30.5)
    dead.events[0].end_time = _at(31)  # half a year after the death
    dead.events[1].end_time = _at(30.2)  # ends before it
    write_timelines([dead, _tl("a", ("medication", RX, "X", 10))], tmp_path / "c")
    rep = plausibility_report({"synthetic": load_cohort(tmp_path / "c")}, None)["synthetic"]
    assert rep["course_end_after_death"]["events"] == 1
    assert rep["course_end_after_death"]["event_rate"] == 0.5  # of the 2 courses with an end
    assert rep["events_after_death"]["events"] == 0  # both started before it
