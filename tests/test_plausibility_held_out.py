"""Held-out plausibility rules (not enforced by the sampler): each flags exactly the records built to break it."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest

from fhirsynth.evaluate.cohort import load_cohort
from fhirsynth.evaluate.plausibility import held_out_rules
from fhirsynth.timeline.io import TimelineWriter
from fhirsynth.timeline.types import Event, PatientInfo, Timeline

LOINC = "http://loinc.org"


def _obs(t: datetime, code: str, value: float, unit: str) -> Event:
    return Event(time=t, kind="observation", system=LOINC, code=code, value=value, unit=unit,
                 category="vital-signs", status="final")


def _patient(pid: str, birth: date, visits: list[tuple[int, dict[str, float]]]) -> Timeline:
    start = datetime(birth.year, birth.month, birth.day, 9, tzinfo=timezone.utc)
    units = {"8480-6": "mm[Hg]", "8462-4": "mm[Hg]", "39156-5": "kg/m2", "29463-7": "kg", "8302-2": "cm"}
    events = [_obs(start + timedelta(days=day), code, v, units[code]) for day, vals in visits
              for code, v in vals.items()]
    return Timeline(patient=PatientInfo(patient_id=pid, sex="female", birth_date=birth), events=events).sorted()


@pytest.fixture()
def cohort(tmp_path):
    good_adult = {"8480-6": 120, "8462-4": 80, "29463-7": 70.0, "8302-2": 175.0, "39156-5": 22.9}
    tls = [
        _patient("ok", date(1980, 1, 1), [(15000, good_adult), (15400, good_adult)]),
        # diastolic above systolic on one of two days
        _patient("bp", date(1980, 1, 1), [(15000, {"8480-6": 110, "8462-4": 70}),
                                          (15100, {"8480-6": 85, "8462-4": 95})]),
        # BMI 30 where 70 kg / 1.75 m^2 gives 22.9
        _patient("bmi", date(1980, 1, 1), [(15000, {**good_adult, "39156-5": 30.0})]),
        # a 6-year-old who shrinks by 5 cm in a year, then grows; an adult whose height drops is not checked
        _patient("child", date(2010, 1, 1), [(2200, {"8302-2": 120.0}), (2565, {"8302-2": 115.0}),
                                             (2930, {"8302-2": 125.0})]),
        _patient("adult", date(1950, 1, 1), [(20000, {"8302-2": 170.0}), (20400, {"8302-2": 160.0})]),
    ]
    with TimelineWriter(tmp_path / "tl") as w:
        for tl in tls:
            w.add(tl)
    return load_cohort(tmp_path / "tl")


def test_each_held_out_rule_flags_only_its_violations(cohort):
    r = held_out_rules(cohort)
    assert r["enforced_by_sampler"] is False
    bp = r["diastolic_not_below_systolic"]
    assert (bp["checked"], bp["violations"]) == (5, 1)  # ok x2, bp x2, bmi x1 days with both pressures
    bmi = r["bmi_inconsistent_with_weight_height"]
    assert (bmi["checked"], bmi["violations"]) == (3, 1)
    child = r["child_height_decrease"]
    assert (child["checked"], child["violations"]) == (2, 1)  # the adult's drop is not a child's
    assert child["patient_rate"] == pytest.approx(1 / 5)


def test_codes_absent_from_a_cohort_are_not_checked(tmp_path):
    from fhirsynth.evaluate.toy import toy_timelines
    from fhirsynth.timeline.io import write_timelines

    write_timelines(toy_timelines(20), tmp_path / "toy")
    r = held_out_rules(load_cohort(tmp_path / "toy"))
    assert r["diastolic_not_below_systolic"]["checked"] > 0  # the toy data records blood pressure only
    for key in ("bmi_inconsistent_with_weight_height", "child_height_decrease"):
        assert r[key]["checked"] == 0 and r[key]["rate"] is None
