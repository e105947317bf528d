"""A small random cohort generator with known structure (chronic conditions, vitals, labs, deaths).

Used by the evaluator's tests and the study script's smoke mode: metrics need data with signal, and the real
pipeline (ingest/train/generate) is not required to exercise them. Not a model of anything clinical.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import numpy as np

from fhirsynth.timeline.types import Event, PatientInfo, Timeline

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"

# code, display, yearly hazard at age 60, hazard doubling per 10 years, sex restriction
CHRONIC = [
    ("59621000", "Essential hypertension", 0.05, 1.8, None),
    ("44054006", "Diabetes mellitus type 2", 0.025, 1.6, None),
    ("55822004", "Hyperlipidemia", 0.04, 1.5, None),
    ("370143000", "Major depressive disorder", 0.015, 1.0, None),
    ("126906006", "Neoplasm of prostate", 0.01, 2.0, "male"),
]
ACUTE = [("444814009", "Viral sinusitis", 0.15), ("195662009", "Acute viral pharyngitis", 0.1),
         ("10509002", "Acute bronchitis", 0.05)]
PREGNANCY = ("72892002", "Normal pregnancy")
# code, display, unit, mean, sd
VITALS = [("8867-4", "Heart rate", "/min", 75.0, 10.0), ("8480-6", "Systolic blood pressure", "mm[Hg]", 120.0, 12.0),
          ("8462-4", "Diastolic blood pressure", "mm[Hg]", 78.0, 8.0),
          ("39156-5", "Body mass index", "kg/m2", 26.0, 4.0),
          ("29463-7", "Body weight", "kg", 75.0, 14.0)]
LABS = [("2339-0", "Glucose", "mg/dL", 95.0, 12.0), ("4548-4", "Hemoglobin A1c", "%", 5.5, 0.4),
        ("2093-3", "Total cholesterol", "mg/dL", 190.0, 30.0)]


def _dt(day: float) -> datetime:
    return datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(days=float(day))


def toy_timelines(n: int, *, seed: int = 0, visits_per_year: float = 1.5, code_prefix: str = "",
                  hazard_scale: float = 1.0, id_prefix: str = "p", end_year: int = 2025) -> list[Timeline]:
    """n random patients. code_prefix renames every code (disjoint vocabularies for tests);
    hazard_scale multiplies chronic hazards (a shifted distribution)."""
    rng = np.random.default_rng(seed)
    end_day = (date(end_year, 1, 1) - date(1970, 1, 1)).days
    out: list[Timeline] = []
    for i in range(n):
        sex = "female" if rng.random() < 0.5 else "male"
        age_now = rng.uniform(18, 85)
        birth_day = end_day - age_now * 365.25
        birth = (_dt(birth_day)).date()
        start = birth_day + min(rng.uniform(15, 30), age_now - 2) * 365.25
        n_years = (end_day - start) / 365.25
        n_vis = max(1, rng.poisson(visits_per_year * n_years))
        vis_days = np.sort(rng.uniform(start, end_day, n_vis)).round()
        onset: dict[str, float] = {}
        for code, _disp, h, dbl, only in CHRONIC:
            if only and only != sex:
                continue
            # piecewise hazard by year of life between start and end
            for year in np.arange(start, end_day, 365.25):
                age = (year - birth_day) / 365.25
                if rng.random() < hazard_scale * h * dbl ** ((age - 60) / 10):
                    onset[code] = year + rng.uniform(0, 365)
                    break
        frailty = 0.002 * 1.9 ** ((end_day - birth_day) / 3652.5 - 6) * (1 + len(onset))
        death_day = end_day - rng.uniform(0, 5 * 365) if rng.random() < min(0.6, frailty * 20) else None
        if death_day is not None:
            vis_days = vis_days[vis_days <= death_day] if (vis_days <= death_day).any() else vis_days[:1]
            death_day = max(death_day, float(vis_days[-1]) + 1)
        events: list[Event] = []
        diagnosed: set[str] = set()
        for v, day in enumerate(vis_days):
            t = _dt(day)
            enc_id = f"{id_prefix}{i}-e{v}"
            events.append(Event(time=t, kind="encounter", system=ACT, code=code_prefix + "AMB", encounter_id=enc_id,
                                end_time=t + timedelta(minutes=30), status="finished"))
            for code, disp, *_ in CHRONIC:
                if code in onset and onset[code] <= day and code not in diagnosed:
                    diagnosed.add(code)
                    events.append(Event(time=t, kind="condition", system=SNOMED, code=code_prefix + code, display=disp,
                                        category="problem-list-item", encounter_id=enc_id, status="active"))
            for code, disp, p in ACUTE:
                if rng.random() < p:
                    events.append(Event(time=t, kind="condition", system=SNOMED, code=code_prefix + code, display=disp,
                                        category="encounter-diagnosis", encounter_id=enc_id, status="resolved",
                                        end_time=t + timedelta(days=int(rng.integers(5, 20)))))
            age = (day - birth_day) / 365.25
            if sex == "female" and 18 < age < 42 and rng.random() < 0.04:
                events.append(Event(time=t, kind="condition", system=SNOMED, code=code_prefix + PREGNANCY[0],
                                    display=PREGNANCY[1], encounter_id=enc_id, status="resolved",
                                    end_time=t + timedelta(days=270)))
            htn = "59621000" in diagnosed
            dm = "44054006" in diagnosed
            for code, disp, unit, mu, sd in VITALS:
                shift = (15.0 if htn and code == "8480-6" else 0.0) + (0.1 * (age - 50) if code == "8480-6" else 0.0)
                shift += (-8.0 if sex == "female" and code == "29463-7" else 0.0)
                events.append(Event(time=t, kind="observation", system=LOINC, code=code_prefix + code, display=disp,
                                    value=round(float(rng.normal(mu + shift, sd)), 1), unit=unit,
                                    category="vital-signs", encounter_id=enc_id, status="final"))
            if rng.random() < 0.4 or dm:
                for code, disp, unit, mu, sd in LABS:
                    shift = (60.0 if dm and code == "2339-0" else 0.0) + (1.8 if dm and code == "4548-4" else 0.0)
                    events.append(Event(time=t, kind="observation", system=LOINC, code=code_prefix + code,
                                        display=disp, value=round(float(rng.normal(mu + shift, sd)), 1), unit=unit,
                                        category="laboratory", encounter_id=enc_id, status="final"))
        patient = PatientInfo(patient_id=f"{id_prefix}{i}", sex=sex, birth_date=birth,
                              death_date=_dt(death_day) if death_day is not None else None,
                              deceased=death_day is not None)
        out.append(Timeline(patient=patient, events=events).sorted())
    return out
