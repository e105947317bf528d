"""Random but clinically shaped timelines for tests and benchmarks of the assembler and exporters.

No model and no real data: a small public vocabulary (LOINC vitals/labs, SNOMED conditions, v3 ActCode
encounter classes) and a seeded RNG. `edge_cases=True` mixes in the awkward inputs the assembler must still
turn into valid FHIR (partial dates, missing values, missing encounters, unknown statuses, non-OMB race codes).
"""

from __future__ import annotations

import random
from datetime import date, datetime, timedelta, timezone

from fhirsynth.timeline.types import Event, PatientInfo, Timeline

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"

CONDITIONS = (
    ("59621000", "Essential hypertension (disorder)"),
    ("44054006", "Diabetes mellitus type 2 (disorder)"),
    ("195967001", "Asthma (disorder)"),
    ("55822004", "Hyperlipidemia (disorder)"),
    ("444814009", "Viral sinusitis (disorder)"),
    ("10509002", "Acute bronchitis (disorder)"),
    ("162864005", "Body mass index 30+ - obesity (finding)"),
)
# (code, display, unit, low, high, category)
QUANTITIES = (
    ("29463-7", "Body weight", "kg", 3.0, 140.0, "vital-signs"),
    ("8302-2", "Body height", "cm", 45.0, 200.0, "vital-signs"),
    ("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2", 14.0, 45.0, "vital-signs"),
    ("8867-4", "Heart rate", "/min", 50.0, 120.0, "vital-signs"),
    ("9279-1", "Respiratory rate", "/min", 10.0, 30.0, "vital-signs"),
    ("8310-5", "Body temperature", "Cel", 35.5, 40.0, "vital-signs"),
    ("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", 60.0, 250.0, "laboratory"),
    ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 4.0, 11.0, "laboratory"),
    ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", 120.0, 300.0, "laboratory"),
)
CODED = (
    ("72166-2", "Tobacco smoking status", "social-history",
     (("266919005", "Never smoked tobacco (finding)"), ("8517006", "Ex-smoker (finding)"))),
    ("5767-9", "Appearance of Urine", "laboratory",
     (("300828003", "Clear urine (finding)"), ("167238004", "Cloudy urine (finding)"))),
)
BP = ("85354-9", "Blood pressure panel with all children optional")
BP_PARTS = (("8480-6", "Systolic blood pressure", 95.0, 170.0), ("8462-4", "Diastolic blood pressure", 55.0, 105.0))
ENCOUNTERS = (
    ("AMB", "ambulatory", "185349003", "Encounter for check up (procedure)"),
    ("AMB", "ambulatory", "162673000", "General examination of patient (procedure)"),
    ("EMER", "emergency", "50849002", "Emergency room admission (procedure)"),
    ("IMP", "inpatient encounter", "32485007", "Hospital admission (procedure)"),
)
RACES = (("2106-3", "White"), ("2054-5", "Black or African American"), ("2028-9", "Asian"), ("2131-1", "Other Race"))
ETHNICITIES = (("2186-5", "Not Hispanic or Latino"), ("2135-2", "Hispanic or Latino"))


