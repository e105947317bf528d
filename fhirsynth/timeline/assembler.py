"""Timelines -> FHIR R4 resources (plain dicts, the inverse of the ingest mappings).

One call per patient returns Patient, Encounters, Conditions, Observations, the medications (MedicationRequest,
or MedicationStatement where the profile says so), Immunizations, Procedures, AllergyIntolerances and one
Provenance, all with deterministic ids (uuid5 from seed and patient index), `Type/id` references that resolve
within the patient, profile URLs from fhirsynth.timeline.profiles, and the HL7 HTEST code in meta.security and
meta.tag so no system mistakes them for real records. Plain dicts on this path: it runs at >50k resources/s;
the tests run every resource through fhirsynth.fhir.validate.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import random
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any

from fhirsynth import __version__
from fhirsynth.timeline.fakes import IDENTIFIER_SYSTEM, locale_for, make_identity
from fhirsynth.timeline.profiles import Profile, load_profile
from fhirsynth.timeline.types import CRITICALITY_SYSTEM, DATA_ABSENT_SYSTEM, Event, Timeline

log = logging.getLogger(__name__)

NAMESPACE = uuid.UUID("5f1c3e0a-8c1b-5e7e-9a0e-6d2f7c4b9a10")  # fixed: ids depend only on (seed, index)
HTEST = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
    "code": "HTEST",
    "display": "test health data",
}
UCUM = "http://unitsofmeasure.org"
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VER = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
USCORE_CONDITION_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/condition-category"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DATA_ABSENT = DATA_ABSENT_SYSTEM
DATA_ABSENT_EXT = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
OMB = "urn:oid:2.16.840.1.113883.6.238"
RACE_EXT = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
ETHNICITY_EXT = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"
NATIONALITY_EXT = "http://hl7.org/fhir/StructureDefinition/patient-nationality"
ISO3166 = "urn:iso:std:iso:3166"
BCP47 = "urn:ietf:bcp:47"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
MODEL_HASH_SYSTEM = "urn:fhirsynth:model-sha256"
# Every emitted resource that has an identifier element carries its own id in this system: a stable business
# identifier, so `load --ids conditional` can find what an earlier load stored without the right to choose ids.
RESOURCE_ID_SYSTEM = "urn:fhirsynth:resource-id"

_OMB_RACE = frozenset({"1002-5", "2028-9", "2054-5", "2076-8", "2106-3"})
_OMB_ETHNICITY = frozenset({"2135-2", "2186-5"})
_CLINICAL = frozenset({"active", "recurrence", "relapse", "inactive", "remission", "resolved"})
_OBS_STATUS = frozenset(
    {"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown"}
)
_ENC_STATUS = frozenset(
    {"planned", "arrived", "triaged", "in-progress", "onleave", "finished", "cancelled", "entered-in-error", "unknown"}
)
_OBS_CATEGORIES = frozenset(
    {"social-history", "vital-signs", "imaging", "laboratory", "procedure", "survey", "exam", "therapy", "activity"}
)
_GENDERS = frozenset({"male", "female", "other", "unknown"})
SNOMED = "http://snomed.info/sct"
ALLERGY_CLINICAL = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
ALLERGY_VER = "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"
MEDREQ_CATEGORY = "http://terminology.hl7.org/CodeSystem/medicationrequest-category"
MEDSTMT_CATEGORY = "http://terminology.hl7.org/CodeSystem/medication-statement-category"
# Required value sets of the new kinds' status elements (FHIR R4); anything else falls back to a default.
_MEDREQ_STATUS = frozenset(
    {"active", "on-hold", "cancelled", "completed", "entered-in-error", "stopped", "draft", "unknown"}
)
_MEDSTMT_STATUS = frozenset(
    {"active", "completed", "entered-in-error", "intended", "stopped", "on-hold", "unknown", "not-taken"}
)
# A request's status in MedicationStatement terms (the IPS medication list is of statements).
_REQ_TO_STMT = {"cancelled": "not-taken", "draft": "intended"}
_IMM_STATUS = frozenset({"completed", "entered-in-error", "not-done"})
_PROC_STATUS = frozenset(
    {"preparation", "in-progress", "not-done", "on-hold", "stopped", "completed", "entered-in-error", "unknown"}
)
_ALLERGY_CLINICAL = frozenset({"active", "inactive", "resolved"})
_ALLERGY_CATEGORY = frozenset({"food", "medication", "environment", "biologic"})
_CRITICALITY = frozenset({"low", "high", "unable-to-assess"})
_MEDREQ_CATEGORIES = frozenset({"inpatient", "outpatient", "community", "discharge"})
_MEDSTMT_CATEGORIES = frozenset({"inpatient", "outpatient", "community", "patientspecified"})
# Blood pressure panels must carry both components (US Core / vitals profile); a missing one is marked absent.
_BP_PANEL = ("http://loinc.org", "85354-9")
_BP_COMPONENTS = (("8480-6", "Systolic blood pressure"), ("8462-4", "Diastolic blood pressure"))


@dataclass(slots=True)
class GeneratorInfo:
    """What generated the data; written into every patient's Provenance.

    `recorded` (FHIR instant) is fixed when the object is made so one export has one generation time and
    assembling twice with the same GeneratorInfo gives identical output. With SOURCE_DATE_EPOCH set (the
    reproducible-builds convention) it is that time, so two runs with one seed give byte-identical exports.
    """

    model_hash: str
    epsilon: float | None
    delta: float | None
    fhirsynth_version: str = __version__
    recorded: str = field(default_factory=lambda: generation_time())


def generation_time() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch and epoch.strip().isdigit():
        now = datetime.fromtimestamp(int(epoch), tz=timezone.utc)
    else:
        now = datetime.now(timezone.utc)
    return now.replace(microsecond=0).isoformat()


def patient_uuid(seed: int, index: int) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"{seed}:{index}")


def fhir_datetime(dt: datetime, precision: str = "second") -> str:
    """A FHIR dateTime at the event's recorded precision (partial dates stay partial)."""
    if precision == "day":
        return f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}"
    if precision == "month":
        return f"{dt.year:04d}-{dt.month:02d}"
    if precision == "year":
        return f"{dt.year:04d}"
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.isoformat()


