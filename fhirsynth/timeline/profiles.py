"""Per-profile assembly settings (profile URLs, demographics extensions, default locale).

Built-in defaults live here so assembly works without any file; the mapping file of the same name
(mappings/us-core.toml, mappings/ips.toml) may override them in a top-level `[assemble]` table:

    [assemble]
    locale = "us"                     # fake-name locale when the patient's country does not pick one
    race_ethnicity = true             # US Core race/ethnicity extensions
    nationality = false               # patient-nationality extension
    medication_resource = "MedicationRequest"   # or "MedicationStatement": what a medication event becomes
    [assemble.profiles]               # resourceType -> profile URL ("" = none)
    Patient = "http://..."
    [assemble.condition_profiles]     # Condition.category code -> profile URL
    [assemble.observation_profiles]   # Observation.category code -> profile URL
    [assemble.observation_code_profiles]  # "system|code" -> profile URL (wins over category)
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from fhirsynth.errors import MappingError, UsageError

log = logging.getLogger(__name__)

PROFILES: tuple[str, ...] = ("us-core", "ips")
MEDICATION_RESOURCES: tuple[str, ...] = ("MedicationRequest", "MedicationStatement")
_MAPPINGS_DIR = Path(__file__).resolve().parents[1] / "data" / "mappings"  # package data (see mapping.loader)

_USC = "http://hl7.org/fhir/us/core/StructureDefinition/"
_IPS = "http://hl7.org/fhir/uv/ips/StructureDefinition/"
_VITALS = "http://hl7.org/fhir/StructureDefinition/vitalsigns"
LOINC = "http://loinc.org"


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    locale: str
    race_ethnicity: bool
    nationality: bool
    profiles: dict[str, str]  # resourceType -> profile URL
    condition_profiles: dict[str, str] = field(default_factory=dict)  # category -> URL
    observation_profiles: dict[str, str] = field(default_factory=dict)  # category -> URL
    observation_code_profiles: dict[str, str] = field(default_factory=dict)  # "system|code" -> URL
    condition_category_required: bool = False  # US Core: Condition.category 1..*
    # profiles that require Observation.performer (IPS results): a synthetic record has no performer to name, so
    # the element says so with the data-absent-reason extension, as IPS asks for required data that is unknown
    performer_required: frozenset[str] = frozenset()
    # what a medication event becomes: a prescription (US Core) or a medication-list statement (IPS)
    medication_resource: str = "MedicationRequest"

    def observation_profile(self, system: str, code: str, category: str | None) -> str | None:
        url = self.observation_code_profiles.get(f"{system}|{code}")
        if url is None:
            url = self.observation_profiles.get(category or "", self.profiles.get("Observation"))
        return url or None

    def condition_profile(self, category: str | None) -> str | None:
        return self.condition_profiles.get(category or "", self.profiles.get("Condition")) or None


_BUILTIN: dict[str, Profile] = {
    "us-core": Profile(
        name="us-core",
        locale="us",
        race_ethnicity=True,
        nationality=False,
        profiles={
            "Patient": _USC + "us-core-patient",
            "Encounter": _USC + "us-core-encounter",
            "Condition": _USC + "us-core-condition-problems-health-concerns",
            "Observation": _USC + "us-core-observation-clinical-result",
            "Provenance": _USC + "us-core-provenance",
            "MedicationRequest": _USC + "us-core-medicationrequest",
            "Immunization": _USC + "us-core-immunization",
            "Procedure": _USC + "us-core-procedure",
            "AllergyIntolerance": _USC + "us-core-allergyintolerance",
        },
        condition_profiles={
            "encounter-diagnosis": _USC + "us-core-condition-encounter-diagnosis",
            "problem-list-item": _USC + "us-core-condition-problems-health-concerns",
            "health-concern": _USC + "us-core-condition-problems-health-concerns",
        },
        observation_profiles={
            "laboratory": _USC + "us-core-observation-lab",
            "vital-signs": _USC + "us-core-vital-signs",
            "social-history": _USC + "us-core-observation-social-history",
            "survey": _USC + "us-core-observation-survey",
            "imaging": _USC + "us-core-observation-clinical-result",
        },
        observation_code_profiles={
            f"{LOINC}|85354-9": _USC + "us-core-blood-pressure",
            f"{LOINC}|29463-7": _USC + "us-core-body-weight",
            f"{LOINC}|8302-2": _USC + "us-core-body-height",
            f"{LOINC}|39156-5": _USC + "us-core-bmi",
            f"{LOINC}|8867-4": _USC + "us-core-heart-rate",
            f"{LOINC}|9279-1": _USC + "us-core-respiratory-rate",
            f"{LOINC}|8310-5": _USC + "us-core-body-temperature",
            f"{LOINC}|59408-5": _USC + "us-core-pulse-oximetry",
            f"{LOINC}|2708-6": _USC + "us-core-pulse-oximetry",
            f"{LOINC}|9843-4": _USC + "us-core-head-circumference",
            f"{LOINC}|72166-2": _USC + "us-core-smokingstatus",
        },
        condition_category_required=True,
    ),
    "ips": Profile(
        name="ips",
        locale="es",
        race_ethnicity=False,
        nationality=True,
        profiles={
            "Patient": _IPS + "Patient-uv-ips",
            "Condition": _IPS + "Condition-uv-ips",
            "Composition": _IPS + "Composition-uv-ips",
            "Bundle": _IPS + "Bundle-uv-ips",
            "MedicationStatement": _IPS + "MedicationStatement-uv-ips",
            "Immunization": _IPS + "Immunization-uv-ips",
            "Procedure": _IPS + "Procedure-uv-ips",
            "AllergyIntolerance": _IPS + "AllergyIntolerance-uv-ips",
        },
        observation_profiles={
            "laboratory": _IPS + "Observation-results-laboratory-pathology-uv-ips",
            "imaging": _IPS + "Observation-results-radiology-uv-ips",
            "vital-signs": _VITALS,
        },
        observation_code_profiles={
            f"{LOINC}|72166-2": _IPS + "Observation-tobaccouse-uv-ips",
            f"{LOINC}|74013-4": _IPS + "Observation-alcoholuse-uv-ips",
        },
        performer_required=frozenset({_IPS + "Observation-results-laboratory-pathology-uv-ips",
                                      _IPS + "Observation-results-radiology-uv-ips"}),
        medication_resource="MedicationStatement",
    ),
}


def _str_map(table: Any, where: str, problems: list[str]) -> dict[str, str]:
    if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
        problems.append(f"{where} must be a table of strings")
        return {}
    return dict(table)


def apply_assemble_table(base: Profile, table: dict[str, Any], where: str) -> Profile:
    """Overlay an `[assemble]` table on a profile; every problem is reported at once."""
    problems: list[str] = []
    changes: dict[str, Any] = {}
    for key, value in table.items():
        if key == "locale":
            if value not in ("us", "es"):
                problems.append(f"[assemble].locale must be 'us' or 'es', got {value!r}")
            else:
                changes["locale"] = value
        elif key == "medication_resource":
            if value not in MEDICATION_RESOURCES:
                problems.append(f"[assemble].medication_resource must be one of {', '.join(MEDICATION_RESOURCES)}, "
                                f"got {value!r}")
            else:
                changes[key] = value
        elif key in ("race_ethnicity", "nationality"):
            if not isinstance(value, bool):
                problems.append(f"[assemble].{key} must be true or false")
            else:
                changes[key] = value
        elif key in ("profiles", "condition_profiles", "observation_profiles", "observation_code_profiles"):
            changes[key] = {**getattr(base, key), **_str_map(value, f"[assemble.{key}]", problems)}
        else:
            problems.append(f"[assemble] has unknown key {key!r}")
    if problems:
        raise MappingError(problems, where=where)
    return replace(base, **changes)


def _assemble_table(name: str) -> tuple[dict[str, Any] | None, str]:
    """The raw [assemble] table of the mapping called `name`, via INGEST's loader when it is there."""
    try:
        from fhirsynth.mapping import load_mapping  # type: ignore[attr-defined]
    except ImportError:
        load_mapping = None
    if load_mapping is not None:
        mapping = load_mapping(name)
        return getattr(mapping, "assemble", None) or None, name
    path = _MAPPINGS_DIR / f"{name}.toml"
    if not path.is_file():
        return None, str(path)
    try:
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise MappingError([str(exc)], where=str(path)) from exc
    return doc.get("assemble"), str(path)


@lru_cache(maxsize=8)
def load_profile(name: str) -> Profile:
    """The assembly profile `us-core` or `ips`, with the mapping file's [assemble] overrides applied."""
    if name not in _BUILTIN:
        raise UsageError(f"unknown profile {name!r} (choose from {', '.join(PROFILES)})", where="--profile")
    table, where = _assemble_table(name)
    if not table:
        return _BUILTIN[name]
    if not isinstance(table, dict):
        raise MappingError(["[assemble] must be a table"], where=where)
    return apply_assemble_table(_BUILTIN[name], table, where)