def random_timeline(rng: random.Random, pid: str, *, visits: int = 8, edge_cases: bool = False) -> Timeline:
    """One patient with `visits` encounters, each holding conditions, vitals, labs and a BP panel."""
    sex = rng.choice(("female", "male")) if not (edge_cases and rng.random() < 0.1) else None
    birth = date(1930, 1, 1) + timedelta(days=rng.randint(0, 90 * 365))
    race = rng.choice(RACES)
    eth = rng.choice(ETHNICITIES)
    country = rng.choice(("US", "ES", None, "DE")) if edge_cases else None
    patient = PatientInfo(
        patient_id=pid,
        sex=sex,
        birth_date=None if edge_cases and rng.random() < 0.05 else birth,
        race_code=race[0],
        race_display=race[1],
        ethnicity_code=eth[0],
        ethnicity_display=eth[1],
        country=country,
        nationality=country if country and rng.random() < 0.5 else None,
        language=rng.choice(("en-US", "es", None)),
    )
    events: list[Event] = []
    t = datetime(birth.year, birth.month, birth.day, 9, 0, tzinfo=timezone.utc) + timedelta(days=rng.randint(30, 4000))
    for v in range(visits):
        t += timedelta(days=rng.randint(20, 600), minutes=rng.randint(0, 600), seconds=rng.randint(0, 59))
        cls, cls_display, etype, etype_display = rng.choice(ENCOUNTERS)
        enc_id = f"{pid}-enc-{v}"
        end = t + timedelta(minutes=rng.randint(15, 90)) if cls != "IMP" else t + timedelta(days=rng.randint(1, 9))
        events.append(
            Event(time=t, kind="encounter", system=ACT, code=cls, display=cls_display, value_system=SNOMED,
                  value_code=etype, value_display=etype_display, encounter_id=enc_id, end_time=end,
                  status=rng.choice(("finished", "finished", "in-progress", None)))
        )
        obs_enc = enc_id if not (edge_cases and rng.random() < 0.1) else rng.choice((None, "no-such-encounter"))
        prec = rng.choice(("second", "second", "day", "month", "year")) if edge_cases else "second"
        if rng.random() < 0.35:
            code, display = rng.choice(CONDITIONS)
            resolved = rng.random() < 0.4
            events.append(
                Event(time=t, kind="condition", system=SNOMED, code=code, display=display, encounter_id=obs_enc,
                      end_time=t + timedelta(days=rng.randint(5, 300)) if resolved else None,
                      status=("resolved" if resolved else "active") if not edge_cases else rng.choice(
                          ("active", "resolved", None, "weird", "remission")),
                      category=rng.choice(("encounter-diagnosis", "problem-list-item", None if edge_cases else
                                           "encounter-diagnosis", "health-concern")),
                      time_precision=prec)
            )
        for code, display, unit, lo, hi, category in rng.sample(QUANTITIES, rng.randint(2, len(QUANTITIES))):
            value: float | None = round(rng.uniform(lo, hi), 1)
            if edge_cases and rng.random() < 0.05:
                value = None
            events.append(
                Event(time=t, kind="observation", system=LOINC, code=code, display=display, value=value,
                      unit=unit if not (edge_cases and rng.random() < 0.03) else None, category=category,
                      encounter_id=obs_enc, status=rng.choice(("final", "final", "amended", None)),
                      end_time=t + timedelta(hours=1) if edge_cases and rng.random() < 0.03 else None,
                      time_precision=prec)
            )
        if rng.random() < 0.5:
            code, display, category, answers = rng.choice(CODED)
            a_code, a_display = rng.choice(answers)
            events.append(
                Event(time=t, kind="observation", system=LOINC, code=code, display=display, value_system=SNOMED,
                      value_code=a_code, value_display=a_display, category=category, encounter_id=obs_enc,
                      status="final", time_precision=prec)
            )
        parts = BP_PARTS if not (edge_cases and rng.random() < 0.1) else BP_PARTS[:1]
        for code, display, lo, hi in parts:
            events.append(
                Event(time=t, kind="observation", system=LOINC, code=code, display=display,
                      value=round(rng.uniform(lo, hi)), unit="mm[Hg]", category="vital-signs",
                      encounter_id=obs_enc, status="final", panel_system=LOINC, panel_code=BP[0],
                      panel_display=BP[1], time_precision=prec)
            )
    if rng.random() < 0.15:
        patient.deceased = True
        patient.death_date = t + timedelta(days=rng.randint(1, 300)) if rng.random() < 0.8 else None
    return Timeline(patient=patient, events=events)


def random_timelines(n: int, *, seed: int = 0, visits: int = 8, edge_cases: bool = False) -> list[Timeline]:
    rng = random.Random(seed)
    return [random_timeline(rng, f"p{i}", visits=visits, edge_cases=edge_cases) for i in range(n)]