def own_identifier(rid: str) -> dict[str, str]:
    return {"system": RESOURCE_ID_SYSTEM, "value": rid}


def _meta(profile: str | None) -> dict[str, Any]:
    if profile:
        return {"profile": [profile], "security": [HTEST], "tag": [HTEST]}
    return {"security": [HTEST], "tag": [HTEST]}


def _code(code: str) -> str:
    """FHIR `code`: no leading/trailing/double whitespace (sampled or odd source codes must not break validity)."""
    if code.isprintable() and "  " not in code and code == code.strip():
        return code
    return " ".join(code.split())


def _coding(system: str | None, code: str | None, display: str | None) -> dict[str, str]:
    c: dict[str, str] = {}
    if system:
        c["system"] = system
    if code:
        code = _code(code)
        if code:
            c["code"] = code
    if display:
        c["display"] = display
    return c


def _concept(system: str | None, code: str | None, display: str | None) -> dict[str, Any]:
    cc: dict[str, Any] = {"coding": [_coding(system, code, display)]}
    if display:
        cc["text"] = display
    return cc


def _absent(code: str = "unknown") -> dict[str, Any]:
    return {"coding": [{"system": DATA_ABSENT, "code": code}]}


def _absent_reason(ev: Event) -> dict[str, Any]:
    """The event's own dataAbsentReason (e.g. "masked": a value the DP release withheld), else "unknown"."""
    return _absent(ev.value_code if ev.value_system == DATA_ABSENT and ev.value_code else "unknown")


