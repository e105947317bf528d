"""In-process tests of search: every parameter type, modifiers, prefixes, paging, _include, _elements, _sort."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
from fastapi.testclient import TestClient

from fhirsynth.api.app import create_app
from fhirsynth.api.settings import ServerSettings
from fhirsynth.store.dates import date_range, period_range
from fhirsynth.store.loader import build_store


def _load(export: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in sorted(export.glob("*.ndjson*")):
        raw = gzip.decompress(f.read_bytes()) if f.name.endswith(".gz") else f.read_bytes()
        for line in raw.splitlines():
            r = json.loads(line)
            out.setdefault(r["resourceType"], []).append(r)
    return out


@pytest.fixture(scope="module")
def data(fixtures_dir: Path) -> dict[str, list[dict]]:
    return _load(fixtures_dir / "server" / "export")


@pytest.fixture(scope="module")
def client(tmp_path_factory, fixtures_dir: Path):
    db = tmp_path_factory.mktemp("api") / "store.db"
    store, _ = build_store(fixtures_dir / "server" / "export", db)
    app = create_app(ServerSettings(db_path=db, max_count=100), store=store)
    with TestClient(app) as c:
        yield c


def search(client: TestClient, path: str, params=None, status: int = 200, **kw) -> dict:
    r = client.get(path, params=params, **kw)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    return r.json()


def ids(bundle: dict, mode: str = "match") -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode}


def all_ids(client: TestClient, path: str, params) -> list[str]:
    """Follow next links to the end; returns ids in order."""
    out, b = [], search(client, path, params)
    while True:
        out += [e["resource"]["id"] for e in b.get("entry", []) if e["search"]["mode"] == "match"]
        nxt = [link["url"] for link in b["link"] if link["relation"] == "next"]
        if not nxt:
            return out
        b = search(client, nxt[0].replace("http://testserver", ""))


def pids(data, pred) -> set[str]:
    return {p["id"] for p in data["Patient"] if pred(p)}


# ------------------------------------------------------------------ token

def test_token_forms(client, data):
    assert ids(search(client, "/Patient", {"gender": "female"})) == pids(data, lambda p: p["gender"] == "female")
    g = "http://hl7.org/fhir/administrative-gender"
    assert ids(search(client, "/Patient", {"gender": f"{g}|male"})) == pids(data, lambda p: p["gender"] == "male")
    assert ids(search(client, "/Patient", {"gender": "|male"})) == set()  # code without a system
    obs = data["Observation"]
    loinc_all = {o["id"] for o in obs}
    assert ids(search(client, "/Observation", {"code": "http://loinc.org|", "_count": 100})) == loinc_all
    glucose = {o["id"] for o in obs if o["code"]["coding"][0]["code"] == "2339-0"}
    assert ids(search(client, "/Observation", {"code": "http://loinc.org|2339-0", "_count": 100})) == glucose
    # combo-code finds panel components; code does not
    bp = {o["id"] for o in obs if "component" in o}
    assert ids(search(client, "/Observation", {"combo-code": "8480-6", "_count": 100})) == bp
    assert ids(search(client, "/Observation", {"code": "8480-6"})) == set()
    # comma = OR, repeated = AND
    both = search(client, "/Observation", {"code": "2339-0,72166-2", "_count": 100})
    assert ids(both) == {o["id"] for o in obs if o["code"]["coding"][0]["code"] in ("2339-0", "72166-2")}
    cond = data["Condition"]
    r = search(client, "/Condition", [("clinical-status", "active"), ("code", "44054006")])
    assert ids(r) == {c["id"] for c in cond if c["clinicalStatus"]["coding"][0]["code"] == "active"
                      and c["code"]["coding"][0]["code"] == "44054006"}
    assert ids(search(client, "/Condition", {"category": "encounter-diagnosis", "_count": 100})) == {c["id"] for c in cond}


def test_token_modifiers(client, data):
    cond = data["Condition"]
    r = search(client, "/Condition", {"code:text": "DIABETES", "_count": 100})
    assert ids(r) == {c["id"] for c in cond if "Diabetes" in c["code"]["text"]} != set()
    r = search(client, "/Condition", {"code:not": "44054006", "_count": 100})
    assert ids(r) == {c["id"] for c in cond if c["code"]["coding"][0]["code"] != "44054006"}
    dead = pids(data, lambda p: "deceasedDateTime" in p)
    assert ids(search(client, "/Patient", {"deceased": "true"})) == dead
    assert ids(search(client, "/Patient", {"deceased": "false"})) == pids(data, lambda p: True) - dead
    assert ids(search(client, "/Patient", {"_id": "p01,p02"})) == {"p01", "p02"}
    vq = {o["id"] for o in data["Observation"] if "valueQuantity" in o}
    r = search(client, "/Observation", {"value-quantity:missing": "false", "_count": 100})
    assert ids(r) == vq
    r = search(client, "/Observation", {"value-concept": "266919005", "_count": 100})
    assert ids(r) == {o["id"] for o in data["Observation"] if "valueCodeableConcept" in o}


# ------------------------------------------------------------------ date

def _date_match(value_range, prefix, q):
    lo, hi = value_range
    qlo, qhi = date_range(q)
    eq = lo >= qlo and hi <= qhi
    return {"eq": eq, "ne": not eq, "gt": hi > qhi, "lt": lo < qlo, "ge": hi > qhi or eq, "le": lo < qlo or eq,
            "sa": lo >= qhi, "eb": hi <= qlo}[prefix]


@pytest.mark.parametrize("prefix", ["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"])
@pytest.mark.parametrize("q", ["1962", "1975-08", "1980-01-30", "1990"])
def test_birthdate_prefixes_partial_dates(client, data, prefix, q):
    expected = pids(data, lambda p: _date_match(date_range(p["birthDate"]), prefix, q))
    assert ids(search(client, "/Patient", {"birthdate": f"{prefix}{q}"})) == expected


def test_partial_date_semantics_examples(client):
    # birthDate "1962" lies within 1962 but not within May 1962; it starts before 1962-05 (lt) and ends after it (gt)
    assert "p01" in ids(search(client, "/Patient", {"birthdate": "1962"}))
    assert "p01" not in ids(search(client, "/Patient", {"birthdate": "1962-05"}))
    assert "p01" in ids(search(client, "/Patient", {"birthdate": "lt1962-05"}))
    assert "p01" in ids(search(client, "/Patient", {"birthdate": "gt1962-05"}))
    # AND of two ranges
    r = search(client, "/Patient", [("birthdate", "ge1970"), ("birthdate", "lt1990")])
    assert ids(r) == {"p02", "p03", "p08", "p09"}


def test_other_dates(client, data):
    enc = data["Encounter"]
    for q in ("ge2016", "lt2013-06", "2013"):
        prefix, v = (q[:2], q[2:]) if q[:2].isalpha() else ("eq", q)
        expected = {e["id"] for e in enc if _date_match(period_range(e["period"]), prefix, v)}
        assert ids(search(client, "/Encounter", {"date": q, "_count": 100})) == expected, q
    cond = data["Condition"]
    for q in ("2013", "2013-02", "ge2016-01-01T00:00:00Z"):
        prefix, v = (q[:2], q[2:]) if q[:2].isalpha() else ("eq", q)
        expected = {c["id"] for c in cond if _date_match(date_range(c["onsetDateTime"]), prefix, v)}
        assert ids(search(client, "/Condition", {"onset-date": q, "_count": 100})) == expected, q
    dead = [p for p in data["Patient"] if "deceasedDateTime" in p]
    assert ids(search(client, "/Patient", {"death-date": "ge2021"})) == \
        {p["id"] for p in dead if _date_match(date_range(p["deceasedDateTime"]), "ge", "2021")}
    obs = data["Observation"]
    assert ids(search(client, "/Observation", {"date": "sa2018", "_count": 100})) == \
        {o["id"] for o in obs if _date_match(date_range(o["effectiveDateTime"]), "sa", "2018")}


# ------------------------------------------------------------------ quantity, reference, string

def test_quantity_prefixes(client, data):
    vals = {o["id"]: o["valueQuantity"]["value"] for o in data["Observation"] if "valueQuantity" in o}
    pivot = sorted(vals.values())[len(vals) // 2]
    for prefix, op in (("gt", float.__gt__), ("lt", float.__lt__), ("ge", float.__ge__), ("le", float.__le__)):
        r = search(client, "/Observation", {"value-quantity": f"{prefix}{pivot}", "_count": 100})
        assert ids(r) == {i for i, v in vals.items() if op(float(v), float(pivot))}, prefix
    r = search(client, "/Observation", {"value-quantity": f"{pivot}|http://unitsofmeasure.org|mg/dL"})
    assert ids(r) == {i for i, v in vals.items() if abs(v - pivot) < 0.05}
    r = search(client, "/Observation", {"value-quantity": f"ne{pivot}", "_count": 100})
    assert ids(r) == {i for i, v in vals.items() if abs(v - pivot) >= 0.05}
    r = search(client, "/Observation", {"component-value-quantity": "ge140||mm[Hg]", "_count": 100})
    assert ids(r) == {o["id"] for o in data["Observation"]
                      if any(c["valueQuantity"]["value"] >= 140 for c in o.get("component", []))}


def test_reference_forms(client, data):
    mine = {o["id"] for o in data["Observation"] if o["subject"]["reference"] == "Patient/p01"}
    for v in ("p01", "Patient/p01", "http://elsewhere/fhir/Patient/p01"):
        assert ids(search(client, "/Observation", {"patient": v, "_count": 100})) == mine, v
    assert ids(search(client, "/Observation", {"subject": "Patient/p01", "_count": 100})) == mine
    assert ids(search(client, "/Observation", {"subject:Patient": "p01", "_count": 100})) == mine
    assert ids(search(client, "/Condition", {"encounter": "Encounter/p01-e0"})) == \
        {c["id"] for c in data["Condition"] if c["encounter"]["reference"] == "Encounter/p01-e0"}
    assert ids(search(client, "/Encounter", {"patient": "p02", "class": "EMER,IMP"})) == \
        {e["id"] for e in data["Encounter"] if e["subject"]["reference"] == "Patient/p02"
         and e["class"]["code"] in ("EMER", "IMP")}
    search(client, "/Observation", {"patient": "Encounter/x"}, status=400)


def test_string_matching(client, data):
    us = pids(data, lambda p: any(a["country"] == "US" for a in p.get("address", [])))
    assert ids(search(client, "/Patient", {"address-country": "us"})) == us  # case-insensitive
    assert ids(search(client, "/Patient", {"address-country:exact": "US"})) == us
    assert ids(search(client, "/Patient", {"address-country:exact": "us"})) == set()
    assert ids(search(client, "/Patient", {"name": "mull"})) == pids(data, lambda p: p["name"][0]["family"] == "Müller")
    assert ids(search(client, "/Patient", {"family:contains": "UÑ"})) == pids(data, lambda p: p["name"][0]["family"] == "Núñez")
    assert ids(search(client, "/Patient", {"address-country:missing": "true"})) == {"p11"}


# ------------------------------------------------------------------ paging, sorting, result shaping

def test_paging_all_pages_and_back(client, data):
    n = len(data["Observation"])
    first = search(client, "/Observation", {"_count": 7})
    assert first["total"] == n and len(first["entry"]) == 7
    assert not [lk for lk in first["link"] if lk["relation"] == "previous"]
    got = all_ids(client, "/Observation", {"_count": 7})
    assert len(got) == n and set(got) == {o["id"] for o in data["Observation"]}
    # walk forward twice, then back: previous gives the same page again
    p2 = search(client, next(lk["url"] for lk in first["link"] if lk["relation"] == "next").replace("http://testserver", ""))
    p3 = search(client, next(lk["url"] for lk in p2["link"] if lk["relation"] == "next").replace("http://testserver", ""))
    back = search(client, next(lk["url"] for lk in p3["link"] if lk["relation"] == "previous").replace("http://testserver", ""))
    assert [e["resource"]["id"] for e in back["entry"]] == [e["resource"]["id"] for e in p2["entry"]]
    back1 = search(client, next(lk["url"] for lk in back["link"] if lk["relation"] == "previous").replace("http://testserver", ""))
    assert [e["resource"]["id"] for e in back1["entry"]] == [e["resource"]["id"] for e in first["entry"]]
    assert not [lk for lk in back1["link"] if lk["relation"] == "previous"]
    # self link of a later page repeats it and keeps the query
    self_url = next(lk["url"] for lk in p3["link"] if lk["relation"] == "self")
    assert dict(parse_qsl(urlsplit(self_url).query))["_count"] == "7"
    again = search(client, self_url.replace("http://testserver", ""))
    assert [e["resource"]["id"] for e in again["entry"]] == [e["resource"]["id"] for e in p3["entry"]]


@pytest.mark.parametrize("sort", ["_id", "-_id", "date", "-date", "_lastUpdated"])
def test_sort_paged(client, data, sort):
    got = all_ids(client, "/Observation", {"_sort": sort, "_count": 9})
    obs = {o["id"]: o for o in data["Observation"]}
    assert len(got) == len(obs) and set(got) == set(obs)
    if sort.lstrip("-") == "_id":
        assert got == sorted(obs, reverse=sort.startswith("-"))
    if sort.lstrip("-") == "date":
        keys = [date_range(obs[i]["effectiveDateTime"])[0] for i in got]
        assert keys == sorted(keys, reverse=sort.startswith("-"))


def test_sort_birthdate_and_bad_sort(client, data):
    got = [e["resource"]["id"] for e in search(client, "/Patient", {"_sort": "-birthdate"})["entry"]]
    keys = [date_range(p["birthDate"])[0] for p in sorted(data["Patient"], key=lambda p: got.index(p["id"]))]
    assert keys == sorted(keys, reverse=True)
    search(client, "/Patient", {"_sort": "gender"}, status=400)
    search(client, "/Patient", {"_sort": "_id,_id"}, status=400)


def test_summary_total_elements_count(client, data):
    b = search(client, "/Observation", {"_summary": "count", "patient": "p03"})
    assert b["total"] == sum(o["subject"]["reference"] == "Patient/p03" for o in data["Observation"])
    assert "entry" not in b
    assert "entry" not in search(client, "/Observation", {"_count": 0})
    assert "total" not in search(client, "/Observation", {"_total": "none"})
    b = search(client, "/Patient", {"_elements": "gender", "_id": "p02"})
    res = b["entry"][0]["resource"]
    assert set(res) == {"resourceType", "id", "meta", "gender"}
    assert any(t["code"] == "SUBSETTED" for t in res["meta"]["tag"])
    search(client, "/Patient", {"_summary": "text"}, status=400)


def test_count_clamped_with_warning(client, data):
    small = TestClient(create_app(ServerSettings(db_path=client.app.state.context.settings.db_path, max_count=40)))
    b = search(small, "/Observation", {"_count": 5000})
    matches = [e for e in b["entry"] if e["search"]["mode"] == "match"]
    assert len(matches) == 40  # max_count of this app
    oo = [e["resource"] for e in b["entry"] if e["search"]["mode"] == "outcome"]
    assert oo and oo[0]["issue"][0]["severity"] == "warning" and "clamped" in oo[0]["issue"][0]["diagnostics"]


def test_include_and_revinclude(client, data):
    b = search(client, "/Observation", {"patient": "p04", "_include": "Observation:patient", "_count": 3})
    assert ids(b, "include") == {"p04"} and len(ids(b)) == 3
    b = search(client, "/Observation", [("_id", "p04-e0-o0,p05-e1-o1"), ("_include", "Observation:encounter"),
                                        ("_include", "Observation:patient")])
    assert ids(b, "include") == {"p04-e0", "p05-e1", "p04", "p05"}
    b = search(client, "/Condition", {"_id": "p01-c0", "_include": "Condition:patient"})
    assert ids(b, "include") == {"p01"}
    b = search(client, "/Patient", [("_id", "p06"), ("_revinclude", "Observation:patient"),
                                    ("_revinclude", "Condition:patient")])
    expected = {o["id"] for k in ("Observation", "Condition") for o in data[k] if o["subject"]["reference"] == "Patient/p06"}
    assert ids(b, "include") == expected and ids(b) == {"p06"}
    search(client, "/Observation", {"_include": "Condition:patient"}, status=400)
    search(client, "/Patient", {"_revinclude": "Provenance:target"}, status=400)


def test_post_search_equals_get(client):
    g = search(client, "/Observation", {"patient": "p02", "code": "2339-0"})
    r = client.post("/Observation/_search", data={"patient": "p02", "code": "2339-0"})
    assert r.status_code == 200 and ids(r.json()) == ids(g) and r.json()["total"] == g["total"]
    r = client.post("/Observation/_search?patient=p02", data={"code": "2339-0"})
    assert ids(r.json()) == ids(g)


@pytest.fixture()
def own_client(tmp_path, fixtures_dir: Path):
    """A store of this test's own: tests that write must not change what the module's other tests see."""
    store, _ = build_store(fixtures_dir / "server" / "export", tmp_path / "store.db")
    with TestClient(create_app(ServerSettings(db_path=tmp_path / "store.db", max_count=100), store=store)) as c:
        yield c


def test_paging_is_stable_while_store_grows(own_client, data):
    client = own_client
    first = search(client, "/Patient", {"_count": 5})
    store = client.app.state.context.store
    tag = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HTEST"}
    store.add([{"resourceType": "Patient", "id": "zz-new", "gender": "female", "meta": {"security": [tag]}}])
    got = [e["resource"]["id"] for e in first["entry"]]
    b = first
    while nxt := [lk["url"] for lk in b["link"] if lk["relation"] == "next"]:
        b = search(client, nxt[0].replace("http://testserver", ""))
        assert b["total"] == first["total"]
        got += [e["resource"]["id"] for e in b["entry"]]
    assert "zz-new" not in got and len(got) == first["total"] == len(data["Patient"])
    assert "zz-new" in ids(search(client, "/Patient", {"_count": 50}))


@pytest.mark.parametrize("extra", [{}, {"_sort": "-date"}, {"code": "85354-9,2339-0"}])
def test_patient_filtered_paging_forward_and_back(client, data, extra):
    """patient=X pages are driven from the reference index (a join); paging must still be exact both ways."""
    params = {"patient": "Patient/p02", "_count": 2, **extra}
    got = all_ids(client, "/Observation", params)
    expected = {o["id"] for o in data["Observation"] if o["subject"]["reference"] == "Patient/p02"
                and ("code" not in extra or o["code"]["coding"][0]["code"] in ("85354-9", "2339-0"))}
    assert len(got) == len(expected) and set(got) == expected
    b = search(client, "/Observation", params)
    pages = [[e["resource"]["id"] for e in b["entry"]]]
    while nxt := [lk["url"] for lk in b["link"] if lk["relation"] == "next"]:
        b = search(client, nxt[0].replace("http://testserver", ""))
        pages.append([e["resource"]["id"] for e in b["entry"]])
    for want in reversed(pages[:-1]):
        b = search(client, next(lk["url"] for lk in b["link"] if lk["relation"] == "previous").replace("http://testserver", ""))
        assert [e["resource"]["id"] for e in b["entry"]] == want
    assert b["total"] == len(expected)
