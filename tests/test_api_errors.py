"""In-process tests: read, errors as OperationOutcomes, content negotiation, auth, CORS, mounting, metadata,
$everything and $synthesize argument handling."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhirsynth.api.app import create_app
from fhirsynth.api.router import build_router
from fhirsynth.api.settings import ServerSettings
from fhirsynth.store.loader import build_store
from fhirsynth.store.params import PARAMS


@pytest.fixture(scope="module")
def db(tmp_path_factory, fixtures_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("api") / "store.db"
    store, _ = build_store(fixtures_dir / "server" / "export", path)
    store.close()
    return path


@pytest.fixture(scope="module")
def client(db: Path):
    with TestClient(create_app(ServerSettings(db_path=db))) as c:
        yield c


def outcome(r, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["severity"] == "error"
    return body["issue"][0]["diagnostics"]


def test_read(client):
    r = client.get("/Patient/p03")
    assert r.status_code == 200 and r.headers["content-type"] == "application/fhir+json"
    assert r.json()["id"] == "p03"
    assert client.get("/Observation/p03-e0-o0").json()["subject"]["reference"] == "Patient/p03"
    assert client.get("/Group/all").json()["quantity"] == 12
    assert client.get("/Provenance/p03-prov").status_code == 200


def test_not_found_and_unknown_type(client):
    assert "Patient/nope not found" in outcome(client.get("/Patient/nope"), 404)
    assert "not served" in outcome(client.get("/Medication/1"), 404)
    assert "not served" in outcome(client.get("/Medication"), 404)
    outcome(client.get("/Patient/p01/_history/1"), 404)


def test_writes_are_405(client):
    for method, path in (("POST", "/Patient"), ("PUT", "/Patient/p01"), ("PATCH", "/Patient/p01"),
                         ("DELETE", "/Patient/p01"), ("DELETE", "/Patient"), ("POST", "/")):
        r = client.request(method, path, json={"resourceType": "Patient"})
        assert "read-only" in outcome(r, 405), (method, path)
    assert client.get("/Patient/p01").status_code == 200  # nothing changed


def test_bad_search_params_400_and_lenient(client):
    msg = outcome(client.get("/Patient", params={"colour": "red"}), 400)
    assert "colour" in msg and "gender" in msg
    for params in ({"birthdate": "gt19xx"}, {"birthdate": "ap2010"}, {"gender:exact": "male"},
                   {"value-quantity": "lots"}, {"_count": "-1"}, {"_count": "ten"}, {"_cursor": "garbage!"},
                   {"address-country:missing": "maybe"}, {"_include:iterate": "Observation:patient"},
                   {"_total": "some"}):
        path = "/Observation" if "value-quantity" in params else "/Patient"
        outcome(client.get(path, params=params), 400)
    r = client.get("/Patient", params={"colour": "red", "gender": "male"}, headers={"Prefer": "handling=lenient"})
    assert r.status_code == 200
    b = r.json()
    self_url = next(lk["url"] for lk in b["link"] if lk["relation"] == "self")
    assert "colour" not in self_url and "gender=male" in self_url
    assert {e["resource"]["id"] for e in b["entry"] if e["search"]["mode"] == "match"} == \
        {f"p{i:02d}" for i in range(1, 12, 2)}
    # an explicit strict preference overrides a lenient server default
    lenient_app = TestClient(create_app(ServerSettings(db_path=client.app.state.context.settings.db_path,
                                                       default_handling="lenient")))
    assert lenient_app.get("/Patient", params={"colour": "red"}).status_code == 200
    outcome(lenient_app.get("/Patient", params={"colour": "red"}, headers={"Prefer": "handling=strict"}), 400)
    # malformed values stay errors even when lenient
    outcome(client.get("/Patient", params={"birthdate": "soon"}, headers={"Prefer": "handling=lenient"}), 400)


def test_content_negotiation(client):
    assert client.get("/Patient/p01", params={"_format": "json"}).status_code == 200
    assert client.get("/Patient/p01", params={"_format": "application/fhir+json"}).status_code == 200
    assert client.get("/Patient/p01?_format=application/fhir+json").status_code == 200  # "+" left unencoded
    assert "not supported" in outcome(client.get("/Patient/p01", params={"_format": "xml"}), 406)
    outcome(client.get("/Patient/p01", headers={"Accept": "application/fhir+xml"}), 406)
    assert client.get("/Patient/p01", headers={"Accept": "text/html,*/*;q=0.8"}).status_code == 200
    assert client.get("/Patient/p01", headers={"Accept": "application/fhir+json"}).status_code == 200
    # the DSTU2-era media type older clients still send
    assert client.get("/Patient/p01", headers={"Accept": "application/json+fhir"}).status_code == 200
    assert client.get("/Patient/p01", params={"_format": "application/json+fhir"}).status_code == 200


def test_request_limits(db):
    c = TestClient(create_app(ServerSettings(db_path=db, max_params=3, max_body_bytes=100)))
    outcome(c.get("/Patient", params=[("_id", "p01")] * 4), 400)
    outcome(c.post("/Patient/_search", data={"name": "x" * 200}), 413)
    outcome(c.post("/Patient/_search", content=b'{"a":1}', headers={"Content-Type": "application/json"}), 415)


def test_bearer_token_and_scopes(db):
    settings = ServerSettings(db_path=db, token="s3cret", scoped_tokens={"pt": "system/Patient.read",
                                                                         "v2": "system/*.rs"})
    c = TestClient(create_app(settings))
    assert c.get("/metadata").status_code == 200  # the CapabilityStatement stays public
    r = c.get("/Patient/p01")
    outcome(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")
    outcome(c.get("/Patient/p01", headers={"Authorization": "Bearer wrong"}), 401)
    assert c.get("/Patient/p01", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/Patient/p01", headers={"Authorization": "Bearer pt"}).status_code == 200
    assert "Observation" in outcome(c.get("/Observation", headers={"Authorization": "Bearer pt"}), 403)
    assert c.get("/Observation", headers={"Authorization": "Bearer v2"}).status_code == 200
    outcome(c.get("/Patient", params={"_revinclude": "Observation:patient"}, headers={"Authorization": "Bearer pt"}), 403)
    outcome(c.post("/Patient/$synthesize", headers={"Authorization": "Bearer v2"}), 403)
    cs = c.get("/metadata").json()
    assert cs["rest"][0]["security"]["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"


def test_cors(db):
    c = TestClient(create_app(ServerSettings(db_path=db, cors_origins=["https://app.example"])))
    r = c.options("/Patient", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    r = c.get("/Patient/p01", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    plain = TestClient(create_app(ServerSettings(db_path=db)))
    assert "access-control-allow-origin" not in plain.get("/Patient/p01", headers={"Origin": "https://app.example"}).headers


def test_router_mounts_under_prefix(db):
    host = FastAPI()

    @host.get("/health")
    def health():
        return {"ok": True}

    host.include_router(build_router(ServerSettings(db_path=db)), prefix="/fhir")
    c = TestClient(host)
    assert c.get("/health").json() == {"ok": True}
    assert c.get("/fhir/Patient/p01").json()["id"] == "p01"
    b = c.get("/fhir/Observation", params={"patient": "p01", "_count": 2}).json()
    assert b["entry"][0]["fullUrl"].startswith("http://testserver/fhir/Observation/")
    nxt = next(lk["url"] for lk in b["link"] if lk["relation"] == "next")
    assert nxt.startswith("http://testserver/fhir/Observation?")
    assert c.get(nxt).json()["total"] == b["total"]
    outcome(c.get("/fhir/Patient/nope"), 404)
    outcome(c.delete("/fhir/Patient/p01"), 405)
    assert c.get("/fhir/metadata").json()["implementation"]["url"] == "http://testserver/fhir"


def test_capability_statement_lists_exactly_what_is_supported(client):
    cs = client.get("/metadata").json()
    assert cs["resourceType"] == "CapabilityStatement" and cs["fhirVersion"] == "4.0.1"
    resources = {r["type"]: r for r in cs["rest"][0]["resource"]}
    assert set(resources) == set(PARAMS)
    for rtype, res in resources.items():
        assert {p["name"] for p in res["searchParam"]} == {"_id", *PARAMS[rtype]}
        # every advertised parameter is really accepted
        for p in res["searchParam"]:
            r = client.get(f"/{rtype}", params={f"{p['name']}:missing" if p["name"] != "_id" else "_id": "true"
                                                if p["name"] != "_id" else "p01"})
            assert r.status_code == 200, (rtype, p["name"], r.text)
    assert {o["name"] for o in resources["Patient"]["operation"]} == {"everything", "export"}  # no model loaded
    assert resources["Observation"]["searchInclude"] == ["Observation:patient", "Observation:subject",
                                                         "Observation:encounter"]
    assert cs["rest"][0]["operation"][0]["name"] == "export"
    with_model = TestClient(create_app(ServerSettings(db_path=client.app.state.context.settings.db_path,
                                                      model_dir=Path("/nonexistent"))))
    ops = {o["name"]: o for o in with_model.get("/metadata").json()["rest"][0]["resource"][0]["operation"]}
    assert "synthesize" in ops
    od = with_model.get(ops["synthesize"]["definition"]).json()
    assert od["resourceType"] == "OperationDefinition" and od["code"] == "synthesize"
    assert {p["name"] for p in od["parameter"] if p["use"] == "in"} == {"count", "seed", "sex", "age", "condition"}


def test_everything_paged(client):
    r = client.get("/Patient/p02/$everything", params={"_count": 4})
    b = r.json()
    assert r.status_code == 200 and b["type"] == "searchset"
    assert b["entry"][0]["resource"]["resourceType"] == "Patient"
    seen = [e["fullUrl"] for e in b["entry"]]
    while nxt := [lk["url"] for lk in b["link"] if lk["relation"] == "next"]:
        b = client.get(nxt[0]).json()
        seen += [e["fullUrl"] for e in b["entry"]]
    assert len(seen) == len(set(seen)) == b["total"]
    types = {u.split("/")[-2] for u in seen}
    assert types == {"Patient", "Encounter", "Condition", "Observation", "Provenance"}
    only = client.get("/Patient/p02/$everything", params={"_type": "Condition"}).json()
    assert {e["resource"]["resourceType"] for e in only["entry"]} == {"Condition"}
    outcome(client.get("/Patient/nope/$everything"), 404)
    outcome(client.get("/Patient/p02/$everything", params={"_type": "Group"}), 400)
    outcome(client.get("/Patient/p02/$everything", params={"start": "2020"}), 400)


def test_synthesize_without_model_is_501_and_bad_args_400(client):
    r = client.post("/Patient/$synthesize", params={"count": 2})
    assert "no model" in outcome(r, 501)
    outcome(client.post("/Patient/$synthesize", params={"count": 0}), 400)
    outcome(client.post("/Patient/$synthesize", params={"sex": "robot"}), 400)
    outcome(client.post("/Patient/$synthesize", params={"age": "60-40"}), 400)
    outcome(client.post("/Patient/$synthesize", params={"condition": "44054006"}), 400)
    outcome(client.post("/Patient/$synthesize", json={"resourceType": "Patient"}), 400)
    params = {"resourceType": "Parameters", "parameter": [{"name": "count", "valueInteger": 3},
                                                          {"name": "sex", "valueCode": "female"}]}
    assert "no model" in outcome(client.post("/Patient/$synthesize", json=params), 501)
    bad = {"resourceType": "Parameters", "parameter": [{"name": "colour", "valueString": "red"}]}
    outcome(client.post("/Patient/$synthesize", json=bad), 400)


def test_api_does_not_import_torch():
    import subprocess

    code = ("import sys; import fhirsynth.api.app, fhirsynth.api.router, fhirsynth.commands.serve; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_server_resources_are_valid_fhir(db):
    """CapabilityStatement, OperationDefinition, searchset Bundles and OperationOutcomes pass both validators."""
    from fhirsynth.fhir import validate

    if not validate.schema_path().is_file():
        pytest.skip("FHIR JSON schema not fetched (scripts/fetch_fhir_schema.sh)")
    c = TestClient(create_app(ServerSettings(db_path=db, model_dir=Path("/nonexistent"), max_count=10)))
    for path in ("/metadata", "/OperationDefinition/synthesize", "/Patient/nope", "/Patient/p01/$everything?_count=3",
                 "/Observation?_count=50&_include=Observation:patient&_include=Observation:encounter&colour=1"):
        body = c.get(path, headers={"Prefer": "handling=lenient"}).json()
        # the official R4 JSON schema's fhirVersion enum stops at 4.0.0; R4 is 4.0.1 (known schema defect)
        problems = [p for p in validate.validate_resource(body) if "fhirVersion" not in p]
        assert problems == [], (path, problems)


def test_odd_host_header_still_gives_valid_json(client):
    r = client.get("/Patient", params={"_id": "p01"}, headers={"Host": 'ev"il\\host'})
    assert r.status_code == 200, r.text
    body = r.json()  # valid JSON whatever the Host header holds
    assert body["entry"][0]["resource"]["id"] == "p01"
    assert all('"' not in link["url"] and "\\" not in link["url"] for link in body["link"])
