"""In-process tests of Bulk Data $export: kick-off rules, polling, manifest, downloads, cancel, _type/_since."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
from fastapi.testclient import TestClient

from fhirsynth.api.app import create_app
from fhirsynth.api.settings import ServerSettings
from fhirsynth.store.loader import build_store

ASYNC = {"Prefer": "respond-async"}


@pytest.fixture(scope="module")
def client(tmp_path_factory, fixtures_dir: Path):
    db = tmp_path_factory.mktemp("exp") / "store.db"
    store, _ = build_store(fixtures_dir / "server" / "export", db)
    with TestClient(create_app(ServerSettings(db_path=db, export_jobs=4), store=store)) as c:
        yield c


def run_export(client: TestClient, path: str, params=None) -> tuple[str, dict]:
    r = client.get(path, params=params, headers=ASYNC)
    assert r.status_code == 202, r.text
    status_url = r.headers["content-location"]
    assert "/$export-poll-status/" in status_url
    for _ in range(200):
        s = client.get(status_url)
        if s.status_code == 200:
            return status_url, s.json()
        assert s.status_code == 202 and s.headers["retry-after"] and "x-progress" in s.headers
        time.sleep(0.02)
    raise AssertionError("export never finished")


def download(client: TestClient, manifest: dict) -> dict[str, list[dict]]:
    out = {}
    for o in manifest["output"]:
        r = client.get(o["url"])
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+ndjson")
        lines = [orjson.loads(x) for x in r.content.splitlines()]
        assert len(lines) == o["count"] and all(x["resourceType"] == o["type"] for x in lines)
        out[o["type"]] = lines
    return out


def test_system_export_matches_store(client):
    status_url, manifest = run_export(client, "/$export", {"_outputFormat": "application/fhir+ndjson"})
    assert set(manifest) == {"transactionTime", "request", "requiresAccessToken", "output", "error"}
    assert manifest["requiresAccessToken"] is False and manifest["error"] == []
    assert manifest["request"].endswith("/$export?_outputFormat=application%2Ffhir%2Bndjson")
    files = download(client, manifest)
    counts = client.app.state.context.store.counts()
    assert {t: len(v) for t, v in files.items()} == counts
    ids = [r["id"] for r in files["Observation"]]
    assert len(ids) == len(set(ids))
    # DELETE removes the job; afterwards status and files are gone
    assert client.delete(status_url).status_code == 202
    assert client.get(status_url).status_code == 404
    assert client.get(manifest["output"][0]["url"]).status_code == 404


def test_patient_and_group_export(client):
    _, m = run_export(client, "/Patient/$export")
    types = {o["type"] for o in m["output"]}
    assert types == {"Patient", "Encounter", "Condition", "Observation", "Provenance"}
    _, g = run_export(client, "/Group/all/$export", {"_type": "Patient,Condition"})
    assert {o["type"]: o["count"] for o in g["output"]} == {o["type"]: o["count"] for o in m["output"]
                                                             if o["type"] in ("Patient", "Condition")}
    _, raw = run_export(client, "/Patient/$export?_outputFormat=application/fhir+ndjson&_type=Patient")  # unencoded +
    assert [o["type"] for o in raw["output"]] == ["Patient"]
    for job in list(client.app.state.context.jobs):
        client.delete(f"/$export-poll-status/{job}")
    assert client.get("/Group/none/$export", headers=ASYNC).status_code == 404


def test_since_filters_by_last_updated(client):
    _, m = run_export(client, "/$export", {"_since": "2999-01-01T00:00:00Z"})
    assert m["output"] == []
    _, m = run_export(client, "/$export", {"_since": "2000-01-01T00:00:00Z", "_type": "Patient"})
    assert [o["count"] for o in m["output"]] == [client.app.state.context.store.counts()["Patient"]]
    for job in list(client.app.state.context.jobs):
        client.delete(f"/$export-poll-status/{job}")


def test_kickoff_errors(client):
    def oo(r, status):
        assert r.status_code == status, r.text
        assert r.json()["resourceType"] == "OperationOutcome"
        return r.json()["issue"][0]["diagnostics"]

    assert "respond-async" in oo(client.get("/$export"), 400)
    assert "_outputFormat" in oo(client.get("/$export", params={"_outputFormat": "text/csv"}, headers=ASYNC), 400)
    oo(client.get("/$export", params={"_type": "Medication"}, headers=ASYNC), 400)
    oo(client.get("/Patient/$export", params={"_type": "Group"}, headers=ASYNC), 400)
    oo(client.get("/$export", params={"_since": "last week"}, headers=ASYNC), 400)
    assert "includeAssociatedData" in oo(client.get("/$export", params={"includeAssociatedData": "x"},
                                                    headers=ASYNC), 400)
    r = client.get("/$export", params={"includeAssociatedData": "x"},
                   headers={"Prefer": "respond-async, handling=lenient"})
    assert r.status_code == 202
    client.delete(r.headers["content-location"])
    oo(client.get("/$export-poll-status/nope"), 404)
    oo(client.delete("/$export-poll-status/nope"), 404)


def test_job_limit(client):
    urls = [client.get("/$export", headers=ASYNC).headers["content-location"] for _ in range(4)]
    r = client.get("/$export", headers=ASYNC)
    assert r.status_code == 429 and r.headers["retry-after"]
    for u in urls:
        assert client.delete(u).status_code == 202
    r = client.get("/$export", headers=ASYNC)
    assert r.status_code == 202
    client.delete(r.headers["content-location"])


def test_export_requires_token_when_configured(client):
    settings = ServerSettings(db_path=client.app.state.context.settings.db_path, token="t")
    c = TestClient(create_app(settings))
    assert c.get("/$export", headers=ASYNC).status_code == 401
    h = {**ASYNC, "Authorization": "Bearer t"}
    r = c.get("/$export", params={"_type": "Patient"}, headers=h)
    url = r.headers["content-location"]
    for _ in range(200):
        s = c.get(url, headers=h)
        if s.status_code == 200:
            break
        time.sleep(0.02)
    m = s.json()
    assert m["requiresAccessToken"] is True
    assert c.get(m["output"][0]["url"]).status_code == 401
    assert c.get(m["output"][0]["url"], headers=h).status_code == 200
