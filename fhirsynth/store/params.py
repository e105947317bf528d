"""The search parameters the store indexes, per resource type, and how to pull index values out of a resource.

One registry serves three users: the loader (what to index), the query compiler (what a name means) and the
CapabilityStatement (what is advertised), so the three can never disagree.

Index values per parameter type:
  token     (system, code, text)   text = lower-cased display / CodeableConcept.text (for :text)
  date      (lo, hi)               half-open epoch-second range, see dates.py
  quantity  (value, system, code, unit)
  reference (type, id)
  string    (normalized, raw)      normalized = lower case, accents removed (FHIR default string matching)
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fhirsynth.store.dates import DateFormatError, date_range, period_range

SYNTHETIC_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
SYNTHETIC_CODE = "HTEST"
GENDER_SYSTEM = "http://hl7.org/fhir/administrative-gender"

PARAM_TYPES = ("token", "date", "quantity", "reference", "string")


@dataclass(frozen=True)
class SearchParam:
    resource: str
    name: str
    type: str  # one of PARAM_TYPES
    expression: str  # FHIRPath, for the CapabilityStatement
    extract: Callable[[dict], list[tuple]]
    target: str | None = None  # reference params that only ever point at one type (patient -> Patient)
    pid: int = 0  # small integer key used in the index tables

    @property
    def key(self) -> str:
        return f"{self.resource}.{self.name}"


# ---------------------------------------------------------------- extraction helpers

def normalize(text: str) -> str:
    """FHIR string matching is case- and accent-insensitive."""
    if text.isascii():
        return text.lower()
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).lower()


def _coding(c: dict | None) -> list[tuple]:
    if not isinstance(c, dict) or not c.get("code"):
        return []
    display = c.get("display")
    return [(c.get("system") or "", str(c["code"]), normalize(display) if display else None)]


def _cc(cc: Any) -> list[tuple]:
    out: list[tuple] = []
    for one in cc if isinstance(cc, list) else [cc]:
        if not isinstance(one, dict):
            continue
        for c in one.get("coding") or []:
            out.extend(_coding(c))
        if one.get("text"):
            out.append((None, None, normalize(one["text"])))
    return out


def parse_reference(ref: Any) -> tuple[str, str] | None:
    """("Patient", "123") from "Patient/123", "http://host/fhir/Patient/123" or ".../Patient/123/_history/2"."""
    if isinstance(ref, dict):
        ref = ref.get("reference")
    if not isinstance(ref, str) or not ref or ref.startswith("#"):
        return None
    parts = ref.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if ref.startswith("urn:") or len(parts) < 2:
        return None
    return parts[-2], parts[-1]


def _refs(value: Any, target: str | None = None) -> list[tuple]:
    out = []
    for one in value if isinstance(value, list) else [value]:
        parsed = parse_reference(one)
        if parsed and (target is None or parsed[0] == target):
            out.append(parsed)
    return out


def _date(value: Any) -> list[tuple]:
    if isinstance(value, str):
        try:
            return [date_range(value)]
        except DateFormatError:
            return []
    if isinstance(value, dict):
        try:
            r = period_range(value)
        except DateFormatError:
            return []
        return [r] if r else []
    return []


def _quantity(q: Any) -> list[tuple]:
    if not isinstance(q, dict) or not isinstance(q.get("value"), (int, float)):
        return []
    return [(float(q["value"]), q.get("system") or "", q.get("code") or "", q.get("unit") or "")]


def _strings(values: Iterable[Any]) -> list[tuple]:
    return [(normalize(v), v) for v in values if isinstance(v, str) and v]


def _first(r: dict, *keys: str) -> Any:
    for k in keys:
        if k in r:
            return r[k]
    return None


# ---------------------------------------------------------------- per-type extractors

def _patient_deceased(r: dict) -> list[tuple]:
    dead = bool(r.get("deceasedBoolean")) or "deceasedDateTime" in r
    return [(None, "true" if dead else "false", None)]


def _patient_names(r: dict) -> list[tuple]:
    vals: list[str] = []
    for n in r.get("name") or []:
        vals += [n.get("family"), n.get("text"), *(n.get("given") or []), *(n.get("prefix") or []),
                 *(n.get("suffix") or [])]
    return _strings(vals)


def _identifiers(r: dict) -> list[tuple]:
    return [(i.get("system") or "", str(i["value"]), None) for i in r.get("identifier") or [] if i.get("value")]


def _components(r: dict) -> list[dict]:
    return [c for c in r.get("component") or [] if isinstance(c, dict)]


def _code_value(value: Any) -> list[tuple]:
    """A plain `code` element (status, intent, criticality) as a token with no system."""
    return [(None, value, None)] if isinstance(value, str) and value else []


def _last_updated(r: dict) -> list[tuple]:
    return _date((r.get("meta") or {}).get("lastUpdated"))


_DEFS: list[tuple[str, str, str, str, Callable[[dict], list[tuple]], str | None]] = [
    # resource, name, type, FHIRPath, extractor, reference target
    ("Patient", "gender", "token", "Patient.gender",
     lambda r: [(GENDER_SYSTEM, r["gender"], None)] if r.get("gender") else [], None),
    ("Patient", "birthdate", "date", "Patient.birthDate", lambda r: _date(r.get("birthDate")), None),
    ("Patient", "death-date", "date", "(Patient.deceased as dateTime)",
     lambda r: _date(r.get("deceasedDateTime")), None),
    ("Patient", "deceased", "token", "Patient.deceased.exists() and Patient.deceased != false",
     _patient_deceased, None),
    ("Patient", "address-country", "string", "Patient.address.country",
     lambda r: _strings(a.get("country") for a in r.get("address") or []), None),
    ("Patient", "address-city", "string", "Patient.address.city",
     lambda r: _strings(a.get("city") for a in r.get("address") or []), None),
    ("Patient", "family", "string", "Patient.name.family",
     lambda r: _strings(n.get("family") for n in r.get("name") or []), None),
    ("Patient", "name", "string", "Patient.name", _patient_names, None),
    ("Patient", "identifier", "token", "Patient.identifier", _identifiers, None),

    ("Condition", "patient", "reference", "Condition.subject.where(resolve() is Patient)",
     lambda r: _refs(r.get("subject"), "Patient"), "Patient"),
    ("Condition", "subject", "reference", "Condition.subject", lambda r: _refs(r.get("subject")), None),
    ("Condition", "code", "token", "Condition.code", lambda r: _cc(r.get("code")), None),
    ("Condition", "clinical-status", "token", "Condition.clinicalStatus",
     lambda r: _cc(r.get("clinicalStatus")), None),
    ("Condition", "verification-status", "token", "Condition.verificationStatus",
     lambda r: _cc(r.get("verificationStatus")), None),
    ("Condition", "category", "token", "Condition.category", lambda r: _cc(r.get("category")), None),
    ("Condition", "onset-date", "date", "Condition.onset.as(dateTime) | Condition.onset.as(Period)",
     lambda r: _date(_first(r, "onsetDateTime", "onsetPeriod")), None),
    ("Condition", "abatement-date", "date", "Condition.abatement.as(dateTime) | Condition.abatement.as(Period)",
     lambda r: _date(_first(r, "abatementDateTime", "abatementPeriod")), None),
    ("Condition", "encounter", "reference", "Condition.encounter",
     lambda r: _refs(r.get("encounter"), "Encounter"), "Encounter"),

    ("Observation", "patient", "reference", "Observation.subject.where(resolve() is Patient)",
     lambda r: _refs(r.get("subject"), "Patient"), "Patient"),
    ("Observation", "subject", "reference", "Observation.subject", lambda r: _refs(r.get("subject")), None),
    ("Observation", "code", "token", "Observation.code", lambda r: _cc(r.get("code")), None),
    ("Observation", "category", "token", "Observation.category", lambda r: _cc(r.get("category")), None),
    ("Observation", "status", "token", "Observation.status",
     lambda r: _code_value(r.get("status")), None),
    ("Observation", "date", "date", "Observation.effective",
     lambda r: _date(_first(r, "effectiveDateTime", "effectivePeriod", "effectiveInstant")), None),
    ("Observation", "value-quantity", "quantity", "(Observation.value as Quantity)",
     lambda r: _quantity(r.get("valueQuantity")), None),
    ("Observation", "value-concept", "token", "(Observation.value as CodeableConcept)",
     lambda r: _cc(r.get("valueCodeableConcept")), None),
    ("Observation", "component-code", "token", "Observation.component.code",
     lambda r: [t for c in _components(r) for t in _cc(c.get("code"))], None),
    ("Observation", "component-value-quantity", "quantity", "(Observation.component.value as Quantity)",
     lambda r: [t for c in _components(r) for t in _quantity(c.get("valueQuantity"))], None),
    ("Observation", "combo-code", "token", "Observation.code | Observation.component.code",
     lambda r: _cc(r.get("code")) + [t for c in _components(r) for t in _cc(c.get("code"))], None),
    ("Observation", "combo-value-quantity", "quantity",
     "(Observation.value as Quantity) | (Observation.component.value as Quantity)",
     lambda r: _quantity(r.get("valueQuantity")) + [t for c in _components(r) for t in _quantity(c.get("valueQuantity"))],
     None),
    ("Observation", "encounter", "reference", "Observation.encounter",
     lambda r: _refs(r.get("encounter"), "Encounter"), "Encounter"),

    ("Encounter", "patient", "reference", "Encounter.subject.where(resolve() is Patient)",
     lambda r: _refs(r.get("subject"), "Patient"), "Patient"),
    ("Encounter", "subject", "reference", "Encounter.subject", lambda r: _refs(r.get("subject")), None),
    ("Encounter", "date", "date", "Encounter.period", lambda r: _date(r.get("period")), None),
    ("Encounter", "class", "token", "Encounter.class", lambda r: _coding(r.get("class")), None),
    ("Encounter", "type", "token", "Encounter.type", lambda r: _cc(r.get("type")), None),
    ("Encounter", "status", "token", "Encounter.status",
     lambda r: _code_value(r.get("status")), None),

    # Issue 18's types, with the R4 spec's search parameter names and expressions
    ("MedicationRequest", "patient", "reference", "MedicationRequest.subject.where(resolve() is Patient)",
     lambda r: _refs(r.get("subject"), "Patient"), "Patient"),
    ("MedicationRequest", "subject", "reference", "MedicationRequest.subject", lambda r: _refs(r.get("subject")), None),
    ("MedicationRequest", "code", "token", "(MedicationRequest.medication as CodeableConcept)",
     lambda r: _cc(r.get("medicationCodeableConcept")), None),
    ("MedicationRequest", "status", "token", "MedicationRequest.status", lambda r: _code_value(r.get("status")), None),
    ("MedicationRequest", "intent", "token", "MedicationRequest.intent", lambda r: _code_value(r.get("intent")), None),
    ("MedicationRequest", "category", "token", "MedicationRequest.category", lambda r: _cc(r.get("category")), None),
    ("MedicationRequest", "authoredon", "date", "MedicationRequest.authoredOn",
     lambda r: _date(r.get("authoredOn")), None),
    ("MedicationRequest", "encounter", "reference", "MedicationRequest.encounter",
     lambda r: _refs(r.get("encounter"), "Encounter"), "Encounter"),

    ("MedicationStatement", "patient", "reference", "MedicationStatement.subject.where(resolve() is Patient)",
     lambda r: _refs(r.get("subject"), "Patient"), "Patient"),
    ("MedicationStatement", "subject", "reference", "MedicationStatement.subject",
     lambda r: _refs(r.get("subject")), None),
    ("MedicationStatement", "code", "token", "(MedicationStatement.medication as CodeableConcept)",
     lambda r: _cc(r.get("medicationCodeableConcept")), None),
    ("MedicationStatement", "status", "token", "MedicationStatement.status",
     lambda r: _code_value(r.get("status")), None),
    ("MedicationStatement", "category", "token", "MedicationStatement.category", lambda r: _cc(r.get("category")),
     None),
    ("MedicationStatement", "effective", "date", "MedicationStatement.effective",
     lambda r: _date(_first(r, "effectiveDateTime", "effectivePeriod")), None),
    ("MedicationStatement", "context", "reference", "MedicationStatement.context",
     lambda r: _refs(r.get("context"), "Encounter"), "Encounter"),

    ("Immunization", "patient", "reference", "Immunization.patient",
     lambda r: _refs(r.get("patient"), "Patient"), "Patient"),
    ("Immunization", "vaccine-code", "token", "Immunization.vaccineCode", lambda r: _cc(r.get("vaccineCode")), None),
    ("Immunization", "status", "token", "Immunization.status", lambda r: _code_value(r.get("status")), None),
    ("Immunization", "date", "date", "Immunization.occurrence",
     lambda r: _date(r.get("occurrenceDateTime")), None),

    ("Procedure", "patient", "reference", "Procedure.subject.where(resolve() is Patient)",
     lambda r: _refs(r.get("subject"), "Patient"), "Patient"),
    ("Procedure", "subject", "reference", "Procedure.subject", lambda r: _refs(r.get("subject")), None),
    ("Procedure", "code", "token", "Procedure.code", lambda r: _cc(r.get("code")), None),
    ("Procedure", "status", "token", "Procedure.status", lambda r: _code_value(r.get("status")), None),
    ("Procedure", "category", "token", "Procedure.category", lambda r: _cc(r.get("category")), None),
    ("Procedure", "date", "date", "Procedure.performed",
     lambda r: _date(_first(r, "performedDateTime", "performedPeriod")), None),
    ("Procedure", "encounter", "reference", "Procedure.encounter",
     lambda r: _refs(r.get("encounter"), "Encounter"), "Encounter"),

    ("AllergyIntolerance", "patient", "reference", "AllergyIntolerance.patient",
     lambda r: _refs(r.get("patient"), "Patient"), "Patient"),
    ("AllergyIntolerance", "code", "token", "AllergyIntolerance.code | AllergyIntolerance.reaction.substance",
     lambda r: _cc(r.get("code")) + [t for x in r.get("reaction") or [] if isinstance(x, dict)
                                     for t in _cc(x.get("substance"))], None),
    ("AllergyIntolerance", "clinical-status", "token", "AllergyIntolerance.clinicalStatus",
     lambda r: _cc(r.get("clinicalStatus")), None),
    ("AllergyIntolerance", "verification-status", "token", "AllergyIntolerance.verificationStatus",
     lambda r: _cc(r.get("verificationStatus")), None),
    ("AllergyIntolerance", "category", "token", "AllergyIntolerance.category",
     lambda r: [t for c in r.get("category") or [] for t in _code_value(c)], None),
    ("AllergyIntolerance", "criticality", "token", "AllergyIntolerance.criticality",
     lambda r: _code_value(r.get("criticality")), None),
    ("AllergyIntolerance", "date", "date", "AllergyIntolerance.recordedDate",
     lambda r: _date(r.get("recordedDate")), None),

    ("Provenance", "target", "reference", "Provenance.target", lambda r: _refs(r.get("target")), None),
    ("Provenance", "patient", "reference", "Provenance.target.where(resolve() is Patient)",
     lambda r: _refs(r.get("target"), "Patient"), "Patient"),
    ("Provenance", "recorded", "date", "Provenance.recorded", lambda r: _date(r.get("recorded")), None),

    ("Group", "member", "reference", "Group.member.entity",
     lambda r: _refs([m.get("entity") for m in r.get("member") or []]), None),
]

# The clinical item types of issue 18: medications (as requests or statements), immunizations, procedures, allergies.
ITEM_TYPES: tuple[str, ...] = ("MedicationRequest", "MedicationStatement", "Immunization", "Procedure",
                               "AllergyIntolerance")
RESOURCE_TYPES: tuple[str, ...] = ("Patient", "Condition", "Observation", "Encounter", "Provenance", "Group",
                                   *ITEM_TYPES)
# Types in the patient compartment (exported by Patient/$export and returned by $everything).
COMPARTMENT_TYPES: tuple[str, ...] = ("Patient", "Condition", "Observation", "Encounter", "Provenance", *ITEM_TYPES)

PARAMS: dict[str, dict[str, SearchParam]] = {t: {} for t in RESOURCE_TYPES}
PARAMS_BY_ID: dict[int, SearchParam] = {}
for _i, (_res, _name, _type, _expr, _fn, _target) in enumerate(
    [(t, "_lastUpdated", "date", "Resource.meta.lastUpdated", _last_updated, None) for t in RESOURCE_TYPES] + _DEFS,
    start=1,
):
    _p = SearchParam(_res, _name, _type, _expr, _fn, _target, _i)
    PARAMS[_res][_name] = _p
    PARAMS_BY_ID[_i] = _p

# The date each type is sorted by for `_sort=<name>` (stored in resources.sort_date).
SORT_DATE_PARAM: dict[str, str] = {
    "Patient": "birthdate", "Condition": "onset-date", "Observation": "date", "Encounter": "date",
    "Provenance": "recorded", "MedicationRequest": "authoredon", "MedicationStatement": "effective",
    "Immunization": "date", "Procedure": "date", "AllergyIntolerance": "date",
}

# _include / _revinclude pairs the API resolves: (source type, reference param) -> target type.
INCLUDES: dict[tuple[str, str], str] = {
    ("Observation", "patient"): "Patient", ("Observation", "subject"): "Patient",
    ("Observation", "encounter"): "Encounter",
    ("Condition", "patient"): "Patient", ("Condition", "subject"): "Patient",
    ("Condition", "encounter"): "Encounter",
    ("Encounter", "patient"): "Patient", ("Encounter", "subject"): "Patient",
    ("MedicationRequest", "patient"): "Patient", ("MedicationRequest", "subject"): "Patient",
    ("MedicationRequest", "encounter"): "Encounter",
    ("MedicationStatement", "patient"): "Patient", ("MedicationStatement", "subject"): "Patient",
    ("MedicationStatement", "context"): "Encounter",
    ("Immunization", "patient"): "Patient",
    ("Procedure", "patient"): "Patient", ("Procedure", "subject"): "Patient", ("Procedure", "encounter"): "Encounter",
    ("AllergyIntolerance", "patient"): "Patient",
}
REVINCLUDES: dict[str, list[tuple[str, str]]] = {
    "Patient": [("Observation", "patient"), ("Condition", "patient"), ("Encounter", "patient"),
                ("MedicationRequest", "patient"), ("MedicationStatement", "patient"), ("Immunization", "patient"),
                ("Procedure", "patient"), ("AllergyIntolerance", "patient")],
    "Encounter": [("Observation", "encounter"), ("Condition", "encounter"), ("MedicationRequest", "encounter"),
                  ("MedicationStatement", "context"), ("Procedure", "encounter")],
}


def registry_signature() -> str:
    """Changes whenever the index layout changes, so an old database file is rebuilt rather than misread."""
    return ";".join(f"{p.pid}:{p.key}:{p.type}" for p in PARAMS_BY_ID.values())


def is_synthetic(resource: dict) -> bool:
    meta = resource.get("meta")
    if not isinstance(meta, dict):
        return False
    for key in ("security", "tag"):
        for c in meta.get(key) or []:
            if isinstance(c, dict) and c.get("code") == SYNTHETIC_CODE and c.get("system") == SYNTHETIC_SYSTEM:
                return True
    return False


def patient_of(resource: dict) -> str | None:
    """The patient compartment a resource belongs to (None for Group and non-patient resources)."""
    rtype = resource.get("resourceType")
    if rtype == "Patient":
        return resource.get("id")
    if rtype == "Provenance":
        refs = _refs(resource.get("target"), "Patient")
        return refs[0][1] if refs else None
    # Immunization and AllergyIntolerance name their patient in `patient`, the others in `subject`
    refs = _refs(resource.get("subject") if "subject" in resource else resource.get("patient"), "Patient")
    return refs[0][1] if refs else None


def sort_date_of(resource: dict, values: dict[str, list[tuple]] | None = None) -> float | None:
    """The low bound of the type's primary date; `values` = already extracted index values by param name."""
    name = SORT_DATE_PARAM.get(resource.get("resourceType", ""))
    if not name:
        return None
    vals = values[name] if values is not None else PARAMS[resource["resourceType"]][name].extract(resource)
    return min(v[0] for v in vals) if vals else None