def _quantity(value: float, unit: str | None) -> dict[str, Any]:
    q: dict[str, Any] = {"value": value}
    if unit:
        q["unit"] = unit
        code = _code(unit)
        if code:
            q["system"] = UCUM
            q["code"] = code
    return q


def _set_value(target: dict[str, Any], ev: Event) -> bool:
    """valueQuantity / valueCodeableConcept / valueString from the event; False when it carries no usable value."""
    v = ev.value
    if v is not None and math.isfinite(v):
        target["valueQuantity"] = _quantity(v, ev.unit)
        return True
    if ev.value_system == DATA_ABSENT:  # no value, and why: the caller writes dataAbsentReason
        return False
    if ev.value_code:
        target["valueCodeableConcept"] = _concept(ev.value_system, ev.value_code, ev.value_display)
        return True
    if ev.value_display:  # ingest keeps valueString in value_display (no code, no number)
        target["valueString"] = ev.value_display
        return True
    return False


class _Assembly:
    """State for one patient: ids, encounter lookup, collected resources."""

    __slots__ = ("tl", "profile", "pid", "id_prefix", "id_low", "pref", "enc_ids", "enc_starts", "enc_spans", "n",
                 "conditions")

    def __init__(self, tl: Timeline, profile: Profile, seed: int, index: int) -> None:
        self.tl = tl
        self.profile = profile
        self.pid = str(patient_uuid(seed, index))
        # Resource k of this patient gets the patient's uuid with the low 32 bits XOR k: unique within the
        # patient by construction, a valid UUID (version/variant bits untouched) and ~10x cheaper than uuid5.
        self.id_prefix = self.pid[:28]
        self.id_low = int(self.pid[28:], 16)
        self.pref = f"Patient/{self.pid}"
        self.enc_ids: dict[str, str] = {}
        self.enc_starts: list[datetime] = []
        self.enc_spans: list[tuple[datetime, datetime | None, str]] = []
        self.n = 0
        # (system, code) -> [(onset, Condition id)] in event order: what a medication or procedure reason points at
        self.conditions: dict[tuple[str, str], list[tuple[datetime, str]]] = {}

    def new_id(self) -> str:
        self.n += 1
        return f"{self.id_prefix}{self.id_low ^ self.n:08x}"

    def encounter_ref(self, ev: Event) -> dict[str, str] | None:
        """The event's encounter. An id with no encounter event falls back to the encounter whose period covers
        (or whose day is) the event time; no id means no encounter (problem-list items often have none)."""
        if ev.encounter_id is None:
            return None
        eid = self.enc_ids.get(ev.encounter_id)
        if eid is None and self.enc_spans:
            i = bisect.bisect_right(self.enc_starts, ev.time) - 1
            if i >= 0:
                start, end, cand = self.enc_spans[i]
                if (end is not None and ev.time <= end) or ev.time.date() == start.date():
                    eid = cand
        return {"reference": f"Encounter/{eid}"} if eid else None

    def condition_ref(self, system: str | None, code: str, when: datetime) -> dict[str, str] | None:
        """The patient's Condition with this code: the latest with onset at or before `when`, else the first."""
        cands = self.conditions.get((system or "", code))
        if not cands:
            return None
        before = [rid for onset, rid in cands if onset <= when]
        return {"reference": f"Condition/{before[-1] if before else cands[0][1]}"}


