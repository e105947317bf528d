"""Exports: NDJSON bulk layout, transaction / collection / document Bundles, atomic writes, gzip."""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from fhirsynth.errors import ExportError, UsageError
from fhirsynth.export.atomic import AtomicWriter, write_atomic
from fhirsynth.export.bundles import iter_references
from fhirsynth.export.writer import MANIFEST, read_manifest, write_export
from fhirsynth.fhir.validate import validate_resource
from fhirsynth.timeline.assembler import HTEST, GeneratorInfo
from fhirsynth.timeline.samples import random_timelines

GEN = GeneratorInfo(model_hash="ab" * 32, epsilon=8.0, delta=1e-5, recorded="2026-03-04T05:06:07+00:00")


def _read_json(path: Path):
    data = path.read_bytes()
    return json.loads(gzip.decompress(data) if path.name.endswith(".gz") else data)


def _read_ndjson(path: Path) -> list[dict]:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return [json.loads(line) for line in data.splitlines() if line]


def _visible(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if not p.name.startswith("."))


def test_ndjson_layout_manifest_and_integrity(tmp_path):
    out = tmp_path / "exp"
    summary = write_export(random_timelines(12, seed=1, edge_cases=True), out, generator=GEN, seed=3)
    manifest = read_manifest(out)
    assert manifest["requiresAccessToken"] is False and manifest["error"] == []
    assert manifest["transactionTime"] == GEN.recorded
    assert manifest["output"][0]["type"] == "Patient"
    assert _visible(out) == sorted([o["url"] for o in manifest["output"]] + [MANIFEST])
    everything: list[dict] = []
    for o in manifest["output"]:
        rows = _read_ndjson(out / o["url"])
        assert len(rows) == o["count"] and all(r["resourceType"] == o["type"] for r in rows)
        everything += rows
    assert summary["patients"] == 12 and Counter(r["resourceType"] for r in everything) == summary["resources"]
    ids = {f"{r['resourceType']}/{r['id']}" for r in everything}
    for r in everything:
        assert HTEST in r["meta"]["security"]
        for ref in iter_references(r):
            assert ref in ids, ref  # Type/id references, all resolvable within the export
    assert manifest["extension"]["fhirsynth"]["model_hash"] == GEN.model_hash


def test_ndjson_split_and_gzip(tmp_path):
    out = tmp_path / "exp"
    write_export(random_timelines(6, seed=2), out, generator=GEN, gzip=True, max_file_bytes=40_000)
    manifest = read_manifest(out)
    obs = [o for o in manifest["output"] if o["type"] == "Observation"]
    assert len(obs) > 1 and [o["url"] for o in obs] == [f"Observation.{k}.ndjson.gz" for k in range(1, len(obs) + 1)]
    assert (out / "Patient.ndjson.gz").is_file()
    for o in obs:
        rows = _read_ndjson(out / o["url"])
        assert len(rows) == o["count"] > 0
    # split files stay near the limit (one patient's batch may overshoot it once)
    assert all(len(gzip.decompress((out / o["url"]).read_bytes())) < 40_000 + 200_000 for o in obs)


