"""Ingest of medications, immunizations, procedures and allergies (issue 18): the contract of timeline/types.py on a
hand-made Bundle (fixtures/rest), the shared us-full cohort's books and a parquet round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from fhirsynth.errors import MappingError
from fhirsynth.mapping.loader import parse_mapping
from fhirsynth.timeline.adapter import ingest
from fhirsynth.timeline.io import read_timelines, write_timelines
from fhirsynth.timeline.types import CRITICALITY_SYSTEM


@pytest.fixture(scope="module")
def rest(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("rest")
    report = ingest([fixtures_dir / "rest" / "rest-bundle.json"], out)
    events = {e.source_id: (tl.patient.patient_id, e) for tl in read_timelines(out) for e in tl.events}
    return report, events


def _balanced(report: dict) -> None:
    for rtype, c in report["resource_types"].items():
        assert c["read"] == c["used"] + c["skipped"], rtype
    assert report["totals"]["read"] == report["totals"]["used"] + report["totals"]["skipped"]


def test_every_resource_used_or_skipped_with_a_reason(rest: tuple[dict, dict]) -> None:
    report, _ = rest
    _balanced(report)
    types = report["resource_types"]
    assert types["MedicationRequest"]["skipped_by_reason"] == {"medication_not_found": 1}
    assert types["Medication"]["skipped_by_reason"] == {"medication_not_referenced": 1}
    assert types["Medication"]["used"] == 1  # the one a MedicationRequest referenced
    assert types["Procedure"]["skipped_by_reason"] == {"status_excluded": 1}
    for rtype in ("Immunization", "AllergyIntolerance", "MedicationStatement"):
        assert types[rtype]["skipped"] == 0, rtype
    example = report["skipped"]["medication_not_found"]["examples"][0]
    assert example["resource"] == "MedicationRequest/mr-missing" and "Medication/nowhere" in example["detail"]
    # the reason pointing at another patient's Condition is dropped, and counted
    assert report["reasons_unresolved"] == 1


def test_medication_codes_and_reasons(rest: tuple[dict, dict]) -> None:
    _, ev = rest
    pid, inline = ev["MedicationRequest/mr-inline"]
    assert pid == "p-rest-1" and inline.kind == "medication" and inline.code == "895994"
    assert inline.end_time is not None and inline.end_time.isoformat() == "2010-08-01T00:00:00+00:00"
    assert inline.category == "community" and inline.status == "active"
    assert (inline.value_system, inline.value_code, inline.value_display) == (
        "http://snomed.info/sct", "195967001", "Asthma")  # reasonReference -> the same patient's Condition
    contained = ev["MedicationRequest/mr-contained"][1]
    assert contained.code == "1049221" and contained.value_code == "22298006"  # contained Medication, reasonCode
    other = ev["MedicationRequest/mr-bundle"][1]
    assert other.code == "860975"  # the Medication elsewhere in the Bundle
    assert other.value_code is None and other.value_system is None  # another patient's Condition: no reason
    statement = ev["MedicationStatement/ms-1"][1]
    assert statement.system == "http://www.whocc.no/atc" and statement.end_time.month == 6
    assert statement.value_code == "44054006"


def test_immunization_procedure_allergy(rest: tuple[dict, dict]) -> None:
    _, ev = rest
    imm = ev["Immunization/im-1"][1]
    assert (imm.kind, imm.system, imm.code, imm.status) == ("immunization", "http://hl7.org/fhir/sid/cvx", "08",
                                                            "completed")
    assert imm.time.isoformat().startswith("1990-08-15")
    proc = ev["Procedure/pr-period"][1]
    assert proc.kind == "procedure" and (proc.end_time - proc.time).total_seconds() == 90 * 60
    assert proc.value_display == "appendicitis" and proc.value_code is None  # a text-only reason
    allergy = ev["AllergyIntolerance/al-1"][1]
    assert (allergy.kind, allergy.category, allergy.status) == ("allergy", "food", "active")
    assert (allergy.value_system, allergy.value_code) == (CRITICALITY_SYSTEM, "high")
    assert allergy.time.year == 2009 and allergy.end_time is None  # recordedDate when no onset


def test_new_kinds_round_trip_through_parquet(rest: tuple[dict, dict], tmp_path: Path, fixtures_dir: Path) -> None:
    src = tmp_path / "a"
    ingest([fixtures_dir / "rest" / "rest-bundle.json"], src)
    first = list(read_timelines(src))
    write_timelines(first, tmp_path / "b")
    second = list(read_timelines(tmp_path / "b"))
    assert [tl.events for tl in first] == [tl.events for tl in second]
    assert {e.kind for tl in second for e in tl.events} >= {"medication", "immunization", "procedure", "allergy"}


def test_mapping_value_code_system_needs_value_code(tmp_path: Path) -> None:
    data = {"version": 1, "Patient": {}, "AllergyIntolerance": {
        "kind": "allergy", "patient": ["patient"], "time": ["recordedDate"], "code": "code",
        "value_code_system": CRITICALITY_SYSTEM}}
    with pytest.raises(MappingError, match=r"\[AllergyIntolerance\].value_code_system"):
        parse_mapping(data, tmp_path / "m.toml")


@pytest.mark.shared
def test_us_full_books(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "us-full" / "ndjson"
    if not src.is_dir():
        pytest.skip("us-full cohort not present")
    report = ingest([src], tmp_path)
    _balanced(report)
    expected = {"MedicationRequest": 16059, "Immunization": 30247, "Procedure": 119729, "AllergyIntolerance": 848}
    for rtype, n in expected.items():
        assert report["resource_types"][rtype]["read"] == n
        assert report["resource_types"][rtype]["used"] == n, report["resource_types"][rtype]
    kinds = report["events"]["by_kind"]
    assert (kinds["medication"], kinds["immunization"], kinds["procedure"], kinds["allergy"]) == (
        16059, 30247, 119729, 848)


@pytest.mark.shared
def test_es_ips_bundles_new_types_used_with_reasons(shared_data: Path, tmp_path: Path) -> None:
    bundles = sorted((shared_data / "es-ips" / "bundles").glob("*.json.gz"))[:6]
    if not bundles:
        pytest.skip("es-ips bundles not present")
    report = ingest(bundles, tmp_path, mapping="ips")
    _balanced(report)
    for rtype in ("MedicationRequest", "Immunization", "Procedure", "AllergyIntolerance"):
        c = report["resource_types"].get(rtype)
        if c is not None:
            assert c["used"] == c["read"], (rtype, c)
    meds = [e for tl in read_timelines(tmp_path) for e in tl.events if e.kind == "medication"]
    assert meds and report["reasons_unresolved"] == 0
    # Bundle-local urn:uuid reasonReferences resolve to the patient's Condition codes
    assert any(e.value_system == "http://snomed.info/sct" and e.value_code for e in meds)
