"""One patient's resources -> a transaction, collection or IPS Patient Summary document Bundle.

All Bundles use `urn:uuid:<id>` fullUrls (assembled ids are UUIDs) and every `Type/id` reference that points
inside the Bundle is rewritten to that fullUrl, so nothing depends on server-side ids or conditional references.
Transactions PUT `Type/id`: loading the same export twice updates instead of duplicating.
"""

from __future__ import annotations

from typing import Any

from fhirsynth.timeline.assembler import HTEST, GeneratorInfo, own_identifier
from fhirsynth.timeline.profiles import Profile

LOINC = "http://loinc.org"
LIST_EMPTY = "http://terminology.hl7.org/CodeSystem/list-empty-reason"
XHTML = 'xmlns="http://www.w3.org/1999/xhtml"'
# Entry order a server can process front to back: referenced resources before those that reference them.
# Medications and Procedures point at the Conditions they treat (reasonReference), so they follow Conditions.
TYPE_ORDER = {"Patient": 0, "Device": 1, "Encounter": 2, "Condition": 3, "Observation": 4, "AllergyIntolerance": 4,
              "MedicationRequest": 5, "MedicationStatement": 5, "Immunization": 5, "Procedure": 5, "Provenance": 8}


def full_url(rtype_or_resource: Any, rid: str | None = None) -> str:
    if isinstance(rtype_or_resource, dict):
        rid = rtype_or_resource["id"]
    return f"urn:uuid:{rid}"