def assemble_patient(
    timeline: Timeline, *, profile: str, seed: int, index: int, generator: GeneratorInfo
) -> list[dict[str, Any]]:
    """FHIR resources of one patient: Patient, Encounters, Conditions, Observations, AllergyIntolerances,
    medications, Immunizations, Procedures, Provenance (in that order: what is referenced comes first).

    Ids depend only on (seed, index) and the event order, so the same inputs always give the same output.
    """
    prof = load_profile(profile)
    a = _Assembly(timeline, prof, seed, index)
    rng = random.Random(f"{seed}:{index}")
    patient = _patient(a, rng)
    encounters, conditions, observations, allergies = [], [], [], []
    items: list[tuple[Event, str]] = []  # medications, immunizations, procedures: after every Condition has an id
    events = timeline.events
    # Encounters first: other events reference them by their source encounter_id.
    for ev in events:
        if ev.kind == "encounter":
            encounters.append(_encounter(a, ev))
    if a.enc_spans:
        a.enc_spans.sort(key=lambda s: s[0])
        a.enc_starts = [s[0] for s in a.enc_spans]
    panels: dict[tuple, dict[str, Any]] = {}
    for ev in events:
        kind = ev.kind
        if kind == "observation":
            if ev.panel_code:
                key = (ev.panel_system, ev.panel_code, ev.time, ev.encounter_id)
                panel = panels.get(key)
                if panel is None:
                    panel = panels[key] = _panel(a, ev)
                    observations.append(panel)
                panel["component"].append(_component(ev))
            else:
                observations.append(_observation(a, ev))
        elif kind == "condition":
            conditions.append(_condition(a, ev))
        elif kind == "allergy":
            allergies.append(_allergy(a, ev))
        elif kind in _ITEM_BUILDERS:
            items.append((ev, kind))
        elif kind != "encounter":
            log.debug("patient %s: event kind %r not assembled", a.pid, kind)
    for panel in panels.values():
        _finish_panel(panel)
    by_kind: dict[str, list[dict[str, Any]]] = {k: [] for k in _ITEM_BUILDERS}
    for ev, kind in items:
        by_kind[kind].append(_ITEM_BUILDERS[kind](a, ev))
    resources = [patient, *encounters, *conditions, *observations, *allergies, *by_kind["medication"],
                 *by_kind["immunization"], *by_kind["procedure"]]
    resources.append(_provenance(a, resources, generator))
    return resources


def _patient(a: _Assembly, rng: random.Random) -> dict[str, Any]:
    p = a.tl.patient
    prof = a.profile
    ident = make_identity(rng, p.sex, locale_for(p.country, prof.locale))
    res: dict[str, Any] = {
        "resourceType": "Patient",
        "id": a.pid,
        "meta": _meta(prof.profiles.get("Patient")),
        "identifier": [
            {
                "use": "usual",
                "type": {"coding": [{"system": V2_0203, "code": "MR", "display": "Medical record number"}]},
                "system": IDENTIFIER_SYSTEM,
                "value": ident.mrn,
            },
            own_identifier(a.pid),
        ],
        "name": [{"use": "official", "family": ident.family, "given": ident.given}],
        "telecom": [{"system": "phone", "value": ident.phone, "use": "home"}],
        "gender": p.sex if p.sex in _GENDERS else "unknown",
    }
    birth = p.birth_date
    if isinstance(birth, datetime):
        birth = birth.date()
    if isinstance(birth, date):
        res["birthDate"] = birth.isoformat()
    else:  # IPS requires birthDate: say it is unknown rather than invent one
        res["_birthDate"] = {"extension": [{"url": DATA_ABSENT_EXT, "valueCode": "unknown"}]}
    if p.death_date is not None:
        res["deceasedDateTime"] = fhir_datetime(p.death_date)
    elif p.deceased:
        res["deceasedBoolean"] = True
    res["address"] = [
        {
            "use": "home",
            "line": [ident.line],
            "city": ident.city,
            "state": ident.state,
            "postalCode": ident.postal_code,
            "country": p.country or ident.country,
        }
    ]
    if p.language:
        res["communication"] = [{"language": {"coding": [{"system": BCP47, "code": p.language}]}}]
    ext = []
    if prof.race_ethnicity:
        if p.race_code or p.race_display:
            ext.append(_omb_extension(RACE_EXT, p.race_code, p.race_display, _OMB_RACE))
        if p.ethnicity_code or p.ethnicity_display:
            ext.append(_omb_extension(ETHNICITY_EXT, p.ethnicity_code, p.ethnicity_display, _OMB_ETHNICITY))
    if prof.nationality and p.nationality:
        ext.append(
            {
                "url": NATIONALITY_EXT,
                "extension": [{"url": "code", "valueCodeableConcept": {"coding": [{"system": ISO3166, "code": p.nationality}]}}],
            }
        )
    if ext:
        res["extension"] = ext
    return res


