"""Timelines with medication, immunization, procedure and allergy events, for testing the output side of issue 18
(assembler, store, API, exports) independently of the model: the events follow the contract of
fhirsynth/timeline/types.py, added by a seeded RNG to fhirsynth.timeline.samples' timelines.

`edge_cases=True` adds what the assembler must still turn into valid FHIR: partial dates, unknown statuses and
categories, reasons with no matching Condition, events without an encounter, intervals and open courses.
"""

from __future__ import annotations

import random
from datetime import timedelta

from fhirsynth.timeline.samples import SNOMED, random_timelines
from fhirsynth.timeline.types import CRITICALITY_SYSTEM, Event, Timeline

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CVX = "http://hl7.org/fhir/sid/cvx"
# (code, display, reason condition code or None)
MEDICATIONS = (
    ("314076", "lisinopril 10 MG Oral Tablet", "59621000"),
    ("860975", "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet", "44054006"),
    ("895994", "120 ACTUAT Fluticasone propionate 0.044 MG/ACTUAT Metered Dose Inhaler", "195967001"),
    ("316672", "Simvastatin 10 MG Oral Tablet", "55822004"),
    ("308182", "Amoxicillin 250 MG Oral Capsule", "444814009"),
    ("313782", "Acetaminophen 325 MG Oral Tablet", None),
)
VACCINES = (
    ("140", "Influenza, seasonal, injectable, preservative free"),
    ("08", "Hep B, adolescent or pediatric"),
    ("20", "DTaP"),
    ("133", "Pneumococcal conjugate PCV 13"),
)
# (code, display, reason condition code or None, category)
PROCEDURES = (
    ("430193006", "Medication Reconciliation (procedure)", None, None),
    ("73761001", "Colonoscopy (procedure)", None, "103693007"),
    ("117015009", "Throat culture (procedure)", "444814009", "103693007"),
    ("23426006", "Measurement of respiratory function (procedure)", "195967001", None),
)
# (code, display, category, criticality)
ALLERGIES = (
    ("91936005", "Allergy to penicillin (finding)", "medication", "high"),
    ("300916003", "Latex allergy (finding)", "environment", "low"),
    ("417532002", "Allergy to fish (finding)", "food", "unable-to-assess"),
    ("419474003", "Allergy to mould (finding)", "environment", None),
)
ITEM_KINDS = ("medication", "immunization", "procedure", "allergy")


def add_items(tl: Timeline, rng: random.Random, *, edge_cases: bool = False) -> Timeline:
    """Items at the patient's encounters: a vaccine or procedure at some, medications for conditions, allergies."""
    encounters = [e for e in tl.events if e.kind == "encounter"]
    items: list[Event] = []
    for enc in encounters:
        t = enc.time
        prec = rng.choice(("second", "second", "day", "month", "year")) if edge_cases else "second"
        enc_id = enc.encounter_id if not (edge_cases and rng.random() < 0.15) else None
        if rng.random() < 0.6:
            code, display, reason = rng.choice(MEDICATIONS)
            end = t + timedelta(days=rng.randint(7, 365)) if rng.random() < 0.6 else None
            reason_sys = SNOMED
            if edge_cases and rng.random() < 0.2:
                reason = "840539006"  # a reason no Condition of the record has: reasonCode, not a reference
            items.append(Event(time=t, kind="medication", system=RXNORM, code=code, display=display, end_time=end,
                               status=rng.choice(("active", "completed", "stopped", None) + (("weird", "cancelled",
                                                  "draft") if edge_cases else ())),
                               category=rng.choice(("outpatient", "community", None) + (("odd",) if edge_cases else ())),
                               value_system=reason_sys if reason else None, value_code=reason,
                               encounter_id=enc_id, time_precision=prec))
        if rng.random() < 0.4:
            code, display = rng.choice(VACCINES)
            items.append(Event(time=t, kind="immunization", system=CVX, code=code, display=display,
                               status=rng.choice(("completed", "completed", None) + (("not-done", "odd") if edge_cases
                                                                                      else ())),
                               encounter_id=enc_id, time_precision=prec))
        if rng.random() < 0.4:
            code, display, reason, category = rng.choice(PROCEDURES)
            end = t + timedelta(minutes=rng.randint(10, 120)) if rng.random() < 0.5 else None
            items.append(Event(time=t, kind="procedure", system=SNOMED, code=code, display=display, end_time=end,
                               status=rng.choice(("completed", None) + (("in-progress", "weird") if edge_cases
                                                                        else ())),
                               category=category if not (edge_cases and rng.random() < 0.2) else "some category",
                               value_system=SNOMED if reason else None, value_code=reason, encounter_id=enc_id,
                               time_precision=prec))
    if encounters and rng.random() < 0.5:
        for code, display, category, crit in rng.sample(ALLERGIES, rng.randint(1, 2)):
            t = rng.choice(encounters).time
            items.append(Event(time=t, kind="allergy", system=SNOMED, code=code, display=display,
                               category=category if not edge_cases or rng.random() < 0.8 else "odd",
                               value_system=CRITICALITY_SYSTEM if crit else None, value_code=crit,
                               status=rng.choice(("active", "inactive", "resolved", None) + (("odd",) if edge_cases
                                                                                              else ())),
                               time_precision=rng.choice(("second", "day", "year")) if edge_cases else "second"))
    tl.events.extend(items)
    return tl.sorted()


def item_timelines(n: int, *, seed: int = 0, visits: int = 8, edge_cases: bool = False) -> list[Timeline]:
    """random_timelines(n, ...) with items added; every kind of item occurs for n >= 20."""
    rng = random.Random(f"items:{seed}")
    return [add_items(tl, rng, edge_cases=edge_cases)
            for tl in random_timelines(n, seed=seed, visits=visits, edge_cases=edge_cases)]
