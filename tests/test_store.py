"""The SQLite store: loading export dirs, refusing unmarked data, date ranges, index-backed queries."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import orjson
import pytest

from fhirsynth.errors import StoreError
from fhirsynth.store.dates import DateFormatError, date_range, period_range
from fhirsynth.store.loader import build_store, export_files, load_export_dir
from fhirsynth.store.params import PARAMS, is_synthetic, parse_reference
from fhirsynth.store.query import Clause, SearchError, compile_clause
from fhirsynth.store.sqlite import Store

HTEST = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HTEST"}


@pytest.fixture(scope="module")
def export_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "server" / "export"


def fixture_resources(export_dir: Path) -> list[dict]:
    out = []
    for f in export_files(export_dir):
        raw = gzip.decompress(f.read_bytes()) if f.name.endswith(".gz") else f.read_bytes()
        out += [json.loads(line) for line in raw.splitlines() if line.strip()]
    return out


def test_date_ranges_follow_precision():
    lo, hi = date_range("2019")
    assert hi - lo == 365 * 86400
    lo, hi = date_range("2020-02")
    assert hi - lo == 29 * 86400  # leap year
    lo, hi = date_range("2020-02-03")
    assert hi - lo == 86400
    lo, hi = date_range("2020-02-03T10:00:00+02:00")
    assert lo == date_range("2020-02-03T08:00:00Z")[0] and hi - lo == 1
    lo, hi = date_range("2020-02-03T10:00:00.25Z")
    assert hi - lo == pytest.approx(0.01)
    assert period_range({"start": "2020-01-01"})[1] > date_range("2999")[0]
    for bad in ("2020-13", "20", "2020-02-30", "yesterday"):
        with pytest.raises(DateFormatError):
            date_range(bad)


def test_reference_parsing():
    assert parse_reference({"reference": "Patient/1"}) == ("Patient", "1")
    assert parse_reference("http://x/fhir/Patient/1/_history/3") == ("Patient", "1")
    assert parse_reference("urn:uuid:abc") is None
    assert parse_reference("#contained") is None


def test_load_counts_match_manifest_and_group_all(tmp_path: Path, export_dir: Path):
    store, summary = build_store(export_dir, tmp_path / "s.db")
    manifest = json.loads((export_dir / "manifest.json").read_text())
    expected = {o["type"]: o["count"] for o in manifest["output"]}
    assert summary["loaded"] == expected
    counts = store.counts()
    assert {k: v for k, v in counts.items() if k != "Group"} == expected
    group = orjson.loads(store.read("Group", "all"))
    assert group["quantity"] == expected["Patient"] and is_synthetic(group)
    assert len(group["member"]) == expected["Patient"]
    # stored bytes are the resource (plus lastUpdated/versionId), served without re-serialising
    p = orjson.loads(store.read("Patient", "p00"))
    assert p["gender"] == "female" and p["meta"]["versionId"] == "1" and "lastUpdated" in p["meta"]
    assert not list(tmp_path.glob(".*tmp*")), "temp build file left behind"
    store.close()


def test_refuses_unmarked_resource_and_leaves_nothing(tmp_path: Path, fixtures_dir: Path):
    db = tmp_path / "s.db"
    with pytest.raises(StoreError) as exc:
        build_store(fixtures_dir / "server" / "untagged", db)
    msg = str(exc.value)
    assert "Patient/real-person" in msg and "Patient.ndjson:2" in msg and "HTEST" in msg
    assert not db.exists() and not list(tmp_path.iterdir())


def test_refusal_rolls_back_whole_load(tmp_path: Path):
    store = Store(tmp_path / "s.db")
    good = {"resourceType": "Patient", "id": "a", "meta": {"tag": [HTEST]}}
    with pytest.raises(StoreError, match="Patient/b"):
        store.add([good, {"resourceType": "Patient", "id": "b", "meta": {"tag": [{"code": "HTEST"}]}}])
    assert store.read("Patient", "a") is None
    with pytest.raises(StoreError, match="duplicate resource Patient/a"):
        store.add([good, dict(good)])
    store.add([dict(good, meta={"tag": [HTEST]})])
    assert store.read("Patient", "a") is not None
    assert orjson.loads(store.read("Group", "all"))["quantity"] == 1
    store.close()


def test_glob_fallback_skips_unserved_types_with_reason(tmp_path: Path, export_dir: Path):
    d = tmp_path / "exp"
    d.mkdir()
    shutil.copy(export_dir / "Patient.ndjson", d / "Patient.ndjson")
    org = {"resourceType": "Organization", "id": "o1", "meta": {"security": [HTEST]}}
    (d / "Organization.ndjson").write_text(json.dumps(org) + "\n")
    with gzip.open(d / "Encounter.ndjson.gz", "wt") as fh:
        fh.write((export_dir / "Encounter.ndjson").read_text())
    store = Store(tmp_path / "s.db")
    summary = load_export_dir(store, d)
    assert summary["loaded"] == {"Patient": 12, "Encounter": 36}
    assert summary["skipped"] == {"Organization: type not served": 1}
    store.close()


def test_bad_inputs_name_file_and_line(tmp_path: Path):
    d = tmp_path / "exp"
    d.mkdir()
    (d / "Patient.ndjson").write_text('{"resourceType":"Patient","id":"x","meta":{"tag":[%s]}}\n{oops\n'
                                      % json.dumps(HTEST))
    store = Store(tmp_path / "s.db")
    with pytest.raises(StoreError, match=r"Patient.ndjson:2: invalid JSON"):
        load_export_dir(store, d)
    (d / "manifest.json").write_text(json.dumps({"output": [{"type": "Patient", "url": "Missing.ndjson"}]}))
    with pytest.raises(StoreError, match="Missing.ndjson"):
        load_export_dir(store, d)
    with pytest.raises(StoreError, match="does not exist"):
        load_export_dir(store, tmp_path / "nope")
    store.close()


def test_store_rejects_database_from_other_layout(tmp_path: Path):
    Store(tmp_path / "s.db").close()
    import sqlite3

    con = sqlite3.connect(tmp_path / "s.db")
    con.execute("UPDATE meta SET value='x' WHERE key='params'")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="another fhirsynth version"):
        Store(tmp_path / "s.db")


def _ids(store: Store, rtype: str, *clauses: Clause) -> set[str]:
    where, args = ["r.type = ?"], [rtype]
    for c in clauses:
        sql, a = compile_clause(c)
        where.append(sql)
        args += a
    return {r[0] for r in store.query(f"SELECT r.id FROM resources r WHERE {' AND '.join(where)}", args)}


def test_compiled_clauses_against_fixture(tmp_path: Path, export_dir: Path):
    store, _ = build_store(export_dir, tmp_path / "s.db")
    res = fixture_resources(export_dir)
    obs = [r for r in res if r["resourceType"] == "Observation"]
    P = PARAMS["Observation"]
    # quantity with implicit precision and units
    glucose = {o["id"]: o["valueQuantity"]["value"] for o in obs if "valueQuantity" in o}
    v = sorted(glucose.values())[3]
    assert _ids(store, "Observation", Clause("value-quantity", P["value-quantity"], None, [f"gt{v}"])) == \
        {i for i, x in glucose.items() if x > v}
    assert _ids(store, "Observation", Clause("value-quantity", P["value-quantity"], None,
                                             [f"le{v}|http://unitsofmeasure.org|mg/dL"])) == \
        {i for i, x in glucose.items() if x <= v}
    assert _ids(store, "Observation", Clause("value-quantity", P["value-quantity"], None, [f"le{v}||mmol/L"])) == set()
    comp = {o["id"] for o in obs if any(c["valueQuantity"]["value"] >= 140 for c in o.get("component", []))}
    assert _ids(store, "Observation", Clause("combo-value-quantity", P["combo-value-quantity"], None,
                                             ["ge140"])) == comp | {i for i, x in glucose.items() if x >= 140}
    with pytest.raises(SearchError):
        compile_clause(Clause("value-quantity", P["value-quantity"], None, ["gtabc"]))
    with pytest.raises(SearchError):
        compile_clause(Clause("value-quantity", P["value-quantity"], None, ["5|mg"]))
    store.close()


def test_database_is_a_wal_file_with_indexes(tmp_path: Path, export_dir: Path):
    import sqlite3

    store, _ = build_store(export_dir, tmp_path / "s.db")
    store.close()
    con = sqlite3.connect(tmp_path / "s.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"resources_type_id", "idx_token_code", "idx_date_lo", "idx_reference_ref", "idx_string_norm"} <= names
    # the planner drives a patient search from the reference index, not a scan of the type
    plan = " ".join(str(r) for r in con.execute(
        "EXPLAIN QUERY PLAN SELECT r.body FROM resources r WHERE +r.type = 'Observation' AND +r.rid <= 1e9 AND "
        "r.rid IN (SELECT rid FROM idx_reference WHERE pid = ? AND ref_id = 'p01') ORDER BY r.rid LIMIT 51",
        (PARAMS["Observation"]["patient"].pid,)))
    assert "idx_reference_ref" in plan and "PRIMARY KEY" in plan
    con.close()


def test_refuses_non_fhir_ids(tmp_path: Path):
    store = Store(tmp_path / "s.db")
    for bad in ("", 'a"b', "x" * 65, "a/b", None):
        with pytest.raises(StoreError, match="not a FHIR id"):
            store.add([{"resourceType": "Patient", "id": bad, "meta": {"tag": [HTEST]}}])
    store.close()


def _index_names(path: Path) -> set[str]:
    import sqlite3

    con = sqlite3.connect(path)
    try:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='index' AND sql IS NOT NULL")}
    finally:
        con.close()


def test_bulk_load_builds_every_index_and_a_failed_one_keeps_them(tmp_path: Path, export_dir: Path):
    """A bulk load into an empty store drops the secondary indexes and builds them before COMMIT: the result has
    every index, and a refused load (rolled back) leaves the empty store with every index too."""
    from fhirsynth.store.sqlite import _SECONDARY_INDEXES

    all_indexes = {"resources_type_id", *_SECONDARY_INDEXES}
    store, _ = build_store(export_dir, tmp_path / "s.db")
    store.close()
    assert _index_names(tmp_path / "s.db") == all_indexes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.db"], "journal or temp file left behind"

    d = tmp_path / "bad"
    d.mkdir()
    (d / "Patient.ndjson").write_bytes((export_dir / "Patient.ndjson").read_bytes() + b"{oops\n")
    store = Store(tmp_path / "fresh.db")
    with pytest.raises(StoreError, match=r"Patient.ndjson:13: invalid JSON"):
        load_export_dir(store, d)
    assert store.counts() == {} and not store._deferred
    store.close()
    assert _index_names(tmp_path / "fresh.db") == all_indexes


def test_rebuild_removes_a_killed_builds_temp_files(tmp_path: Path, export_dir: Path):
    """A build killed mid-load leaves .NAME.PID.tmp plus its rollback journal (or WAL); the next build deletes them."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    pid = int(dead.stdout)
    for suffix in ("", "-journal", "-wal", "-shm"):
        (tmp_path / f".s.db.{pid}.tmp{suffix}").write_bytes(b"x")
    store, _ = build_store(export_dir, tmp_path / "s.db")
    store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.db"]