def _omb_extension(url: str, code: str | None, display: str | None, omb: frozenset[str]) -> dict[str, Any]:
    # Codes outside the OMB minimum categories belong in `detailed` (the ombCategory binding is required);
    # a text-only race/ethnicity (no code) keeps just the required `text`.
    parts: list[dict[str, Any]] = []
    if code:
        parts.append({"url": "ombCategory" if code in omb else "detailed", "valueCoding": _coding(OMB, code, display)})
    parts.append({"url": "text", "valueString": display or code})
    return {"url": url, "extension": parts}


def _encounter(a: _Assembly, ev: Event) -> dict[str, Any]:
    rid = a.new_id()
    if ev.encounter_id is not None:
        a.enc_ids[ev.encounter_id] = rid
    a.enc_spans.append((ev.time, ev.end_time, rid))
    prec = ev.time_precision
    period = {"start": fhir_datetime(ev.time, prec)}
    if ev.end_time is not None and ev.end_time >= ev.time:
        period["end"] = fhir_datetime(ev.end_time, prec)
    res: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": rid,
        "meta": _meta(a.profile.profiles.get("Encounter")),
        "identifier": [own_identifier(rid)],
        "status": ev.status if ev.status in _ENC_STATUS else "finished",
        "class": _coding(ev.system, ev.code, ev.display),
    }
    if ev.value_code:
        res["type"] = [_concept(ev.value_system, ev.value_code, ev.value_display)]
    elif "Encounter" in a.profile.profiles:  # US Core requires a type; say only what we know
        res["type"] = [{"text": ev.display or ev.code}]
    res["subject"] = {"reference": a.pref}
    res["period"] = period
    return res


def _condition(a: _Assembly, ev: Event) -> dict[str, Any]:
    status = ev.status if ev.status in _CLINICAL else None
    if ev.end_time is not None and status in (None, "active", "recurrence", "relapse"):
        status = "resolved"  # FHIR con-4: an abated condition cannot be active
    elif status is None:
        status = "active"
    category = ev.category
    enc = a.encounter_ref(ev)
    if category is None and a.profile.condition_category_required:
        category = "encounter-diagnosis" if enc else "problem-list-item"
    if category is None:
        cat = None
    elif category in ("problem-list-item", "encounter-diagnosis"):
        cat = {"coding": [{"system": CONDITION_CATEGORY, "code": category}]}
    elif category == "health-concern":
        cat = {"coding": [{"system": USCORE_CONDITION_CATEGORY, "code": category}]}
    else:
        cat = {"coding": [{"code": _code(category) or "unknown"}], "text": category}
    rid = a.new_id()
    if ev.code:
        a.conditions.setdefault((ev.system or "", ev.code), []).append((ev.time, rid))
    res: dict[str, Any] = {
        "resourceType": "Condition",
        "id": rid,
        "meta": _meta(a.profile.condition_profile(category)),
        "identifier": [own_identifier(rid)],
        "clinicalStatus": {"coding": [{"system": CONDITION_CLINICAL, "code": status}]},
        "verificationStatus": {"coding": [{"system": CONDITION_VER, "code": "confirmed"}]},
    }
    if cat is not None:
        res["category"] = [cat]
    res["code"] = _concept(ev.system, ev.code, ev.display)
    res["subject"] = {"reference": a.pref}
    if enc:
        res["encounter"] = enc
    res["onsetDateTime"] = fhir_datetime(ev.time, ev.time_precision)
    if ev.end_time is not None and ev.end_time >= ev.time:
        res["abatementDateTime"] = fhir_datetime(ev.end_time, ev.time_precision)
    return res


