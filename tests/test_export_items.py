"""Issue 18 through `generate`'s writers and `load`: the new types in NDJSON, transaction, collection and document
exports (valid, counted in the manifest, references resolving in order), and loaded into a real FHIR server
(Medplum's router with strict validation, tests/medplum/server.mjs) in client, server and conditional id modes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fhirsynth.cli import main
from fhirsynth.export.bundles import iter_references
from fhirsynth.export.writer import write_export
from fhirsynth.fhir.validate import validate_resource
from fhirsynth.timeline.assembler import GeneratorInfo
from item_timelines import item_timelines
from test_load_medplum import _counts, _resolving, medplum, medplum_node, medplum_user  # noqa: F401 (fixtures)

GEN = GeneratorInfo(model_hash="ab" * 32, epsilon=8.0, delta=1e-5, recorded="2026-03-04T05:06:07+00:00")
ITEMS = {"us-core": ("MedicationRequest", "Immunization", "Procedure", "AllergyIntolerance"),
         "ips": ("MedicationStatement", "Immunization", "Procedure", "AllergyIntolerance")}


def _manifest_counts(out: Path) -> dict[str, int]:
    return json.loads((out / "manifest.json").read_text())["extension"]["fhirsynth"]["resources"]


@pytest.mark.parametrize("profile", ["us-core", "ips"])
@pytest.mark.parametrize("fmt", ["ndjson", "transaction", "collection", "document"])
def test_every_format_writes_the_items_valid_and_resolving(tmp_path, profile, fmt):
    out = tmp_path / fmt
    timelines = item_timelines(12, seed=41, visits=5, edge_cases=True)
    kinds = Counter(e.kind for tl in timelines for e in tl.events)
    write_export(iter(timelines), out, fmt=fmt, profile=profile, seed=43, generator=GEN, validate=True)
    counts = _manifest_counts(out)
    assert counts[ITEMS[profile][0]] == kinds["medication"]
    assert counts["Immunization"] == kinds["immunization"] and counts["Procedure"] == kinds["procedure"]
    assert counts["AllergyIntolerance"] == kinds["allergy"] > 0
    if fmt == "ndjson":
        for rtype in ITEMS[profile]:
            lines = [json.loads(x) for x in (out / f"{rtype}.ndjson").read_text().splitlines()]
            assert len(lines) == counts[rtype]
        return
    bundles = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "manifest.json"]
    assert len(bundles) == 12
    for b in bundles:
        assert validate_resource(b) == []
        pos = {e["fullUrl"]: i for i, e in enumerate(b["entry"])}
        for i, e in enumerate(b["entry"]):
            for ref in iter_references(e["resource"]):
                assert ref in pos, ref  # every reference rewritten to an entry of the Bundle
                if fmt == "transaction" and e["resource"]["resourceType"] != "Provenance":
                    assert pos[ref] < i, (e["resource"]["resourceType"], ref)  # what is referenced comes first


@pytest.mark.parametrize("fmt,profile", [("transaction", "us-core"), ("ndjson", "us-core"), ("document", "ips"),
                                         ("ndjson", "ips")])
def test_items_load_into_medplum_with_client_ids(medplum, tmp_path, fmt, profile):  # noqa: F811
    out = tmp_path / fmt
    write_export(iter(item_timelines(8, seed=51, visits=5)), out, fmt=fmt, profile=profile, seed=53, generator=GEN)
    expected = _manifest_counts(out)
    assert all(expected.get(t, 0) > 0 for t in ITEMS[profile]), expected
    assert main(["load", str(out), "--url", medplum, "--max-entries", "50"]) == 0
    types = [t for t in expected if t not in ("Composition", "Device")] if fmt == "document" else list(expected)
    assert _counts(medplum, types) == {t: expected[t] for t in types}
    stored = _resolving(medplum, types)
    assert any("reasonReference" in r for r in stored.values())  # reasons point at stored Conditions


@pytest.mark.parametrize("ids", ["server", "conditional"])
def test_items_load_with_server_assigned_ids(medplum_user, tmp_path, ids):  # noqa: F811
    out = tmp_path / ids
    write_export(iter(item_timelines(6, seed=61, visits=5)), out, fmt="transaction", profile="us-core", seed=63,
                 generator=GEN)
    expected = _manifest_counts(out)
    assert main(["load", str(out), "--url", medplum_user, "--ids", ids]) == 0
    assert _counts(medplum_user, expected) == expected
    stored = _resolving(medplum_user, expected)
    reasons = [r["reasonReference"][0]["reference"] for r in stored.values() if "reasonReference" in r]
    assert reasons and all(ref.startswith("Condition/") and ref in stored for ref in reasons)


def test_ndjson_stages_put_items_after_what_they_reference():
    from fhirsynth.export.ndjson_source import dependency_rank

    for rtype in ("MedicationRequest", "MedicationStatement", "Procedure"):  # reasonReference -> Condition
        assert dependency_rank(rtype) > dependency_rank("Condition") > dependency_rank("Encounter")
    for rtype in ("MedicationRequest", "MedicationStatement", "Procedure", "Immunization", "AllergyIntolerance"):
        assert dependency_rank("Encounter") < dependency_rank(rtype) < dependency_rank("Provenance")
