"""benchmarks/dp_smartnoise.py's per-patient code table and its way back to timelines (plain Python: smartnoise-synth
itself runs in its own venv and is not needed here)."""

from __future__ import annotations

from datetime import date, datetime, timezone

import numpy as np
from bench_module import benchmark_module
from test_model_helpers import make_timelines

from fhirsynth.records_metrics import Records
from fhirsynth.timeline.types import Event, PatientInfo, Timeline

dpi = benchmark_module("dp_independent")
dps = benchmark_module("dp_smartnoise")
SCT = "http://snomed.info/sct"


def _ev(day: date, kind: str, code: str) -> Event:
    return Event(time=datetime(day.year, day.month, day.day, tzinfo=timezone.utc), kind=kind, system=SCT, code=code)


def _hand_cohort() -> list[Timeline]:
    return [
        # 30 at the last event (a medication: it counts for the age, not as a code)
        Timeline(PatientInfo("a", sex="female", birth_date=date(1990, 6, 1)),
                 [_ev(date(2010, 1, 1), "condition", "x"), _ev(date(2015, 1, 1), "observation", "y"),
                  _ev(date(2015, 2, 1), "condition", "x"), _ev(date(2021, 1, 1), "medication", "m")]),
        Timeline(PatientInfo("b", sex="male", birth_date=date(1920, 1, 1)),  # 100: the 90+ band
                 [_ev(date(2020, 1, 1), "condition", "x")]),
        Timeline(PatientInfo("c", sex=None, birth_date=None), [_ev(date(2020, 1, 1), "observation", "z")]),
        Timeline(PatientInfo("d", sex="other", birth_date=date(2000, 1, 1)), []),
    ]


def test_choose_codes_keeps_the_common_codes_most_common_first_and_caps_them():
    tls = _hand_cohort()
    x, y, z = ("condition", SCT, "x"), ("observation", SCT, "y"), ("observation", SCT, "z")
    assert dps.choose_codes(tls, min_share=0.25) == [x, y, z]  # x held by 2 of 4; y, z by 1 (tie: by key)
    assert dps.choose_codes(tls, min_share=0.5) == [x]
    assert dps.choose_codes(tls, min_share=0.25, max_codes=2) == [x, y]


def test_code_table_has_one_row_per_patient_with_sex_age_band_and_held_codes():
    tls = _hand_cohort()
    codes = dps.choose_codes(tls, min_share=0.25)
    t = dps.code_table(tls, codes)
    assert list(t.columns) == ["sex", "age", "c000", "c001", "c002"]
    assert t["sex"].tolist() == [dps.SEXES.index(s) for s in ("female", "male", "unknown", "other")]
    assert t["age"].tolist() == [3, dps.N_BANDS - 1, dps.N_BANDS, dps.N_BANDS]  # no birth date / no event: unknown
    assert t[["c000", "c001", "c002"]].to_numpy().tolist() == [[1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0]]


def test_table_rows_become_timelines_with_one_event_per_held_code():
    tls = _hand_cohort()
    codes = dps.choose_codes(tls, min_share=0.25)
    back = dps.table_timelines(dps.code_table(tls, codes), codes, prefix="mst")
    assert [b.patient.patient_id for b in back] == ["mst-0", "mst-1", "mst-2", "mst-3"]
    assert [len(b.events) for b in back] == [2, 1, 1, 0]  # patient a's two x events are one held code
    assert {e.time for b in back for e in b.events} == {datetime(2020, 1, 1, tzinfo=timezone.utc)}
    assert [b.patient.sex for b in back] == ["female", "male", "unknown", "other"]
    assert back[0].patient.birth_date == date(1985, 1, 1)  # 35 on the table's day: the middle of the 30s band
    assert back[1].patient.birth_date == date(1925, 1, 1)
    assert back[2].patient.birth_date is None and back[3].patient.birth_date is None


def test_round_trip_keeps_every_patients_chosen_codes_sex_and_age_band():
    tls = make_timelines(80, seed=5)
    codes = dps.choose_codes(tls, min_share=0.0, max_codes=10**6)
    table = dps.code_table(tls, codes)
    # what run_baseline reads back from smartnoise's CSV: plain int columns
    back = dps.table_timelines(table.astype(str).astype(int), codes)
    for tl, b in zip(tls, back, strict=True):
        assert dpi.patient_keys(b) == dpi.patient_keys(tl)
        assert dps.age_band(b) == dps.age_band(tl)
        assert b.patient.sex == (tl.patient.sex if tl.patient.sex in dps.SEXES else "unknown")
    # so records_metrics sees the same per-code prevalence (what MST is fitted to reproduce)
    prev_real, prev_back = Records(tls).prevalence(), Records(back).prevalence()
    assert np.allclose(prev_back.reindex(prev_real.index).to_numpy(), prev_real.to_numpy())
    # a cap drops the rarer codes from the table, and so from the timelines
    capped = dps.choose_codes(tls, max_codes=3)
    kept = dps.table_timelines(dps.code_table(tls, capped), capped)
    assert {k for b in kept for k in dpi.patient_keys(b)} <= set(capped)