def _obs_category(category: str | None) -> list[dict[str, Any]] | None:
    if not category:
        return None
    if category in _OBS_CATEGORIES:
        return [{"coding": [{"system": OBS_CATEGORY, "code": category}]}]
    code = _code(category)
    return [{"coding": [{"code": code}], "text": category}] if code else [{"text": category}]


def _obs_base(a: _Assembly, ev: Event, system: str | None, code: str | None, display: str | None) -> dict[str, Any]:
    category = ev.category
    # A profile that requires a category cannot be claimed without one. A vital-signs profile needs an effective
    # dateTime to the day at least (vs-1): not claimed for a year- or month-precise time, nor for an interval
    # (validators disagree on whether vs-1 holds for a Period).
    profile = a.profile.observation_profile(system or "", code or "", category) if category else None
    interval = ev.end_time is not None and ev.end_time >= ev.time
    if category == "vital-signs" and (ev.time_precision in ("year", "month") or interval):
        profile = None
    rid = a.new_id()
    res: dict[str, Any] = {
        "resourceType": "Observation",
        "id": rid,
        "meta": _meta(profile),
        "identifier": [own_identifier(rid)],
        "status": ev.status if ev.status in _OBS_STATUS else "final",
    }
    cat = _obs_category(category)
    if cat:
        res["category"] = cat
    res["code"] = _concept(system, code, display)
    res["subject"] = {"reference": a.pref}
    enc = a.encounter_ref(ev)
    if enc:
        res["encounter"] = enc
    if profile in a.profile.performer_required:
        res["performer"] = [{"extension": [{"url": DATA_ABSENT_EXT, "valueCode": "unknown"}]}]
    if interval:  # an interval measurement
        res["effectivePeriod"] = {"start": fhir_datetime(ev.time, ev.time_precision),
                                  "end": fhir_datetime(ev.end_time, ev.time_precision)}
    else:
        res["effectiveDateTime"] = fhir_datetime(ev.time, ev.time_precision)
    return res


def _observation(a: _Assembly, ev: Event) -> dict[str, Any]:
    res = _obs_base(a, ev, ev.system, ev.code, ev.display)
    if not _set_value(res, ev):
        res["dataAbsentReason"] = _absent_reason(ev)  # US Core: a value or a reason it is missing
    return res


def _panel(a: _Assembly, ev: Event) -> dict[str, Any]:
    res = _obs_base(a, ev, ev.panel_system, ev.panel_code, ev.panel_display)
    res["component"] = []
    return res


def _component(ev: Event) -> dict[str, Any]:
    comp: dict[str, Any] = {"code": _concept(ev.system, ev.code, ev.display)}
    if not _set_value(comp, ev):
        comp["dataAbsentReason"] = _absent_reason(ev)
    return comp


def _finish_panel(panel: dict[str, Any]) -> None:
    coding = panel["code"]["coding"][0]
    if (coding.get("system"), coding.get("code")) != _BP_PANEL:
        return
    present = {c["code"]["coding"][0].get("code") for c in panel["component"]}
    for code, display in _BP_COMPONENTS:
        if code not in present:
            panel["component"].append(
                {"code": _concept(_BP_PANEL[0], code, display), "dataAbsentReason": _absent()}
            )


def _dar_reference() -> dict[str, Any]:
    """A required reference the synthetic record has nothing to point at (no practitioners are generated)."""
    return {"extension": [{"url": DATA_ABSENT_EXT, "valueCode": "unknown"}]}


