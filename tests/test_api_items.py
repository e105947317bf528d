"""Issue 18 on the server: MedicationRequest, MedicationStatement, Immunization, Procedure and AllergyIntolerance
stored, searched with their R4 search parameters by a real client (fhirpy) over a real loopback server with paging,
included / revincluded with Patient and Encounter, in $everything and in bulk $export with _type.

Expected answers are counted from the exported NDJSON itself, not written down."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from fhirpy import SyncFHIRClient

from fhirsynth.api.app import create_app
from fhirsynth.api.settings import ServerSettings
from fhirsynth.export.writer import write_export
from fhirsynth.store.loader import build_store
from fhirsynth.timeline.assembler import GeneratorInfo
from item_timelines import item_timelines
from serverproc import running_server

GEN = GeneratorInfo(model_hash="ab" * 32, epsilon=8.0, delta=1e-5, recorded="2026-03-04T05:06:07+00:00")
ITEMS = ("MedicationRequest", "Immunization", "Procedure", "AllergyIntolerance")


def _ndjson(export: Path, rtype: str) -> list[dict]:
    path = export / f"{rtype}.ndjson"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("items") / "us"
    write_export(iter(item_timelines(30, seed=31, visits=6)), out, fmt="ndjson", profile="us-core", seed=5,
                 generator=GEN)
    return out


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    db = tmp_path_factory.mktemp("items-db") / "store.db"
    with running_server(["--data", export, "--db", db], dict(os.environ, FHIRSYNTH_PROGRESS="0")) as srv:
        yield srv.base


@pytest.fixture(scope="module")
def fhir(server) -> SyncFHIRClient:
    return SyncFHIRClient(server)


def test_each_new_type_pages_completely_with_fhirpy(fhir, export):
    for rtype in ITEMS:
        rows = _ndjson(export, rtype)
        assert len(rows) >= 15, (rtype, len(rows))
        assert fhir.resources(rtype).count() == len(rows)
        got = fhir.resources(rtype).limit(7).fetch_all()  # several pages through the next links
        assert sorted(r["id"] for r in got) == sorted(r["id"] for r in rows)


def _patient_of(r: dict) -> str:
    return (r.get("subject") or r.get("patient"))["reference"]


def test_search_parameters_select_what_they_name(fhir, export):
    meds = _ndjson(export, "MedicationRequest")
    pref = Counter(_patient_of(r) for r in meds).most_common(1)[0][0]
    mine = fhir.resources("MedicationRequest").search(patient=pref).limit(3).fetch_all()
    assert len(mine) == sum(_patient_of(r) == pref for r in meds) and all(_patient_of(r) == pref for r in mine)
    coding = meds[0]["medicationCodeableConcept"]["coding"][0]
    by_code = fhir.resources("MedicationRequest").search(code=f"{coding['system']}|{coding['code']}").fetch_all()
    assert len(by_code) == sum(r["medicationCodeableConcept"]["coding"][0]["code"] == coding["code"] for r in meds)
    year = meds[0]["authoredOn"][:4]
    after = fhir.resources("MedicationRequest").search(authoredon=f"ge{year}").fetch_all()
    assert len(after) == sum(r["authoredOn"][:4] >= year for r in meds) > 0
    assert fhir.resources("MedicationRequest").search(status="active", intent="order").count() == \
        sum(r["status"] == "active" for r in meds)
    enc = next(r["encounter"]["reference"] for r in meds if "encounter" in r)
    assert fhir.resources("MedicationRequest").search(encounter=enc).count() == \
        sum(r.get("encounter", {}).get("reference") == enc for r in meds)

    imms = _ndjson(export, "Immunization")
    cvx = imms[0]["vaccineCode"]["coding"][0]["code"]
    assert fhir.resources("Immunization").search(**{"vaccine-code": cvx}).count() == \
        sum(r["vaccineCode"]["coding"][0]["code"] == cvx for r in imms)
    day = imms[0]["occurrenceDateTime"][:10]
    assert fhir.resources("Immunization").search(date=day).count() == \
        sum(r["occurrenceDateTime"][:10] == day for r in imms)

    procs = _ndjson(export, "Procedure")
    code = procs[0]["code"]["coding"][0]["code"]
    assert fhir.resources("Procedure").search(code=code, status="completed").count() == \
        sum(r["code"]["coding"][0]["code"] == code and r["status"] == "completed" for r in procs)
    when = lambda r: r.get("performedDateTime") or r["performedPeriod"]["start"]  # noqa: E731
    year = when(procs[0])[:4]
    assert fhir.resources("Procedure").search(date=f"lt{year}").count() == sum(when(r)[:4] < year for r in procs)

    allergies = _ndjson(export, "AllergyIntolerance")
    assert fhir.resources("AllergyIntolerance").search(**{"clinical-status": "active"}).count() == \
        sum(r["clinicalStatus"]["coding"][0]["code"] == "active" for r in allergies)
    assert fhir.resources("AllergyIntolerance").search(category="environment").count() == \
        sum("environment" in r.get("category", []) for r in allergies)
    assert fhir.resources("AllergyIntolerance").search(criticality="high").count() == \
        sum(r.get("criticality") == "high" for r in allergies)


def test_include_and_revinclude(fhir, export, server):
    meds = _ndjson(export, "MedicationRequest")
    pref = _patient_of(meds[0])
    bundle = fhir.resources("MedicationRequest").search(patient=pref).include("MedicationRequest", "patient") \
        .fetch_raw()
    inc = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "include"]
    assert [f"Patient/{r['id']}" for r in inc] == [pref]
    pid = pref.split("/")[1]
    raw = httpx.get(f"{server}/Patient", params={"_id": pid, "_count": 1000, "_revinclude": [
        f"{t}:patient" for t in ITEMS]}).json()
    got = Counter(e["resource"]["resourceType"] for e in raw["entry"] if e["search"]["mode"] == "include")
    for rtype in ITEMS:
        assert got[rtype] == sum(_patient_of(r) == pref for r in _ndjson(export, rtype)), rtype
    procs = [r for r in _ndjson(export, "Procedure") if "encounter" in r]
    eid = procs[0]["encounter"]["reference"].split("/")[1]
    raw = httpx.get(f"{server}/Encounter", params={"_id": eid, "_revinclude": ["Procedure:encounter",
                                                                               "MedicationRequest:encounter"]}).json()
    got = Counter(e["resource"]["resourceType"] for e in raw["entry"] if e["search"]["mode"] == "include")
    for rtype in ("Procedure", "MedicationRequest"):
        assert got[rtype] == sum(r.get("encounter", {}).get("reference") == f"Encounter/{eid}"
                                 for r in _ndjson(export, rtype))
    bad = httpx.get(f"{server}/Immunization", params={"_include": "Immunization:encounter"})
    assert bad.status_code == 400 and "Immunization:patient" in bad.text  # R4 has no Immunization encounter param


def test_everything_holds_the_items(fhir, export, server):
    pref = _patient_of(_ndjson(export, "AllergyIntolerance")[0])
    b = httpx.get(f"{server}/{pref}/$everything", params={"_count": 1000}).json()
    got = Counter(e["resource"]["resourceType"] for e in b["entry"])
    for rtype in ITEMS:
        assert got[rtype] == sum(_patient_of(r) == pref for r in _ndjson(export, rtype)), rtype
    assert got["AllergyIntolerance"] >= 1


def _bulk(server: str, path: str, params: dict) -> Counter:
    """Kick off a Bulk Data export, poll it to the end, download every file; resources per type."""
    with httpx.Client(timeout=10) as http:
        r = http.get(f"{server}/{path}", params=params,
                     headers={"Prefer": "respond-async", "Accept": "application/fhir+json"})
        assert r.status_code == 202, r.text
        poll = r.headers["content-location"]
        for _ in range(600):
            s = http.get(poll)
            if s.status_code == 200:
                break
            time.sleep(0.05)
        counts = Counter()
        for out in s.json()["output"]:
            lines = [json.loads(x) for x in http.get(out["url"]).text.splitlines() if x]
            assert {x["resourceType"] for x in lines} == {out["type"]}
            counts[out["type"]] += len(lines)
    return counts


def test_bulk_export_with_type_covering_the_items(server, export):
    wanted = ("Patient", *ITEMS)
    counts = _bulk(server, "$export", {"_type": ",".join(wanted)})
    assert set(counts) == set(wanted)
    for rtype in wanted:
        assert counts[rtype] == len(_ndjson(export, rtype)), rtype
    # Patient-level export holds the items (the patient compartment); _typeFilter narrows a new type
    counts = _bulk(server, "Patient/$export", {"_type": "MedicationRequest,Procedure",
                                               "_typeFilter": "MedicationRequest?status=active"})
    assert counts["MedicationRequest"] == sum(r["status"] == "active" for r in _ndjson(export, "MedicationRequest"))
    assert counts["Procedure"] == len(_ndjson(export, "Procedure")) and set(counts) <= {"MedicationRequest",
                                                                                        "Procedure"}


def test_medication_statements_of_an_ips_export(tmp_path):
    out = tmp_path / "ips"
    write_export(iter(item_timelines(12, seed=32, visits=5)), out, fmt="ndjson", profile="ips", seed=6, generator=GEN)
    store, _ = build_store(out, tmp_path / "ips.db")
    store.close()
    stmts = _ndjson(out, "MedicationStatement")
    assert len(stmts) >= 10 and not (out / "MedicationRequest.ndjson").exists()
    with TestClient(create_app(ServerSettings(db_path=tmp_path / "ips.db"))) as c:
        def total(params):
            r = c.get("/MedicationStatement", params={**params, "_summary": "count"})
            assert r.status_code == 200, r.text
            return r.json()["total"]
        assert total({}) == len(stmts)
        code = stmts[0]["medicationCodeableConcept"]["coding"][0]["code"]
        assert total({"code": code}) == sum(s["medicationCodeableConcept"]["coding"][0]["code"] == code
                                            for s in stmts)
        start = lambda s: s.get("effectiveDateTime") or s["effectivePeriod"]["start"]  # noqa: E731
        year = start(stmts[0])[:4]
        assert total({"effective": f"ge{year}"}) >= sum(start(s)[:4] >= year for s in stmts) > 0
        ctx = next(s["context"]["reference"] for s in stmts if "context" in s)
        assert total({"context": ctx}) == sum(s.get("context", {}).get("reference") == ctx for s in stmts)
        b = c.get("/Encounter", params={"_id": ctx.split("/")[1], "_revinclude": "MedicationStatement:context"}).json()
        assert sum(e["search"]["mode"] == "include" for e in b["entry"]) == total({"context": ctx})
