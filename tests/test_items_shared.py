"""Issue 18 on the shared us-full cohort (Synthea, RxNorm / CVX / SNOMED CT codes): real patients' medications,
immunizations, procedures and allergies, through ingest and the assembler, are valid FHIR (both validators) and,
as IPS, hold the IPS profiles they claim (Medplum's validator, as in test_profile_validation.py); IPS documents
list them in their sections.

Skips without ../shared/data, and while the ingest mappings do not map the new types (the input half)."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from fhirsynth.export.writer import write_export
from fhirsynth.fhir.validate import validate_resource
from fhirsynth.mapping import load_mapping
from fhirsynth.timeline import adapter
from fhirsynth.timeline.assembler import GeneratorInfo
from fhirsynth.timeline.io import read_timelines
from test_profile_validation import _errors, validate, validator_limits  # noqa: F401 (fixtures)

GEN = GeneratorInfo(model_hash="ef" * 32, epsilon=8.0, delta=1e-5, recorded="2026-03-04T05:06:07+00:00")
N_PATIENTS = 25
# Observations are left out: the items link to Encounters and Conditions, and Observations are most of the bytes
TYPES = ("Patient", "Encounter", "Condition", "MedicationRequest", "Immunization", "Procedure", "AllergyIntolerance")
ITEMS = {"us-core": ("MedicationRequest", "Immunization", "Procedure", "AllergyIntolerance"),
         "ips": ("MedicationStatement", "Immunization", "Procedure", "AllergyIntolerance")}


def _owner(r: dict) -> str | None:
    ref = (r.get("subject") or r.get("patient") or {}).get("reference", "")
    return ref.rsplit("/", 1)[-1] or None


@pytest.fixture(scope="module")
def timelines(shared_data, tmp_path_factory) -> Path:
    if not all(t in load_mapping("us-core").resources for t in ITEMS["us-core"]):
        pytest.skip("the us-core mapping does not map the issue-18 types yet")
    src_dir = shared_data / "us-full" / "ndjson"
    if not (src_dir / "MedicationRequest.ndjson.gz").is_file():
        pytest.skip(f"{src_dir} is not there")
    # the first N patients of the cohort, with every resource of theirs of the types above
    src = tmp_path_factory.mktemp("usfull")
    keep: set[str] = set()
    for rtype in TYPES:
        with gzip.open(src_dir / f"{rtype}.ndjson.gz", "rt") as fh, (src / f"{rtype}.ndjson").open("w") as out:
            for line in fh:
                r = json.loads(line)
                if rtype == "Patient":
                    if len(keep) >= N_PATIENTS:
                        continue
                    keep.add(r["id"])
                elif _owner(r) not in keep:
                    continue
                out.write(line)
    out = tmp_path_factory.mktemp("usfull-tl")
    adapter.ingest([src], out, mapping="us-core")
    return out


@pytest.mark.shared
def test_real_items_reassembled_are_valid_us_core(timelines, tmp_path):
    events = Counter(e.kind for tl in read_timelines(timelines) for e in tl.events)
    write_export(iter(read_timelines(timelines)), tmp_path / "us", fmt="ndjson", profile="us-core", seed=3,
                 generator=GEN)
    counts = Counter()
    failures = []
    for rtype in ITEMS["us-core"]:
        for line in (tmp_path / "us" / f"{rtype}.ndjson").read_text().splitlines():
            r = json.loads(line)
            counts[rtype] += 1
            failures += [(rtype, r["id"], p) for p in validate_resource(r)]
    assert counts["MedicationRequest"] == events["medication"] > 0
    assert counts["Immunization"] == events["immunization"] > 0 and counts["Procedure"] == events["procedure"] > 0
    assert counts["AllergyIntolerance"] == events["allergy"]
    assert failures == [], failures[:5]


@pytest.mark.shared
def test_real_items_as_ips_documents_hold_their_profiles(timelines, validate, validator_limits, tmp_path):  # noqa: F811
    write_export(iter(read_timelines(timelines)), tmp_path / "doc", fmt="document", profile="ips", seed=5,
                 generator=GEN)
    files = [p for p in (tmp_path / "doc").glob("*.json") if p.name != "manifest.json"]
    with_meds = 0
    for p in files:
        doc = json.loads(p.read_text())
        types = Counter(e["resource"]["resourceType"] for e in doc["entry"])
        sections = {s["code"]["coding"][0]["code"]: s for s in doc["entry"][0]["resource"]["section"]}
        assert len(sections["10160-0"].get("entry", [])) == types["MedicationStatement"]
        assert len(sections["48765-2"].get("entry", [])) == types["AllergyIntolerance"]
        assert ("emptyReason" in sections["10160-0"]) == (types["MedicationStatement"] == 0)
        with_meds += types["MedicationStatement"] > 0
    assert with_meds >= N_PATIENTS // 2
    report = validate(files)
    assert not report["unknown"], report["unknown"]
    checked = {k.rsplit("/", 1)[1]: n for k, n in report["checked"].items()}
    assert all(checked.get(f"{t}-uv-ips", 0) > 0 for t in ITEMS["ips"] if t != "AllergyIntolerance"), checked
    errors = _errors(report, validator_limits)
    assert not errors, Counter((e["profile"].rsplit("/", 1)[1], e["text"], e["expression"]) for e in errors)