def _reason(a: _Assembly, ev: Event, res: dict[str, Any]) -> None:
    """The event's reason (value_*): a reference to the patient's Condition with that code, else reasonCode (a
    text-only reason, as some sources write it, stays text-only)."""
    if not ev.value_code:
        if ev.value_display:
            res["reasonCode"] = [{"text": ev.value_display}]
        return
    ref = a.condition_ref(ev.value_system, ev.value_code, ev.time)
    if ref is not None:
        res["reasonReference"] = [ref]
    else:
        res["reasonCode"] = [_concept(ev.value_system, ev.value_code, ev.value_display)]


def _period_or_time(ev: Event) -> tuple[str, Any]:
    """("...Period", {start, end}) for an interval event, else ("...DateTime", time)."""
    start = fhir_datetime(ev.time, ev.time_precision)
    if ev.end_time is not None and ev.end_time >= ev.time:
        return "Period", {"start": start, "end": fhir_datetime(ev.end_time, ev.time_precision)}
    return "DateTime", start


def _base(a: _Assembly, rtype: str, profile_key: str | None = None) -> dict[str, Any]:
    rid = a.new_id()
    return {
        "resourceType": rtype,
        "id": rid,
        "meta": _meta(a.profile.profiles.get(profile_key or rtype)),
        "identifier": [own_identifier(rid)],
    }


def _medication(a: _Assembly, ev: Event) -> dict[str, Any]:
    """MedicationRequest (US Core), or MedicationStatement where the profile lists medications as statements (IPS)."""
    if a.profile.medication_resource == "MedicationStatement":
        return _medication_statement(a, ev)
    res = _base(a, "MedicationRequest")
    status = ev.status if ev.status in _MEDREQ_STATUS else ("completed" if ev.end_time else "active")
    res["status"] = status
    res["intent"] = "order"
    if ev.category in _MEDREQ_CATEGORIES:
        res["category"] = [{"coding": [{"system": MEDREQ_CATEGORY, "code": ev.category}]}]
    res["medicationCodeableConcept"] = _concept(ev.system, ev.code, ev.display)
    res["subject"] = {"reference": a.pref}
    enc = a.encounter_ref(ev)
    if enc:
        res["encounter"] = enc
    res["authoredOn"] = fhir_datetime(ev.time, ev.time_precision)
    if res["meta"].get("profile"):  # US Core 3.1.1 requires a requester
        res["requester"] = _dar_reference()
    _reason(a, ev, res)
    if ev.end_time is not None and ev.end_time >= ev.time:  # the course, where ingest reads it back
        res["dispenseRequest"] = {"validityPeriod": {"start": res["authoredOn"],
                                                     "end": fhir_datetime(ev.end_time, ev.time_precision)}}
    return res


def _medication_statement(a: _Assembly, ev: Event) -> dict[str, Any]:
    res = _base(a, "MedicationStatement")
    status = _REQ_TO_STMT.get(ev.status or "", ev.status)
    res["status"] = status if status in _MEDSTMT_STATUS else ("completed" if ev.end_time else "active")
    if ev.category in _MEDSTMT_CATEGORIES:  # the request categories a statement has too (not discharge)
        res["category"] = {"coding": [{"system": MEDSTMT_CATEGORY, "code": ev.category}]}
    res["medicationCodeableConcept"] = _concept(ev.system, ev.code, ev.display)
    res["subject"] = {"reference": a.pref}
    enc = a.encounter_ref(ev)
    if enc:
        res["context"] = enc
    kind, when = _period_or_time(ev)
    res[f"effective{kind}"] = when
    _reason(a, ev, res)
    return res


def _immunization(a: _Assembly, ev: Event) -> dict[str, Any]:
    res = _base(a, "Immunization")
    res["status"] = ev.status if ev.status in _IMM_STATUS else "completed"
    res["vaccineCode"] = _concept(ev.system, ev.code, ev.display)
    res["patient"] = {"reference": a.pref}
    enc = a.encounter_ref(ev)
    if enc:
        res["encounter"] = enc
    res["occurrenceDateTime"] = fhir_datetime(ev.time, ev.time_precision)
    # US Core 3.1.1 requires primarySource: the record stands for the administration itself, as Synthea's do
    res["primarySource"] = True
    return res


