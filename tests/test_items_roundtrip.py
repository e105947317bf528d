"""Issue 18, both halves together: timelines with medication, immunization, procedure and allergy events ->
assembler -> every export format -> ingest gives back the same items (code, times, category, reason, criticality,
encounter link, status). A status the timeline leaves open (None) comes back as the assembler's default.

Skips while the ingest mappings do not map the new types (the input half is built on its own branch)."""

from __future__ import annotations

from collections import Counter

import pytest

from fhirsynth.export.writer import write_export
from fhirsynth.mapping import load_mapping
from fhirsynth.timeline import adapter
from fhirsynth.timeline.assembler import GeneratorInfo
from fhirsynth.timeline.io import read_timelines
from item_timelines import ITEM_KINDS, item_timelines

GEN = GeneratorInfo(model_hash="ef" * 32, epsilon=8.0, delta=1e-5, recorded="2026-03-04T05:06:07+00:00")
TYPES = {"us-core": ("MedicationRequest", "Immunization", "Procedure", "AllergyIntolerance"),
         "ips": ("MedicationStatement", "Immunization", "Procedure", "AllergyIntolerance")}


def _default_status(kind: str, ended: bool) -> str:
    if kind == "medication":
        return "completed" if ended else "active"  # a course with an end is over
    return "active" if kind == "allergy" else "completed"


def _items(timelines) -> Counter:
    return Counter((e.kind, e.system, e.code, e.time, e.end_time, e.category, e.value_system, e.value_code,
                    e.encounter_id is not None,
                    e.status if e.status is not None else _default_status(e.kind, e.end_time is not None))
                   for tl in timelines for e in tl.events if e.kind in ITEM_KINDS)


@pytest.mark.parametrize("profile,fmt", [("us-core", "ndjson"), ("us-core", "transaction"), ("ips", "ndjson"),
                                         ("ips", "document")])
def test_items_survive_assembly_and_ingest(tmp_path, profile, fmt):
    mapped = load_mapping(profile).resources
    if not all(t in mapped for t in TYPES[profile]):
        pytest.skip(f"the {profile} mapping does not map {', '.join(t for t in TYPES[profile] if t not in mapped)} yet")
    timelines = item_timelines(20, seed=7, visits=5)
    write_export(iter(timelines), tmp_path / "x", fmt=fmt, profile=profile, seed=9, generator=GEN)
    adapter.ingest([tmp_path / "x"], tmp_path / "tl", mapping=profile)
    back = list(read_timelines(tmp_path / "tl"))
    sent, got = _items(timelines), _items(back)
    assert sum(sent.values()) >= 100
    assert got == sent, (list((sent - got).items())[:3], list((got - sent).items())[:3])
