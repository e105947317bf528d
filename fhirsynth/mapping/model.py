"""Typed view of a mapping TOML file (see mappings/README.md for every key).

The assembler (timelines -> FHIR) reads the same objects, so accepted code systems and categories are public
attributes here rather than private details of the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# The kinds are the timeline contract's (timeline/types.py), so a mapping can name every kind the model learns.
from fhirsynth.timeline.types import EVENT_KINDS

__all__ = ["EVENT_KINDS", "ElementPath", "Mapping", "PatientMapping", "ResourceMapping"]

# An element path such as "effectivePeriod.start", pre-split into keys. Lists along the way take their first item.
ElementPath = tuple[str, ...]



@dataclass(frozen=True, slots=True)
class ResourceMapping:
    """How one FHIR resource type becomes events (one table of the TOML file)."""

    resource_type: str
    kind: str  # one of timeline.types.EVENT_KINDS
    patient: tuple[ElementPath, ...]  # candidate references to the Patient, first present wins
    time: tuple[ElementPath, ...]  # candidate start times in preference order
    end_time: tuple[ElementPath, ...] = ()
    code: ElementPath = ("code",)  # CodeableConcept or Coding (Encounter.class)
    systems: tuple[str, ...] = ()  # accepted code systems, preference order; empty = any system
    display: bool = True  # keep coding.display / text
    value_quantity: ElementPath | None = None
    value_concept: ElementPath | None = None  # valueCodeableConcept, or Encounter.type for visits
    value_systems: tuple[str, ...] = ()  # preferred systems for the coded value; empty = first coding
    value_string: ElementPath | None = None  # kept in value_display
    status: ElementPath | None = None  # a code or a CodeableConcept
    skip_status: frozenset[str] = frozenset()
    verification: ElementPath | None = None
    skip_verification: frozenset[str] = frozenset()
    category: ElementPath | None = None
    category_systems: tuple[str, ...] = ()  # which category codings count; empty = any
    categories: tuple[str, ...] = ()  # accepted category codes; empty = all (resources without category too)
    encounter: ElementPath | None = None  # reference to the Encounter
    encounter_self: bool = False  # the resource IS the encounter: encounter_id = its own id
    components: str = "ignore"  # "expand": one event per component, panel_* = the parent code
    # A plain code element (AllergyIntolerance.criticality) kept as value_system/value_code.
    value_code: ElementPath | None = None
    value_code_system: str | None = None
    # The reason (MedicationRequest, Procedure): reasonCode, else the code of the Condition in reasonReference,
    # resolved within the patient's data; both end in value_system/value_code/value_display.
    reason_code: ElementPath | None = None
    reason_reference: ElementPath | None = None
    reason_systems: tuple[str, ...] = ()  # preferred systems of a reasonCode; empty = first coding
    # A Reference to a Medication (contained, or in the same Bundle / export) whose code is used when `code` has
    # none (MedicationRequest.medicationReference).
    medication_reference: ElementPath | None = None


@dataclass(frozen=True, slots=True)
class PatientMapping:
    """Where Patient demographics live."""

    gender: ElementPath = ("gender",)
    birth_date: ElementPath = ("birthDate",)
    deceased_datetime: ElementPath = ("deceasedDateTime",)
    deceased_boolean: ElementPath = ("deceasedBoolean",)
    race_extension: str | None = None
    ethnicity_extension: str | None = None
    nationality_extension: str | None = None
    country: ElementPath | None = ("address", "country")
    language: ElementPath | None = ("communication", "language")
    identifier_match: bool = True  # resolve `Patient?identifier=system|value` against Patient.identifier


@dataclass(frozen=True, slots=True)
class Mapping:
    name: str
    version: int
    path: Path
    description: str
    patient: PatientMapping
    resources: dict[str, ResourceMapping] = field(default_factory=dict)
    # The [assemble] table, kept raw: the assembler validates and interprets it.
    assemble: dict = field(default_factory=dict)

    def for_kind(self, kind: str) -> list[ResourceMapping]:
        return [r for r in self.resources.values() if r.kind == kind]