def _procedure(a: _Assembly, ev: Event) -> dict[str, Any]:
    res = _base(a, "Procedure")
    res["status"] = ev.status if ev.status in _PROC_STATUS else "completed"
    if ev.category:
        code = _code(ev.category)
        coding = {"system": SNOMED, "code": code} if code.isdigit() else {"code": code}
        res["category"] = {"coding": [coding]} if code else {"text": ev.category}
    res["code"] = _concept(ev.system, ev.code, ev.display)
    res["subject"] = {"reference": a.pref}
    enc = a.encounter_ref(ev)
    if enc:
        res["encounter"] = enc
    kind, when = _period_or_time(ev)
    res[f"performed{kind}"] = when
    _reason(a, ev, res)
    return res


def _allergy(a: _Assembly, ev: Event) -> dict[str, Any]:
    res = _base(a, "AllergyIntolerance")
    # ait-1/ait-2: clinicalStatus is present unless the verification is entered-in-error, which is never emitted
    clinical = ev.status if ev.status in _ALLERGY_CLINICAL else "active"
    res["clinicalStatus"] = {"coding": [{"system": ALLERGY_CLINICAL, "code": clinical}]}
    res["verificationStatus"] = {"coding": [{"system": ALLERGY_VER, "code": "confirmed"}]}
    if ev.category in _ALLERGY_CATEGORY:
        res["category"] = [ev.category]
    if ev.value_system == CRITICALITY_SYSTEM and ev.value_code in _CRITICALITY:
        res["criticality"] = ev.value_code
    res["code"] = _concept(ev.system, ev.code, ev.display)
    res["patient"] = {"reference": a.pref}
    enc = a.encounter_ref(ev)
    if enc:
        res["encounter"] = enc
    res["onsetDateTime"] = fhir_datetime(ev.time, ev.time_precision)
    res["recordedDate"] = res["onsetDateTime"]  # what R4's `date` search parameter finds (recordedDate)
    return res


_ITEM_BUILDERS = {"medication": _medication, "immunization": _immunization, "procedure": _procedure}


def _provenance(a: _Assembly, resources: list[dict[str, Any]], gen: GeneratorInfo) -> dict[str, Any]:
    eps = "none" if gen.epsilon is None else f"{gen.epsilon:g}"
    delta = "none" if gen.delta is None else f"{gen.delta:g}"
    guarantee = (
        f"({eps}, {delta})-differential privacy per patient" if gen.epsilon is not None else "no differential privacy"
    )
    return {
        "resourceType": "Provenance",
        "id": a.new_id(),
        "meta": _meta(a.profile.profiles.get("Provenance")),
        "target": [{"reference": f"{r['resourceType']}/{r['id']}"} for r in resources],
        "recorded": gen.recorded,
        "policy": [f"urn:fhirsynth:privacy:epsilon={eps};delta={delta}"],
        "reason": [{"coding": [HTEST]}],
        "activity": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "CREATE", "display": "create"}
            ]
        },
        "agent": [
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "assembler",
                            "display": "Assembler",
                        }
                    ]
                },
                "who": {
                    "identifier": {"system": "urn:fhirsynth:software", "value": f"fhirsynth {gen.fhirsynth_version}"},
                    "display": f"fhirsynth {gen.fhirsynth_version} synthetic data generator",
                },
            }
        ],
        "entity": [
            {
                "role": "source",
                "what": {
                    "identifier": {"system": MODEL_HASH_SYSTEM, "value": gen.model_hash},
                    "display": f"fhirsynth model sha256:{gen.model_hash}, trained with {guarantee}",
                },
            }
        ],
    }
