"""fhirsynth/records_metrics.py (issue 14's whole-records table) on hand-built timelines with known answers."""

from __future__ import annotations

import math
from datetime import date, datetime, timedelta, timezone

import numpy as np
import pytest

from fhirsynth import records_metrics as rm
from fhirsynth.timeline.types import Event, PatientInfo, Timeline

LOINC, SNOMED = "http://loinc.org", "http://snomed.info/sct"
T0 = datetime(2015, 1, 1, 9, tzinfo=timezone.utc)


def _patient(i: int, events: list[Event], deceased: bool = False) -> Timeline:
    return Timeline(PatientInfo(f"p{i}", sex="female", birth_date=date(1950 + i % 40, 1, 1), deceased=deceased),
                    events)


def _obs(day: int, code: str, value: float | None = None, unit: str | None = None, value_code: str | None = None,
         enc: str | None = None) -> Event:
    return Event(time=T0 + timedelta(days=day), kind="observation", system=LOINC, code=code, value=value, unit=unit,
                 value_code=value_code, encounter_id=enc)


def _cond(day: int, code: str, enc: str | None = None) -> Event:
    return Event(time=T0 + timedelta(days=day), kind="condition", system=SNOMED, code=code, encounter_id=enc)


def _varied_cohort(n: int = 60, seed: int = 3) -> list[Timeline]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        evs: list[Event] = []
        for v in range(int(rng.integers(2, 8))):
            enc = f"e{i}-{v}" if v % 2 else None
            day = 30 * v
            if enc:
                evs.append(Event(time=T0 + timedelta(days=day), kind="encounter", system="ActCode", code="AMB",
                                 encounter_id=enc))
            evs.append(_obs(day, "8480-6", float(rng.normal(120 + i % 7, 5)), "mm[Hg]", enc=enc))
            for c in range(8):
                if rng.random() < (c + 1) / 10:
                    evs.append(_cond(day, f"c{c}", enc))
            if rng.random() < 0.5:
                evs.append(_obs(day, "72166-2", value_code="449868002", enc=enc))
        out.append(_patient(i, evs, deceased=i % 5 == 0))
    return out


def test_identical_cohorts_score_perfectly() -> None:
    cohort = _varied_cohort()
    out = rm.records_table(cohort, cohort)
    for key in ("prevalence_r2", "patient_cooc_r2", "within_visit_cooc_r2", "transition_r2"):
        assert out[key] == pytest.approx(1.0), key
    for key in ("events_ks", "days_ks", "visits_ks", "traj_corr_maxdiff", "traj_band_mean_max_rel_diff",
                "value_kind_mismatch", "value_kind_codes", "novel_obs_code_events", "traj_band_missing"):
        assert out[key] == pytest.approx(0.0), key
    assert out["n_real"] == out["n_other"] == 60
    assert out["deceased_share_real"] == out["deceased_share_other"] == pytest.approx(0.2)
    assert out["traj_corr_real[8480-6]"] == out["traj_corr_other[8480-6]"]
    assert out["events_median_real"] == out["events_median_other"]


def test_half_the_events_gives_the_expected_ks() -> None:
    # real patient i has 2i events on 2i days, other patient i has i: {2..20} vs {1..10}, KS = 0.5 exactly
    real = [_patient(i, [_cond(d, "c0") for d in range(2 * i)]) for i in range(1, 11)]
    other = [_patient(i, [_cond(d, "c0") for d in range(i)]) for i in range(1, 11)]
    out = rm.records_table(real, other)
    assert out["events_ks"] == pytest.approx(0.5)
    assert out["days_ks"] == pytest.approx(0.5)
    assert out["visits_ks"] == pytest.approx(0.5)
    assert out["events_median_real"] == 11 and out["events_median_other"] == 5.5
    assert out["days_median_real"] == 11 and out["days_median_other"] == 5.5


def test_visits_are_encounters_plus_days_without_one() -> None:
    # one encounter spanning two days (2 distinct days, 1 visit) + 3 events on 2 days without encounter = 3 visits
    evs = [Event(time=T0, kind="encounter", system="ActCode", code="IMP", encounter_id="e1"),
           _cond(0, "c0", "e1"), _obs(1, "x", 1.0, "kg", enc="e1"),
           _cond(5, "c1"), _obs(5, "x", 2.0, "kg"), _obs(9, "x", 3.0, "kg")]
    out = rm.records_table([_patient(0, evs)], [_patient(1, evs[:3])])
    assert out["visits_median_real"] == 3 and out["visits_median_other"] == 1
    assert out["days_median_real"] == 4 and out["days_median_other"] == 2
    assert out["events_median_real"] == 5 and out["events_median_other"] == 2


def test_value_kind_mismatch_is_counted_per_code_and_unit() -> None:
    real = [_patient(0, [_obs(0, "2339-0", 5.5, "mmol/L"), _obs(1, "72166-2", value_code="8517006"),
                         _obs(2, "9279-1", 14.0, "/min")])]
    other = [_patient(0, [_obs(0, "2339-0", 99.0, "mg/dL"), _obs(1, "2339-0", 101.0, "mg/dL"),  # unit never seen
                          _obs(2, "2339-0", 5.0, "mmol/L"),  # fine
                          _obs(3, "72166-2", 1.0, "{score}"),  # quantity where real is coded
                          _obs(4, "9279-1"),  # no value where real has a quantity
                          _obs(5, "99999-9", 1.0, "kg")])]  # code real lacks: novel, not a mismatch
    out = rm.records_table(real, other)
    assert out["value_kind_mismatch"] == 4
    assert out["value_kind_codes"] == 3
    assert out["novel_obs_code_events"] == 1
    assert math.isnan(out["traj_corr_maxdiff"])  # one value per patient and code: no consecutive pairs


def test_a_record_starts_at_its_first_encounter_and_birth_week_visits_are_counted() -> None:
    """Real records begin at an encounter 28 days after birth whose condition dates from birth (the onset does not
    start the record); the other cohort's begin 2 days after birth: first-visit age KS 1, and every other patient
    has a visit in the first week of life."""
    def record(i: int, start_day: int) -> Timeline:
        birth = date(2000, 1, 1) + timedelta(days=i)
        t = datetime(birth.year, birth.month, birth.day, 10, tzinfo=timezone.utc)
        evs = [Event(time=t + timedelta(days=start_day), kind="encounter", system="ActCode", code="AMB",
                     encounter_id=f"e{i}"),
               Event(time=t, kind="condition", system=SNOMED, code="314529007", encounter_id=f"e{i}"),
               Event(time=t + timedelta(days=400), kind="observation", system=LOINC, code="x", value=1.0)]
        return Timeline(PatientInfo(f"p{i}", sex="female", birth_date=birth), evs)

    real = [record(i, 28) for i in range(20)]
    out = rm.records_table(real, [record(i, 2) for i in range(20)])
    assert out["first_visit_age_ks"] == pytest.approx(1.0)
    assert out["birth_week_visits_real"] == 0.0 and out["birth_week_visits_other"] == 1.0
    same = rm.records_table(real, real)
    assert same["first_visit_age_ks"] == 0.0 and same["birth_week_visits_other"] == 0.0
