"""Every search parameter below separates its fixture: the expected set is neither empty nor everything, and the
server's answer equals an independent evaluation of the same query over the fixture's JSON (plain Python
predicates, not the store's index). A server that ignored the parameter would return everything and fail.

The fixture is fixtures/server/export with its Conditions varied (every third one a problem-list item, every fourth
one confirmed / unconfirmed), so that category and verification status can tell them apart."""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fhirsynth.api.app import create_app
from fhirsynth.api.settings import ServerSettings
from fhirsynth.store.loader import build_store

CAT = "http://terminology.hl7.org/CodeSystem/condition-category"
VER = "http://terminology.hl7.org/CodeSystem/condition-ver-status"


def _read(path: Path) -> list[dict]:
    raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def _vary_conditions(conditions: list[dict]) -> list[dict]:
    out = []
    for i, c in enumerate(conditions):
        c = json.loads(json.dumps(c))
        if i % 3 == 0:
            c["category"] = [{"coding": [{"system": CAT, "code": "problem-list-item", "display": "Problem List Item"}]}]
        status = "confirmed" if i % 4 else "unconfirmed"
        c["verificationStatus"] = {"coding": [{"system": VER, "code": status}]}
        out.append(c)
    return out


@pytest.fixture(scope="module")
def fixture(tmp_path_factory, fixtures_dir: Path):
    src = fixtures_dir / "server" / "export"
    export = tmp_path_factory.mktemp("sep") / "export"
    shutil.copytree(src, export)
    cond_file = export / "Condition.ndjson"
    cond_file.write_text("".join(json.dumps(c) + "\n" for c in _vary_conditions(_read(cond_file))))
    data: dict[str, list[dict]] = {}
    for f in sorted(export.glob("*.ndjson*")):
        for r in _read(f):
            data.setdefault(r["resourceType"], []).append(r)
    store, _ = build_store(export, export.parent / "store.db")
    with TestClient(create_app(ServerSettings(db_path=export.parent / "store.db", max_count=1000),
                               store=store)) as client:
        yield client, data


def _codes(cc: dict | list | None) -> set[tuple[str | None, str]]:
    items = cc if isinstance(cc, list) else [cc] if cc else []
    return {(c.get("system"), c.get("code")) for x in items for c in x.get("coding", [])}


def _ref(r: dict, key: str) -> str:
    return (r.get(key) or {}).get("reference", "")


def _day(value: str) -> str:
    return value[:10]


Query = tuple[str, dict[str, str], Callable[[dict], bool]]
QUERIES: list[Query] = [
    ("Condition", {"category": "problem-list-item"}, lambda r: (CAT, "problem-list-item") in _codes(r.get("category"))),
    ("Condition", {"category": f"{CAT}|encounter-diagnosis"},
     lambda r: (CAT, "encounter-diagnosis") in _codes(r.get("category"))),
    ("Condition", {"category:not": "problem-list-item"},
     lambda r: (CAT, "problem-list-item") not in _codes(r.get("category"))),
    ("Condition", {"verification-status": "unconfirmed"},
     lambda r: (VER, "unconfirmed") in _codes(r.get("verificationStatus"))),
    ("Condition", {"clinical-status": "resolved"},
     lambda r: any(code == "resolved" for _, code in _codes(r.get("clinicalStatus")))),
    ("Condition", {"onset-date": "ge2012-01-01"}, lambda r: _day(r["onsetDateTime"]) >= "2012-01-01"),
    ("Condition", {"onset-date": "lt2012-01-01"}, lambda r: _day(r["onsetDateTime"]) < "2012-01-01"),
    ("Condition", {"category": "problem-list-item", "clinical-status": "active"},  # repeated = AND
     lambda r: (CAT, "problem-list-item") in _codes(r.get("category"))
     and any(code == "active" for _, code in _codes(r.get("clinicalStatus")))),
    ("Observation", {"category": "laboratory,social-history"},  # comma = OR
     lambda r: {c for _, c in _codes(r.get("category"))} & {"laboratory", "social-history"} != set()),
    ("Observation", {"code": "http://loinc.org|2339-0"}, lambda r: ("http://loinc.org", "2339-0") in _codes(r["code"])),
    ("Observation", {"date": "ge2015-01-01"}, lambda r: _day(r["effectiveDateTime"]) >= "2015-01-01"),
    ("Patient", {"gender": "female"}, lambda r: r.get("gender") == "female"),
    ("Patient", {"birthdate": "lt1976"}, lambda r: r["birthDate"][:4] < "1976"),
    ("Patient", {"birthdate": "ge1991-11"}, lambda r: r["birthDate"][:7] >= "1991-11"),
    ("Patient", {"gender:not": "female"}, lambda r: r.get("gender") != "female"),
]


def _ids(client: TestClient, rtype: str, params: dict[str, str]) -> set[str]:
    r = client.get(f"/{rtype}", params={**params, "_count": "1000"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert not [link for link in body["link"] if link["relation"] == "next"], "fixture larger than one page"
    return {e["resource"]["id"] for e in body.get("entry", []) if e["search"]["mode"] == "match"}


@pytest.mark.parametrize("rtype,params,pred", QUERIES, ids=[f"{q[0]}?{q[1]}" for q in QUERIES])
def test_query_separates_and_matches_independent_evaluation(fixture, rtype, params, pred):
    client, data = fixture
    expected = {r["id"] for r in data[rtype] if pred(r)}
    assert expected and expected != {r["id"] for r in data[rtype]}, "the fixture does not separate this query"
    assert _ids(client, rtype, params) == expected


def test_patient_reference_separates(fixture):
    client, data = fixture
    pid = data["Patient"][0]["id"]
    expected = {c["id"] for c in data["Condition"] if _ref(c, "subject") == f"Patient/{pid}"}
    assert expected and expected != {c["id"] for c in data["Condition"]}
    assert _ids(client, "Condition", {"patient": pid}) == expected
    assert _ids(client, "Condition", {"subject": f"Patient/{pid}"}) == expected
