"""Ingest of shapes other EHR exports use (fixtures/ingest/other-generators): each line's fate is asserted."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fhirsynth.timeline.adapter import ingest


@pytest.fixture(scope="module")
def result(fixtures_dir: Path, tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("odd")
    report = ingest([fixtures_dir / "ingest" / "other-generators" / "ehr-quirks.ndjson"], out, mapping="us-core")
    events = pq.read_table(out / "events.parquet").to_pylist()
    return report, {e["source_id"]: e for e in events}


def test_nothing_lost(result) -> None:
    report, _ = result
    for rtype, counts in report["resource_types"].items():
        assert counts["read"] == counts["used"] + counts["skipped"], rtype
    assert report["totals"] == {"read": 15, "used": 10, "skipped": 5}


def test_value_choices(result) -> None:
    _, ev = result
    assert ev["Observation/o3"]["value"] == 170.0  # valueInteger
    assert ev["Observation/o7"]["value_display"] == "true"  # valueBoolean
    assert ev["Observation/o1"]["value_code"] == "266919005"  # valueCodeableConcept
    assert ev["Observation/o2"]["unit"] == "/min"
    assert ev["Observation/o4"]["value"] is None  # dataAbsentReason: the event stays, without a value


def test_references_and_times(result) -> None:
    _, ev = result
    # absolute URL and versioned references join their Patient
    assert ev["Observation/o1"]["patient_id"] == "p1" and ev["Observation/o2"]["patient_id"] == "p1"
    # effectiveInstant with an offset lands in UTC
    assert ev["Observation/o1"]["time"].isoformat().startswith("2020-01-01T08:00:00.123")
    assert ev["Observation/o6"]["time"].isoformat().startswith("2020-03-01")  # issued only
    assert ev["Encounter/e2"]["time"].hour == 13  # -05:00 -> UTC


def test_code_preference_and_skips(result) -> None:
    report, ev = result
    assert ev["Condition/c1"]["system"] == "http://snomed.info/sct"  # preferred over ICD-10-CM
    assert ev["Condition/c1"]["time"].isoformat().startswith("2021-05-05")  # onsetAge -> recordedDate
    skipped = {k: v["count"] for k, v in report["skipped"].items()}
    assert skipped == {"no_code": 1, "no_usable_time": 2, "status_excluded": 1, "subject_not_found": 1}
    where = [ex["where"] for v in report["skipped"].values() for ex in v["examples"]]
    assert all(w.rsplit("/", 1)[-1].startswith("ehr-quirks.ndjson:") for w in where), where


def test_a_non_numeric_quantity_value_is_counted_not_silently_dropped(tmp_path: Path) -> None:
    src = tmp_path / "nan.ndjson"
    src.write_text(
        '{"resourceType":"Patient","id":"p","gender":"male","birthDate":"1970-01-01"}\n'
        '{"resourceType":"Observation","id":"o1","status":"final","code":{"coding":[{"system":"http://loinc.org",'
        '"code":"8867-4"}]},"subject":{"reference":"Patient/p"},"effectiveDateTime":"2020-01-01",'
        '"valueQuantity":{"value":"NaN","unit":"/min"}}\n'
        '{"resourceType":"Observation","id":"o2","status":"final","code":{"coding":[{"system":"http://loinc.org",'
        '"code":"8867-4"}]},"subject":{"reference":"Patient/p"},"effectiveDateTime":"2020-01-02",'
        '"valueQuantity":{"value":61,"unit":"/min"}}\n'
    )
    report = ingest([src], tmp_path / "out", mapping="us-core")
    assert report["values_dropped"] == 1
    values = {e["source_id"]: e["value"] for e in pq.read_table(tmp_path / "out" / "events.parquet").to_pylist()}
    assert values == {"Observation/o1": None, "Observation/o2": 61.0}