def rewrite_refs(node: Any, mapping: dict[str, str]) -> Any:
    """A copy of `node` with every {"reference": "Type/id"} found in `mapping` replaced by its fullUrl."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                out[k] = mapping.get(v, v)
            elif isinstance(v, (dict, list)):
                out[k] = rewrite_refs(v, mapping)
            else:
                out[k] = v
        return out
    if isinstance(node, list):
        return [rewrite_refs(v, mapping) if isinstance(v, (dict, list)) else v for v in node]
    return node


# Where the assembler puts references, per type: rewriting just these is ~10x faster than walking every
# element (tests walk every element of every Bundle to prove nothing was missed).
_REF_FIELDS = {
    "Patient": (),
    "Device": (),
    "Encounter": ("subject",),
    "Condition": ("subject", "encounter"),
    "Observation": ("subject", "encounter"),
    "MedicationRequest": ("subject", "encounter", "requester", "reasonReference"),
    "MedicationStatement": ("subject", "context", "reasonReference"),
    "Immunization": ("patient", "encounter"),
    "Procedure": ("subject", "encounter", "reasonReference"),
    "AllergyIntolerance": ("patient", "encounter"),
}


def _rewrite_ref(ref: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    target = ref.get("reference")
    return {**ref, "reference": mapping.get(target, target)} if target is not None else ref


def _rewrite_resource(r: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    rtype = r["resourceType"]
    fields = _REF_FIELDS.get(rtype)
    if fields is None and rtype != "Provenance":
        return rewrite_refs(r, mapping)
    out = dict(r)
    for key in fields or ():
        ref = r.get(key)
        if isinstance(ref, list):  # reasonReference: 0..*
            out[key] = [_rewrite_ref(one, mapping) for one in ref]
        elif ref is not None:  # a reference may carry only a data-absent-reason extension (no `reference`)
            out[key] = _rewrite_ref(ref, mapping)
    if rtype == "Provenance":
        out["target"] = [{**t, "reference": mapping.get(t["reference"], t["reference"])} for t in r["target"]]
        out["agent"] = rewrite_refs(r.get("agent", []), mapping)
        out["entity"] = rewrite_refs(r.get("entity", []), mapping)
    return out


def _ordered(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(resources, key=lambda r: TYPE_ORDER.get(r["resourceType"], 9))  # stable within a type


def _entries(resources: list[dict[str, Any]], *, request: bool) -> list[dict[str, Any]]:
    mapping = {f"{r['resourceType']}/{r['id']}": full_url(r) for r in resources}
    entries = []
    for r in resources:
        entry: dict[str, Any] = {"fullUrl": full_url(r), "resource": _rewrite_resource(r, mapping)}
        if request:
            entry["request"] = {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}
        entries.append(entry)
    return entries


def _bundle_meta() -> dict[str, Any]:
    return {"security": [HTEST], "tag": [HTEST]}


def transaction_bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "meta": _bundle_meta(),
        "type": "transaction",
        "entry": _entries(_ordered(resources), request=True),
    }


def collection_bundle(resources: list[dict[str, Any]], *, bundle_id: str, timestamp: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "id": bundle_id,
        "meta": _bundle_meta(),
        "type": "collection",
        "timestamp": timestamp,
        "entry": _entries(_ordered(resources), request=False),
    }


def _narrative(text: str) -> dict[str, str]:
    safe = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return {"status": "generated", "div": f"<div {XHTML}>{safe}</div>"}


def _display(resource: dict[str, Any]) -> str:
    code = resource.get("code") or resource.get("medicationCodeableConcept") or resource.get("vaccineCode") or {}
    coding = (code.get("coding") or [{}])[0]
    return code.get("text") or coding.get("display") or coding.get("code") or resource["resourceType"]


_EMPTY_DISPLAY = {"nilknown": "Nil Known", "unavailable": "Unavailable"}


def _section(
    title: str, code: str, entries: list[dict[str, Any]], empty_text: str, empty_reason: str = "nilknown"
) -> dict[str, Any]:
    section: dict[str, Any] = {
        "title": title,
        "code": {"coding": [{"system": LOINC, "code": code, "display": title}]},
    }
    if entries:
        names = sorted({_display(r) for r in entries})
        shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        section["text"] = _narrative(f"{len(entries)} entries: {shown}")
        section["entry"] = [{"reference": full_url(r)} for r in entries]
    else:
        section["text"] = _narrative(empty_text)
        section["emptyReason"] = {
            "coding": [{"system": LIST_EMPTY, "code": empty_reason, "display": _EMPTY_DISPLAY[empty_reason]}]
        }
    return section


def _category(resource: dict[str, Any]) -> str | None:
    for cat in resource.get("category") or ():
        for coding in cat.get("coding") or ():
            if coding.get("code"):
                return coding["code"]
    return None


def document_bundle(
    resources: list[dict[str, Any]],
    *,
    profile: Profile,
    generator: GeneratorInfo,
    composition_id: str,
    device_id: str,
    bundle_id: str,
) -> dict[str, Any]:
    """An IPS Patient Summary: Composition first, then the Patient, the authoring Device and the entries.

    Sections: problems (11450-4), medications (10160-0) and allergies (48765-2) are required by IPS: each lists
    the record's items, or has an emptyReason where the record has none; results (30954-2) and vital signs
    (8716-3) reference the Observations by category; immunizations (11369-6) and history of procedures (47519-4)
    are there when the record has such items.
    """
    patient = resources[0]
    if patient["resourceType"] != "Patient":
        raise ValueError("assembled resources must start with the Patient")
    conditions = [r for r in resources if r["resourceType"] == "Condition"]
    observations = [r for r in resources if r["resourceType"] == "Observation"]
    medications = [r for r in resources if r["resourceType"] in ("MedicationStatement", "MedicationRequest")]
    allergies = [r for r in resources if r["resourceType"] == "AllergyIntolerance"]
    immunizations = [r for r in resources if r["resourceType"] == "Immunization"]
    procedures = [r for r in resources if r["resourceType"] == "Procedure"]
    vitals, results, social = [], [], []
    for o in observations:
        cat = _category(o)
        if cat == "vital-signs":
            vitals.append(o)
        elif cat in ("laboratory", "imaging", "procedure", "exam", None):
            results.append(o)
        else:  # social-history, survey, ...: IPS has no results slot for them
            social.append(o)
    device = {
        "resourceType": "Device",
        "id": device_id,
        "meta": _bundle_meta(),
        "identifier": [own_identifier(device_id)],
        "deviceName": [{"name": "fhirsynth synthetic data generator", "type": "manufacturer-name"}],
        "version": [{"value": generator.fhirsynth_version}],
        "note": [{"text": f"model sha256:{generator.model_hash}"}],
    }
    name = (patient.get("name") or [{}])[0]
    who = " ".join([*name.get("given", []), name.get("family", "")]).strip() or "synthetic patient"
    sections = [
        _section("Problems", "11450-4", conditions, "No problems recorded."),
        # "unavailable", not "nil known": a record without these items may come from a model (or source) that
        # does not hold them at all, which says nothing about whether the patient has any.
        _section("Medication Summary", "10160-0", medications, "No information about medications in this record.",
                 "unavailable"),
        _section("Allergies and Intolerances", "48765-2", allergies,
                 "No information about allergies in this record.", "unavailable"),
        _section("Results", "30954-2", results, "No results recorded."),
        _section("Vital Signs", "8716-3", vitals, "No vital signs recorded."),
    ]
    if immunizations:
        sections.append(_section("Immunizations", "11369-6", immunizations, ""))
    if procedures:
        sections.append(_section("History of Procedures", "47519-4", procedures, ""))
    if social:
        sections.append(_section("Social History", "29762-2", social, ""))
    composition = {
        "resourceType": "Composition",
        "id": composition_id,
        "meta": {**({"profile": [profile.profiles["Composition"]]} if profile.profiles.get("Composition") else {}),
                 **_bundle_meta()},
        "text": _narrative(f"Synthetic patient summary of {who} (test data, not a real person)."),
        "status": "final",
        "type": {"coding": [{"system": LOINC, "code": "60591-5", "display": "Patient summary Document"}]},
        "subject": {"reference": f"Patient/{patient['id']}"},
        "date": generator.recorded,
        "author": [{"reference": f"Device/{device_id}"}],
        "title": f"Patient Summary (synthetic) of {who}",
        "confidentiality": "N",
        "section": sections,
    }
    ordered = [composition, patient, device, *_ordered(resources[1:])]
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": bundle_id,
        "meta": {**({"profile": [profile.profiles["Bundle"]]} if profile.profiles.get("Bundle") else {}),
                 **_bundle_meta()},
        "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{bundle_id}"},
        "type": "document",
        "timestamp": generator.recorded,
        "entry": _entries(ordered, request=False),
    }
    return bundle


def reference_parts(ref: str) -> tuple[str, str] | None:
    """(type, id) of a literal reference or location, relative or absolute, a `/_history/v` suffix dropped; None
    for a urn, a fragment or anything that does not end in `Type/id`."""
    if ref.startswith(("urn:", "#")):
        return None
    parts = ref.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2][:1].isupper():
        return parts[-2], parts[-1]
    return None


def iter_references(node: Any):
    """Every literal reference string inside a resource (for integrity checks)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                yield v
            elif isinstance(v, (dict, list)):
                yield from iter_references(v)
    elif isinstance(node, list):
        for v in node:
            yield from iter_references(v)
