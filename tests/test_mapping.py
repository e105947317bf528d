"""Mapping TOML loader: shipped files load, every problem in a bad file is reported at once with file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fhirsynth.errors import MappingError
from fhirsynth.mapping import MAPPINGS_DIR, load_mapping
from fhirsynth.timeline.adapter import ingest


@pytest.mark.parametrize("name", ["us-core", "ips"])
def test_shipped_mappings_load(name: str) -> None:
    m = load_mapping(name)
    assert m.version == 1 and m.name == name
    assert {r.kind for r in m.resources.values()} == {"condition", "observation", "encounter", "medication",
                                                      "immunization", "procedure", "allergy"}
    assert m.resources["MedicationRequest"].medication_reference == ("medicationReference",)
    assert m.resources["Procedure"].reason_reference == ("reasonReference",)
    obs = m.resources["Observation"]
    assert obs.systems[0] == "http://loinc.org" and obs.components == "expand"
    assert "entered-in-error" in obs.skip_status
    assert "refuted" in m.resources["Condition"].skip_verification
    assert m.resources["Encounter"].code == ("class",)
    assert isinstance(m.assemble, dict)
    assert m.patient.nationality_extension == "http://hl7.org/fhir/StructureDefinition/patient-nationality"


def test_us_core_has_race_ips_does_not() -> None:
    assert load_mapping("us-core").patient.race_extension.endswith("us-core-race")
    assert load_mapping("ips").patient.race_extension is None


def test_same_by_path_and_name() -> None:
    assert load_mapping(MAPPINGS_DIR / "ips.toml") == load_mapping("ips")


def test_every_problem_reported_once(fixtures_dir: Path) -> None:
    path = fixtures_dir / "ingest" / "mappings" / "many-problems.toml"
    with pytest.raises(MappingError) as exc:
        load_mapping(path)
    err = exc.value
    assert err.where == str(path)
    text = "\n".join(err.problems)
    for needle in ("version", "colour", "[Patient].birth_date", "[Patient].shoe_size", "[Observation].kind",
                   "[Observation].components", "[Observation].time: missing", "[Condition].kind: missing"):
        assert needle in text, needle
    assert str(path) in str(err)


def test_invalid_toml_names_file(fixtures_dir: Path) -> None:
    path = fixtures_dir / "ingest" / "mappings" / "invalid-toml.toml"
    with pytest.raises(MappingError, match="invalid TOML") as exc:
        load_mapping(path)
    assert exc.value.where == str(path)


def test_unknown_name_and_missing_patient(tmp_path: Path) -> None:
    with pytest.raises(MappingError, match="not found"):
        load_mapping("no-such-mapping")
    p = tmp_path / "m.toml"
    p.write_text('version = 1\n[Condition]\nkind = "condition"\npatient = "subject"\ntime = "x"\ncode = "code"\n'
                 'assemble = 3\n')
    with pytest.raises(MappingError) as exc:
        load_mapping(p)
    assert any("[Patient]" in x for x in exc.value.problems)
    assert any("[Condition].assemble" in x for x in exc.value.problems)


def test_assemble_table_is_kept_raw(fixtures_dir: Path) -> None:
    m = load_mapping(fixtures_dir / "ingest" / "mappings" / "minimal-conditions-only.toml")
    assert m.assemble == {"profile": "test"}
    assert list(m.resources) == ["Condition"]


def test_custom_mapping_drives_ingest(fixtures_dir: Path, tmp_path: Path) -> None:
    """A conditions-only mapping leaves Observations and Encounters as unmapped types."""
    report = ingest([fixtures_dir / "ingest" / "valid" / "bulk"], tmp_path,
                    mapping=fixtures_dir / "ingest" / "mappings" / "minimal-conditions-only.toml")
    assert report["events"]["by_kind"] == {"condition": 2}
    assert report["resource_types"]["Observation"]["skipped_by_reason"] == {"unmapped_type": 3}
    assert report["mapping"]["name"] == "conditions-only"


def test_accepted_systems_order_decides_the_code(tmp_path: Path) -> None:
    """With two codings, the system earlier in `systems` wins; reversing the list flips the result."""
    import orjson

    cond = {"resourceType": "Condition", "id": "c", "subject": {"reference": "Patient/p"}, "onsetDateTime": "2020",
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "E11"},
                                {"system": "http://snomed.info/sct", "code": "44054006"}]}}
    src = tmp_path / "in.ndjson"
    src.write_bytes(orjson.dumps({"resourceType": "Patient", "id": "p"}) + b"\n" + orjson.dumps(cond))
    base = MAPPINGS_DIR.joinpath("us-core.toml").read_text()
    flipped = base.replace(
        'systems = ["http://snomed.info/sct", "http://hl7.org/fhir/sid/icd-10-cm", "http://hl7.org/fhir/sid/icd-10"]',
        'systems = ["http://hl7.org/fhir/sid/icd-10", "http://snomed.info/sct"]')
    assert flipped != base
    (tmp_path / "flipped.toml").write_text(flipped)
    import pyarrow.parquet as pq

    ingest([src], tmp_path / "a")
    ingest([src], tmp_path / "b", mapping=tmp_path / "flipped.toml")
    assert pq.read_table(tmp_path / "a" / "events.parquet").column("code").to_pylist() == ["44054006"]
    assert pq.read_table(tmp_path / "b" / "events.parquet").column("code").to_pylist() == ["E11"]


def test_bare_coding_code_still_checked_against_accepted_systems() -> None:
    """Encounter.class is a bare Coding: a system outside [Encounter].systems is skipped, not accepted (the
    medicationReference path must not switch that check off for every bare Coding)."""
    from fhirsynth.timeline.extract import EventExtractor

    ex = EventExtractor(load_mapping(MAPPINGS_DIR / "us-core.toml").resources["Encounter"])
    res = {"resourceType": "Encounter", "id": "e1", "status": "finished", "subject": {"reference": "Patient/p"},
           "class": {"system": "http://example.org/not-actcode", "code": "AMB"},
           "period": {"start": "2020-01-01T00:00:00Z"}}
    assert ex(res, None)[0] == "code_system_not_accepted"
    res["class"]["system"] = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
    assert ex(res, None)[0][4] == "AMB"


def test_reason_or_value_code_with_a_measured_value_is_refused(tmp_path: Path) -> None:
    """reason_code / value_code replace value_quantity & co in the extractor: a table with both would silently
    lose its measured values, so the loader says so."""
    p = tmp_path / "m.toml"
    p.write_text('version = 1\n[Patient]\n[Observation]\nkind = "observation"\npatient = "subject"\n'
                 'time = "effectiveDateTime"\ncode = "code"\nvalue_quantity = "valueQuantity"\n'
                 'reason_code = "reasonCode"\n')
    with pytest.raises(MappingError) as exc:
        load_mapping(p)
    assert any("[Observation].reason_code" in x and "value_quantity" in x for x in exc.value.problems)


def test_reason_display_comes_from_the_concept_of_the_picked_coding() -> None:
    """Two reasonCode concepts, the first text-only: the reason's code is the second one's, so its display must
    be the second one's text too, not the first's (a code labelled with another condition's name)."""
    from fhirsynth.timeline.extract import EventExtractor

    ex = EventExtractor(load_mapping(MAPPINGS_DIR / "us-core.toml").resources["Procedure"])
    res = {"resourceType": "Procedure", "id": "x1", "status": "completed", "subject": {"reference": "Patient/p"},
           "code": {"coding": [{"system": "http://snomed.info/sct", "code": "73761001"}]},
           "performedDateTime": "2020-01-01T00:00:00Z",
           "reasonCode": [{"text": "Headache"},
                          {"coding": [{"system": "http://snomed.info/sct", "code": "195662009"}],
                           "text": "Acute viral pharyngitis"}]}
    row = ex(res, None)[0]
    assert row[8:11] == ("http://snomed.info/sct", "195662009", "Acute viral pharyngitis")
