"""Round trip FHIR -> ingest -> assemble -> ingest: the same timelines for every mapped field.

Ids are the only thing allowed to change (assembly makes new ones): patients are matched by assembly index and
encounter links are compared through the linked encounter's content, not its id.
"""

from __future__ import annotations

import gzip
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

from fhirsynth.export.writer import write_export
from fhirsynth.timeline.assembler import GeneratorInfo, patient_uuid
from fhirsynth.timeline.io import read_timelines
from fhirsynth.timeline.samples import random_timelines

from fhirsynth.timeline import adapter  # noqa: E402

GEN = GeneratorInfo(model_hash="ef" * 32, epsilon=8.0, delta=1e-5, recorded="2026-03-04T05:06:07+00:00")
SEED = 5
_IDS = ("encounter_id", "source_id")


def _normalized(tl) -> list[tuple]:
    enc = {e.encounter_id: (e.time, e.code, e.value_code) for e in tl.events if e.kind == "encounter"}
    rows = []
    for e in tl.events:
        d = asdict(e)
        link = enc.get(d.pop("encounter_id"), "no encounter")
        d.pop("source_id")
        rows.append((repr(link), *(repr(v) for v in d.values())))
    return sorted(rows)


def _round_trip(first_input: list[Path], tmp: Path, mapping: str, profile: str, fmt: str = "ndjson"):
    t1_dir, export, t2_dir = tmp / "t1", tmp / "export", tmp / "t2"
    adapter.ingest(first_input, t1_dir, mapping=mapping)
    t1 = list(read_timelines(t1_dir))
    write_export(iter(t1), export, fmt=fmt, profile=profile, seed=SEED, generator=GEN)
    report = adapter.ingest([export], t2_dir, mapping=mapping)
    t2 = {tl.patient.patient_id: tl for tl in read_timelines(t2_dir)}
    assert len(t2) == len(t1)
    for index, a in enumerate(t1):
        b = t2[str(patient_uuid(SEED, index))]
        pa_, pb = asdict(a.patient), asdict(b.patient)
        pa_.pop("patient_id"), pb.pop("patient_id")
        assert pa_ == pb, index
        assert _normalized(a) == _normalized(b), index
    return t1, report


def test_round_trip_own_export(tmp_path):
    # FHIR input = an NDJSON export of edge-case timelines (partial dates, odd statuses, orphan events, ...)
    src = tmp_path / "src"
    write_export(random_timelines(15, seed=21, edge_cases=True), src, generator=GEN)
    t1, report = _round_trip([src], tmp_path / "us", "us-core", "us-core")
    assert sum(len(t.events) for t in t1) > 500
    # the only skipped inputs are the Provenance resources, counted, not silently lost
    assert set(report["skipped"]) <= {"unmapped_type"}


@pytest.mark.parametrize("fmt", ["transaction", "document"])
def test_round_trip_through_bundles(tmp_path, fmt):
    src = tmp_path / "src"
    write_export(random_timelines(6, seed=22, edge_cases=True), src, generator=GEN)
    profile = "us-core" if fmt == "transaction" else "ips"  # IPS has no race/ethnicity: ingest with its mapping
    _round_trip([src], tmp_path / fmt, profile, profile, fmt=fmt)


@pytest.mark.shared
def test_round_trip_real_synthea_bundles(shared_data, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for path in sorted((shared_data / "us" / "bundles").glob("*.json.gz"))[:3]:
        (src / path.name[:-3]).write_bytes(gzip.decompress(path.read_bytes()))
    t1, _ = _round_trip([src], tmp_path / "rt", "us-core", "us-core")
    assert sum(len(t.events) for t in t1) > 100


@pytest.mark.shared
def test_round_trip_real_ips_documents(shared_data, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for path in sorted((shared_data / "es-ips" / "bundles").glob("*.json.gz"))[:2]:
        shutil.copy(path, src / path.name)
    t1, _ = _round_trip([src], tmp_path / "rt", "ips", "ips", fmt="document")
    assert sum(len(t.events) for t in t1) > 100
