"""Event / PatientInfo / Timeline: the contract between ingest, model, assembler and evaluator.

Times are timezone-aware UTC datetimes. `time_precision` keeps partial FHIR dates honest
("year" for "2019", "month" for "2019-05", "day" for a date, "second" for a dateTime).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Literal

EventKind = Literal["condition", "observation", "encounter", "medication", "immunization", "procedure", "allergy"]
EVENT_KINDS: tuple[str, ...] = ("condition", "observation", "encounter", "medication", "immunization", "procedure", "allergy")
# the kinds whose codes say what happened to a patient (every kind but the visit itself)
CLINICAL_KINDS: tuple[str, ...] = tuple(k for k in EVENT_KINDS if k != "encounter")
# The code system of AllergyIntolerance.criticality, kept in value_system/value_code of an allergy event.
CRITICALITY_SYSTEM = "http://hl7.org/fhir/allergy-intolerance-criticality"
# An observation event whose value_system is DATA_ABSENT_SYSTEM has no value: value_code is its
# Observation.dataAbsentReason. VALUE_WITHHELD ("masked") is the reason the generator gives where the data records the
# code with numbers but the DP release has no bins to draw one from (model/vocab.Vocab.value_withheld).
DATA_ABSENT_SYSTEM = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
VALUE_WITHHELD = "masked"


@dataclass(slots=True)
class Event:
    """One clinical event of one patient.

    condition:   system/code = Condition.code; time = onset; end_time = abatement; status = clinicalStatus;
                 category = Condition.category code (problem-list-item, encounter-diagnosis, ...).
    observation: system/code = Observation.code (or the component's code for panel members, with the
                 panel's code in panel_*); value+unit = valueQuantity (UCUM code); value_* = valueCodeableConcept;
                 category = observation-category code (vital-signs, laboratory, ...); status = Observation.status;
                 no value: value_system = DATA_ABSENT_SYSTEM and value_code = dataAbsentReason, where one is given.
    encounter:   system/code = Encounter.class; value_* = first Encounter.type coding; time/end_time = period;
                 encounter_id = the encounter's own id; status = Encounter.status.
    medication:  system/code = the medication code (MedicationRequest/MedicationStatement medicationCodeableConcept,
                 or the code of the referenced Medication); time = authoredOn (a statement: effective start);
                 end_time = end of the course (effectivePeriod.end, dispenseRequest.validityPeriod.end);
                 status = status; category = the medication request category code, if any;
                 value_* = the reason: reasonCode, else the code of the Condition in reasonReference.
    immunization: system/code = vaccineCode; time = occurrence; status = status (completed, not-done).
    procedure:   system/code = Procedure.code; time/end_time = performed (dateTime, or period start/end);
                 status = status; category = Procedure.category code, if any; value_* = the reason, as for
                 medication.
    allergy:     system/code = AllergyIntolerance.code; time = onset (else recordedDate); end_time = None;
                 status = clinicalStatus code; category = the first category (food, medication, environment,
                 biologic); value_system/value_code = CRITICALITY_SYSTEM / criticality (low, high,
                 unable-to-assess), if any.
    """

    time: datetime
    kind: str
    system: str
    code: str
    display: str | None = None
    value: float | None = None
    unit: str | None = None
    value_system: str | None = None
    value_code: str | None = None
    value_display: str | None = None
    category: str | None = None
    encounter_id: str | None = None
    end_time: datetime | None = None
    status: str | None = None
    panel_system: str | None = None
    panel_code: str | None = None
    panel_display: str | None = None
    time_precision: str = "second"
    source_id: str | None = None


@dataclass(slots=True)
class PatientInfo:
    patient_id: str
    sex: str | None = None  # FHIR administrative gender: male | female | other | unknown
    birth_date: date | None = None
    death_date: datetime | None = None
    deceased: bool = False
    race_code: str | None = None  # US Core OMB category (urn:oid:2.16.840.1.113883.6.238)
    race_display: str | None = None
    ethnicity_code: str | None = None
    ethnicity_display: str | None = None
    country: str | None = None  # address country (ISO 3166 where given)
    nationality: str | None = None  # EU-style nationality extension code
    language: str | None = None  # communication language (BCP-47)


@dataclass(slots=True)
class Timeline:
    patient: PatientInfo
    events: list[Event] = field(default_factory=list)

    def sorted(self) -> Timeline:
        """Events in time order; ties keep encounters first so visits open before their contents."""
        order = {"encounter": 0, "condition": 1, "allergy": 2, "observation": 3, "procedure": 4, "immunization": 5, "medication": 6}
        self.events.sort(key=lambda e: (e.time, order.get(e.kind, 7)))
        return self
