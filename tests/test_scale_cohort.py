"""The 10x cohort of benchmarks/bench_scale.py is FACTOR distinct copies of the 1x cohort, not duplicates:
ids and references are rewritten per copy, so ingest sees FACTOR times the patients and events, none skipped
as duplicates or orphans (otherwise the scale benchmark would measure dedup, not scale)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from bench_module import benchmark_module

from fhirsynth.timeline.adapter import ingest


def test_replicated_cohort_is_distinct_patients(fixtures_dir: Path, tmp_path: Path) -> None:
    bench = benchmark_module("bench_scale")
    counts = bench.make_cohort(fixtures_dir / "sample", 4, tmp_path / "cohort", 3)
    assert counts["Patient"] == 4 and counts["Observation"] > 100
    one = ingest([tmp_path / "cohort" / "x1"], tmp_path / "one")
    three = ingest([tmp_path / "cohort" / "x3"], tmp_path / "three")
    assert three["totals"]["read"] == 3 * one["totals"]["read"] == 3 * sum(counts.values())
    assert three["totals"]["used"] == 3 * one["totals"]["used"]
    for reason in ("duplicate_id", "subject_not_found"):
        assert three["skipped"].get(reason, {}).get("count", 0) == 3 * one["skipped"].get(reason, {}).get("count", 0)
    pids_one = set(pq.read_table(tmp_path / "one" / "patients.parquet").column("patient_id").to_pylist())
    pids_three = set(pq.read_table(tmp_path / "three" / "patients.parquet").column("patient_id").to_pylist())
    assert len(pids_one) == 4 and len(pids_three) == 12 and pids_one < pids_three
    ev_one = pq.read_table(tmp_path / "one" / "events.parquet")
    ev_three = pq.read_table(tmp_path / "three" / "events.parquet")
    assert ev_three.num_rows == 3 * ev_one.num_rows
    # every copy's events hang on that copy's patients (references were rewritten with the ids)
    assert set(ev_three.column("patient_id").to_pylist()) <= pids_three
    assert len(set(ev_three.column("source_id").to_pylist())) == 3 * len(set(ev_one.column("source_id").to_pylist()))
