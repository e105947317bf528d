"""Both validators (fhir.resources R4B and the FHIR R4 JSON schema) on known-good and known-bad resources."""

from __future__ import annotations

import copy
import gzip
import json

import pytest

from fhirsynth.errors import ValidationError
from fhirsynth.fhir import validate as v

GOOD_OBS = {
    "resourceType": "Observation",
    "id": "o1",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
    "subject": {"reference": "Patient/p1"},
    "effectiveDateTime": "2020-01-02T03:04:05+00:00",
    "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
}


def test_schema_is_packaged():
    # the schema ships in the package (a plain pip install validates); a missing one must fail here, not skip
    assert v.schema_path() == v.DEFAULT_SCHEMA_PATH and v.DEFAULT_SCHEMA_PATH.is_file(), \
        "run scripts/fetch_fhir_schema.sh"
    assert v.DEFAULT_SCHEMA_PATH.suffix == ".xz" and v.DEFAULT_SCHEMA_PATH.stat().st_size < 500_000


def _fresh_schema(monkeypatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv(v.SCHEMA_ENV, raising=False)
    else:
        monkeypatch.setenv(v.SCHEMA_ENV, value)
    v._definitions.cache_clear()
    v._schema_validator.cache_clear()


def test_env_override_with_a_plain_schema_file(monkeypatch, tmp_path):
    """$FHIRSYNTH_FHIR_SCHEMA still selects another fhir.schema.json (uncompressed here); it is really read."""
    import json
    import lzma

    doc = json.loads(lzma.decompress(v.DEFAULT_SCHEMA_PATH.read_bytes()))
    # the override's Observation allows any status, so a status the packaged schema rejects passes
    doc["definitions"]["Observation"]["properties"]["status"] = {"type": "string"}
    path = tmp_path / "fhir.schema.json"
    path.write_text(json.dumps(doc))
    bad_status = dict(GOOD_OBS, status="done")
    try:
        _fresh_schema(monkeypatch, str(path))
        assert v.validate_resource(bad_status) == []
        _fresh_schema(monkeypatch, None)
        assert any("status" in p for p in v.validate_resource(bad_status))
    finally:
        _fresh_schema(monkeypatch, None)


def test_valid_resource_has_no_problems():
    assert v.validate_resource(GOOD_OBS) == []


def test_schema_catches_bad_code_value_that_models_accept():
    bad = dict(GOOD_OBS, status="done")
    problems = v.validate_resource(bad)
    assert any(p.startswith("schema $.status") for p in problems), problems


def test_models_catch_bad_date_format():
    bad = dict(GOOD_OBS, effectiveDateTime="2020-13-45")
    problems = v.validate_resource(bad)
    assert any(p.startswith("fhir.resources effectiveDateTime") for p in problems), problems


def test_unknown_element_caught_by_both():
    problems = v.validate_resource(dict(GOOD_OBS, colour="red"))
    assert any(p.startswith("fhir.resources") for p in problems)
    assert any(p.startswith("schema") and "colour" in p for p in problems)


def test_missing_required_element():
    bad = copy.deepcopy(GOOD_OBS)
    del bad["code"]
    problems = v.validate_resource(bad)
    assert any("code" in p and p.startswith("schema") for p in problems)
    assert any("code" in p and p.startswith("fhir.resources") for p in problems)


def test_bundle_entries_validated_individually():
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": "urn:uuid:1", "resource": GOOD_OBS}, {"fullUrl": "urn:uuid:2", "resource": dict(GOOD_OBS, status="x")}],
    }
    problems = v.validate_resource(bundle)
    assert any(p.startswith("entry[1] schema $.status") for p in problems), problems
    assert not any(p.startswith("entry[0]") for p in problems)
    bundle["type"] = "not-a-type"
    assert any("$.type" in p for p in v.validate_resource(bundle))


def test_not_a_resource():
    assert v.validate_resource({"id": "x"}) == ["not a FHIR resource: no resourceType"]
    assert "unknown resourceType" in v.validate_resource({"resourceType": "Nonsense"})[-1]


def test_check_resource_names_the_resource():
    with pytest.raises(ValidationError) as err:
        v.check_resource(dict(GOOD_OBS, status="x"))
    assert "Observation/o1" in str(err.value)


def test_missing_schema_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(v.SCHEMA_ENV, str(tmp_path / "nope.json"))
    v._definitions.cache_clear()
    v._schema_validator.cache_clear()
    try:
        with pytest.raises(ValidationError) as err:
            v.validate_resource(GOOD_OBS)
        assert v.SCHEMA_ENV in str(err.value) and "nope.json" in str(err.value)
    finally:
        monkeypatch.delenv(v.SCHEMA_ENV)
        v._definitions.cache_clear()
        v._schema_validator.cache_clear()


@pytest.mark.shared
def test_real_cohort_resources_validate(shared_data):
    # The third-party Synthea cohort is valid R4: the validators must not reject real-world shapes.
    for rtype in ("Patient", "Condition", "Observation", "Encounter"):
        with gzip.open(shared_data / "us" / "ndjson" / f"{rtype}.ndjson.gz", "rt") as fh:
            for i, line in enumerate(fh):
                if i >= 50:
                    break
                res = json.loads(line)
                assert v.validate_resource(res) == [], (rtype, res["id"])