def test_same_seed_same_bytes(tmp_path):
    for d in ("a", "b"):
        write_export(random_timelines(4, seed=5), tmp_path / d, generator=GEN, seed=9)
    for name in _visible(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.parametrize("fmt", ["transaction", "collection", "document"])
def test_bundle_formats_valid_and_self_contained(tmp_path, fmt):
    out = tmp_path / fmt
    profile = "ips" if fmt == "document" else "us-core"
    summary = write_export(random_timelines(5, seed=6, edge_cases=True), out, fmt=fmt, profile=profile, generator=GEN)
    manifest = read_manifest(out)
    assert len(manifest["output"]) == 5 == summary["files"]
    for o in manifest["output"]:
        bundle = _read_json(out / o["url"])
        assert bundle["type"] == fmt
        assert validate_resource(bundle) == []
        full_urls = [e["fullUrl"] for e in bundle["entry"]]
        assert len(set(full_urls)) == len(full_urls)
        assert all(u.startswith("urn:uuid:") and u[9:] == e["resource"]["id"] for u, e in zip(full_urls, bundle["entry"]))
        for e in bundle["entry"]:
            assert HTEST in e["resource"]["meta"]["security"]
            for ref in iter_references(e["resource"]):
                assert ref in full_urls, ref  # every reference rewritten to a fullUrl inside the Bundle
        types = [e["resource"]["resourceType"] for e in bundle["entry"]]
        if fmt == "transaction":
            assert types[0] == "Patient"
            for e in bundle["entry"]:
                r = e["resource"]
                assert e["request"] == {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}
            assert "?" not in json.dumps(bundle["entry"][0])  # no conditional references or URLs
        elif fmt == "document":
            assert types[:3] == ["Composition", "Patient", "Device"]
            assert bundle["identifier"]["value"].startswith("urn:uuid:") and bundle["timestamp"] == GEN.recorded
        else:
            assert types[0] == "Patient"


def test_document_sections(tmp_path):
    out = tmp_path / "doc"
    write_export(random_timelines(3, seed=8), out, fmt="document", profile="ips", generator=GEN)
    bundle = _read_json(out / read_manifest(out)["output"][0]["url"])
    comp = bundle["entry"][0]["resource"]
    assert comp["type"]["coding"][0]["code"] == "60591-5"
    assert comp["meta"]["profile"] == ["http://hl7.org/fhir/uv/ips/StructureDefinition/Composition-uv-ips"]
    sections = {s["code"]["coding"][0]["code"]: s for s in comp["section"]}
    assert {"11450-4", "10160-0", "48765-2", "30954-2", "8716-3"} <= set(sections)
    by_url = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
    for code, rtype in (("30954-2", "Observation"), ("8716-3", "Observation")):
        refs = [x["reference"] for x in sections[code]["entry"]]
        assert refs and all(by_url[u]["resourceType"] == rtype for u in refs)
    vital_cats = {by_url[x["reference"]]["category"][0]["coding"][0]["code"] for x in sections["8716-3"]["entry"]}
    assert vital_cats == {"vital-signs"}
    problems = [by_url[x["reference"]]["resourceType"] for x in sections["11450-4"].get("entry", [])]
    assert all(t == "Condition" for t in problems)
    for code in ("10160-0", "48765-2"):  # required by IPS, not generated: empty with a reason
        assert "entry" not in sections[code] and sections[code]["emptyReason"]["coding"][0]["code"] == "unavailable"
    assert comp["author"][0]["reference"] in by_url


def test_interrupted_export_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "exp"

    def dying():
        yield from random_timelines(3, seed=1)
        raise KeyboardInterrupt

    for fmt in ("ndjson", "transaction"):
        d = out / fmt
        with pytest.raises(KeyboardInterrupt):
            write_export(dying(), d, fmt=fmt, generator=GEN)
        assert not (d / MANIFEST).exists()
        if fmt == "ndjson":
            assert os.listdir(d) == []  # temp parts removed, nothing visible
        else:
            assert not [n for n in os.listdir(d) if n.startswith(".")]  # name spool removed too
            for name in _visible(d):  # finished bundles are whole files; the export has no manifest
                assert _read_json(d / name)["type"] == "transaction"
        with pytest.raises(ExportError):
            read_manifest(d)


def test_atomic_writer_never_exposes_partial_file(tmp_path):
    target = tmp_path / "x.ndjson"
    w = AtomicWriter(target)
    w.write(b"partial\n")
    assert not target.exists() and w.tmp.exists() and w.tmp.name.startswith(".")
    w.abort()
    assert not w.tmp.exists() and not target.exists()
    write_atomic(target, b"whole\n", gzip_output=False)
    assert target.read_bytes() == b"whole\n"
    assert [p.name for p in tmp_path.iterdir()] == ["x.ndjson"]


def test_rewrite_replaces_previous_export_and_refuses_foreign_dirs(tmp_path):
    out = tmp_path / "exp"
    write_export(random_timelines(3, seed=1), out, generator=GEN, max_file_bytes=20_000)
    split = {o["url"] for o in read_manifest(out)["output"]}
    write_export(random_timelines(3, seed=1), out, generator=GEN)  # same dir, no split: old parts removed
    now = {o["url"] for o in read_manifest(out)["output"]}
    assert split != now and _visible(out) == sorted(now | {MANIFEST})

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ExportError) as err:
        write_export(random_timelines(1), foreign, generator=GEN)
    assert "--force" in str(err.value)
    write_export(random_timelines(1), foreign, generator=GEN, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_bad_format_and_profile(tmp_path):
    with pytest.raises(UsageError, match="format"):
        write_export([], tmp_path / "a", fmt="csv", generator=GEN)
    with pytest.raises(UsageError, match="profile"):
        write_export([], tmp_path / "b", profile="uk-core", generator=GEN)


def test_validate_flag_checks_every_resource(tmp_path):
    summary = write_export(random_timelines(2, seed=3), tmp_path / "v", fmt="document", profile="ips",
                           generator=GEN, validate=True)
    assert summary["patients"] == 2


_MEMORY_PROBE = """
import random, sys, tracemalloc
from pathlib import Path
from fhirsynth.export.writer import write_export
from fhirsynth.timeline.assembler import GeneratorInfo
from fhirsynth.timeline.samples import random_timeline

fmt, out = sys.argv[1], Path(sys.argv[2])
gen = GeneratorInfo(model_hash="ab" * 32, epsilon=8.0, delta=1e-5, recorded="2026-03-04T05:06:07+00:00")

def stream(n):  # timelines made on the fly, as the sampler yields them
    rng = random.Random(1)
    for i in range(n):
        yield random_timeline(rng, f"p{i}", visits=3)

for n in (30, 240):
    tracemalloc.start()
    write_export(stream(n), out / f"{fmt}{n}", fmt=fmt, generator=gen)
    print(tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
"""


@pytest.mark.parametrize("fmt", ["ndjson", "transaction"])
def test_memory_does_not_grow_with_patients(tmp_path, fmt):
    """Peak traced memory of an export of 30 vs 240 streamed patients, in a fresh interpreter: tracemalloc
    counts every thread, and in the full suite other tests' server threads allocate while it traces."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, fmt, str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    peaks = [int(x) for x in run.stdout.split()]
    assert peaks[1] < peaks[0] * 1.5 + 200_000, peaks  # 8x the patients, about the same peak
