"""Assembler, issue 18 output side: medications, immunizations, procedures and allergies become valid, profiled,
linked, HTEST-marked resources covered by the Provenance, and fill the IPS document's sections."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest

from fhirsynth.export.bundles import document_bundle, iter_references, transaction_bundle
from fhirsynth.fhir.validate import validate_resource
from fhirsynth.timeline.assembler import HTEST, RESOURCE_ID_SYSTEM, GeneratorInfo, assemble_patient
from fhirsynth.timeline.profiles import apply_assemble_table, load_profile
from fhirsynth.timeline.samples import SNOMED
from fhirsynth.timeline.types import CRITICALITY_SYSTEM, Event, PatientInfo, Timeline
from fhirsynth.errors import MappingError
from item_timelines import CVX, RXNORM, item_timelines

GEN = GeneratorInfo(model_hash="0f" * 32, epsilon=4.0, delta=1e-5, recorded="2026-01-02T03:04:05+00:00")
T0 = datetime(2020, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
NEW = {"us-core": ("MedicationRequest", "Immunization", "Procedure", "AllergyIntolerance"),
       "ips": ("MedicationStatement", "Immunization", "Procedure", "AllergyIntolerance")}
PROFILE_URL = {
    "us-core": {t: f"http://hl7.org/fhir/us/core/StructureDefinition/us-core-{t.lower()}" for t in NEW["us-core"]},
    "ips": {t: f"http://hl7.org/fhir/uv/ips/StructureDefinition/{t}-uv-ips" for t in NEW["ips"]},
}


def _assemble(timelines, profile, seed=7):
    return [assemble_patient(tl, profile=profile, seed=seed, index=i, generator=GEN) for i, tl in enumerate(timelines)]


@pytest.mark.parametrize("profile", ["us-core", "ips"])
def test_every_new_resource_valid_profiled_tagged_and_covered(profile):
    patients = _assemble(item_timelines(40, seed=5 if profile == "us-core" else 6, visits=6, edge_cases=True),
                         profile)
    counts = Counter(r["resourceType"] for rs in patients for r in rs)
    for rtype in NEW[profile]:
        assert counts[rtype] >= 10, counts
    other = "MedicationStatement" if profile == "us-core" else "MedicationRequest"
    assert counts[other] == 0
    failures = []
    for resources in patients:
        ids = {f"{r['resourceType']}/{r['id']}" for r in resources}
        prov = resources[-1]
        assert prov["resourceType"] == "Provenance"
        covered = {t["reference"] for t in prov["target"]}
        for r in resources:
            if r["resourceType"] not in NEW[profile]:
                continue
            failures += [(r["resourceType"], r["id"], p) for p in validate_resource(r)]
            assert r["meta"]["profile"] == [PROFILE_URL[profile][r["resourceType"]]]
            assert HTEST in r["meta"]["security"] and HTEST in r["meta"]["tag"]
            assert r["identifier"] == [{"system": RESOURCE_ID_SYSTEM, "value": r["id"]}]
            assert f"{r['resourceType']}/{r['id']}" in covered
            for ref in iter_references(r):
                assert ref in ids, (r["resourceType"], ref)
    assert failures == [], failures[:5]
    # required bindings the R4 JSON schema leaves as plain `code` (FHIR R4 value sets, written out here)
    allowed = {
        "MedicationRequest": {"active", "on-hold", "cancelled", "completed", "entered-in-error", "stopped", "draft",
                              "unknown"},
        "MedicationStatement": {"active", "completed", "entered-in-error", "intended", "stopped", "on-hold",
                                "unknown", "not-taken"},
        "Immunization": {"completed", "entered-in-error", "not-done"},
        "Procedure": {"preparation", "in-progress", "not-done", "on-hold", "stopped", "completed",
                      "entered-in-error", "unknown"},
    }
    statuses = Counter((r["resourceType"], r.get("status")) for rs in patients for r in rs if r["resourceType"] in allowed)
    assert all(s in allowed[t] for t, s in statuses), statuses
    for r in (r for rs in patients for r in rs if r["resourceType"] == "AllergyIntolerance"):
        assert r["clinicalStatus"]["coding"][0]["code"] in {"active", "inactive", "resolved"}
        assert set(r.get("category", [])) <= {"food", "medication", "environment", "biologic"}
        assert r.get("criticality", "low") in {"low", "high", "unable-to-assess"}
    assert all(r["intent"] == "order" for rs in patients for r in rs if r["resourceType"] == "MedicationRequest")


def _one(kind: str, **kw) -> Timeline:
    patient = PatientInfo(patient_id="p", sex="female", birth_date=datetime(1970, 1, 1).date())
    events = [Event(time=T0, kind="encounter", system="http://terminology.hl7.org/CodeSystem/v3-ActCode",
                    code="AMB", encounter_id="e1", end_time=T0 + timedelta(hours=1)),
              Event(time=T0 - timedelta(days=400), kind="condition", system=SNOMED, code="59621000",
                    display="Essential hypertension (disorder)"),
              Event(time=T0, kind=kind, encounter_id="e1", **kw)]
    return Timeline(patient=patient, events=events)


def _only(resources, rtype):
    found = [r for r in resources if r["resourceType"] == rtype]
    assert len(found) == 1, [r["resourceType"] for r in resources]
    return found[0]


def test_medication_request_us_core_shape_and_reason_reference():
    tl = _one("medication", system=RXNORM, code="314076", display="lisinopril 10 MG Oral Tablet",
              end_time=T0 + timedelta(days=90), status="completed", category="outpatient",
              value_system=SNOMED, value_code="59621000")
    res = _assemble([tl], "us-core")[0]
    mr = _only(res, "MedicationRequest")
    cond = _only(res, "Condition")
    enc = _only(res, "Encounter")
    assert mr["status"] == "completed" and mr["intent"] == "order"
    assert mr["medicationCodeableConcept"]["coding"] == [{"system": RXNORM, "code": "314076",
                                                          "display": "lisinopril 10 MG Oral Tablet"}]
    assert mr["subject"] == {"reference": f"Patient/{res[0]['id']}"}
    assert mr["encounter"] == {"reference": f"Encounter/{enc['id']}"}
    assert mr["authoredOn"] == T0.isoformat()
    assert mr["requester"]["extension"][0]["valueCode"] == "unknown"  # required by US Core 3.1.1, not invented
    assert mr["reasonReference"] == [{"reference": f"Condition/{cond['id']}"}] and "reasonCode" not in mr
    assert mr["category"][0]["coding"][0]["code"] == "outpatient"
    assert mr["dispenseRequest"]["validityPeriod"]["end"] == (T0 + timedelta(days=90)).isoformat()


def test_reason_without_matching_condition_is_a_reason_code():
    tl = _one("procedure", system=SNOMED, code="117015009", display="Throat culture", value_system=SNOMED,
              value_code="444814009", value_display="Viral sinusitis")
    proc = _only(_assemble([tl], "us-core")[0], "Procedure")
    assert proc["reasonCode"] == [{"coding": [{"system": SNOMED, "code": "444814009", "display": "Viral sinusitis"}],
                                   "text": "Viral sinusitis"}]
    assert "reasonReference" not in proc and proc["status"] == "completed"
    assert proc["performedDateTime"] == T0.isoformat()


def test_ips_medication_statement_period_and_status_mapping():
    tl = _one("medication", system=RXNORM, code="314076", end_time=T0 + timedelta(days=30), status="cancelled",
              category="community")
    ms = _only(_assemble([tl], "ips")[0], "MedicationStatement")
    assert ms["status"] == "not-taken"  # a cancelled request was never taken
    assert ms["category"] == {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/medication-statement-category",
                                          "code": "community"}]}
    assert ms["effectivePeriod"] == {"start": T0.isoformat(), "end": (T0 + timedelta(days=30)).isoformat()}
    assert "context" in ms and "encounter" not in ms
    tl = _one("medication", system=RXNORM, code="314076", category="discharge")  # a request-only category
    ms = _only(_assemble([tl], "ips")[0], "MedicationStatement")
    assert "category" not in ms and ms["status"] == "active" and ms["effectiveDateTime"] == T0.isoformat()


def test_immunization_and_allergy_fields():
    res = _assemble([_one("immunization", system=CVX, code="140", display="Influenza", status="weird")], "us-core")[0]
    imm = _only(res, "Immunization")
    assert imm["status"] == "completed" and imm["primarySource"] is True
    assert imm["vaccineCode"]["coding"][0] == {"system": CVX, "code": "140", "display": "Influenza"}
    assert imm["patient"] == {"reference": f"Patient/{res[0]['id']}"} and "subject" not in imm
    assert imm["occurrenceDateTime"] == T0.isoformat()
    tl = _one("allergy", system=SNOMED, code="91936005", category="medication", status="resolved",
              value_system=CRITICALITY_SYSTEM, value_code="high", time_precision="year")
    al = _only(_assemble([tl], "ips")[0], "AllergyIntolerance")
    assert al["clinicalStatus"]["coding"][0]["code"] == "resolved"
    assert al["verificationStatus"]["coding"][0]["code"] == "confirmed"
    assert al["category"] == ["medication"] and al["criticality"] == "high"
    assert al["onsetDateTime"] == "2020"
    bad = _one("allergy", system=SNOMED, code="91936005", category="odd", status="odd", value_code="odd")
    al = _only(_assemble([bad], "us-core")[0], "AllergyIntolerance")
    assert al["clinicalStatus"]["coding"][0]["code"] == "active"  # ait-1: a clinicalStatus is always there
    assert "category" not in al and "criticality" not in al and validate_resource(al) == []


def test_medication_resource_setting_is_checked():
    base = load_profile("us-core")
    assert apply_assemble_table(base, {"medication_resource": "MedicationStatement"}, "x").medication_resource == \
        "MedicationStatement"
    with pytest.raises(MappingError, match="medication_resource"):
        apply_assemble_table(base, {"medication_resource": "Medication"}, "x")


def test_ips_document_sections_list_the_record_items():
    timelines = item_timelines(30, seed=9)
    seen_meds = seen_empty = 0
    for i, resources in enumerate(_assemble(timelines, "ips")):
        doc = document_bundle(resources, profile=load_profile("ips"), generator=GEN, composition_id=f"c{i}",
                              device_id=f"d{i}", bundle_id=f"b{i}")
        comp = doc["entry"][0]["resource"]
        sections = {s["code"]["coding"][0]["code"]: s for s in comp["section"]}
        full = {e["fullUrl"]: e["resource"]["resourceType"] for e in doc["entry"]}
        for code, rtypes in (("10160-0", {"MedicationStatement"}), ("48765-2", {"AllergyIntolerance"}),
                             ("11369-6", {"Immunization"}), ("47519-4", {"Procedure"})):
            items = [r for r in resources if r["resourceType"] in rtypes]
            sec = sections.get(code)
            if items:
                assert sec is not None and "emptyReason" not in sec
                assert sorted(full[e["reference"]] for e in sec["entry"]) == sorted(r["resourceType"] for r in items)
                assert len(sec["entry"]) == len(items)
                seen_meds += code == "10160-0"
            elif code in ("10160-0", "48765-2"):  # required sections: an emptyReason, no entry
                assert sec["emptyReason"]["coding"][0]["code"] == "unavailable" and "entry" not in sec
                seen_empty += 1
            else:
                assert sec is None
        refs = set(iter_references(doc))
        assert refs <= set(full), refs - set(full)
    assert seen_meds >= 10 and seen_empty >= 1


def test_transaction_orders_reasons_after_conditions():
    resources = _assemble(item_timelines(10, seed=3), "us-core")
    for rs in resources:
        entries = transaction_bundle(rs)["entry"]
        pos = {e["fullUrl"]: i for i, e in enumerate(entries)}
        for i, e in enumerate(entries):
            for ref in iter_references(e["resource"]):
                if ref in pos and e["resource"]["resourceType"] != "Provenance":
                    assert pos[ref] < i, (e["resource"]["resourceType"], ref)


def test_text_only_reason_stays_text():
    """A reason with no code (reasonCode.text only, as the es-ips cohort writes some) is kept as text."""
    tl = _one("procedure", system=SNOMED, code="133899007", value_display="knee_injury")
    for profile in ("us-core", "ips"):
        proc = _only(_assemble([tl], profile)[0], "Procedure")
        assert proc["reasonCode"] == [{"text": "knee_injury"}] and "reasonReference" not in proc
        assert validate_resource(proc) == []
