"""Bulk Data kick-off by POST (Parameters body) and _typeFilter, against a real `fhirsynth serve` on loopback.

Expected results come from the fixture NDJSON files themselves (an oracle independent of the server), and
are cross-checked with the server's own search for the same query.
"""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import orjson
import pytest

from serverproc import running_server

ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}
GLUCOSE = "http://loinc.org|2339-0"
BP_PANEL = "http://loinc.org|85354-9"


def _fixture(export: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in sorted(export.iterdir()):
        if ".ndjson" in f.name:
            opener = gzip.open if f.name.endswith(".gz") else open
            with opener(f, "rb") as fh:
                out[f.name.split(".")[0]] = [orjson.loads(x) for x in fh if x.strip()]
    return out


@pytest.fixture(scope="module")
def fixture_data(fixtures_dir: Path) -> dict[str, list[dict]]:
    return _fixture(fixtures_dir / "server" / "export")


@pytest.fixture(scope="module")
def base(tmp_path_factory, fixtures_dir: Path):
    env = dict(os.environ, FHIRSYNTH_PROGRESS="0")
    env.pop("FHIRSYNTH_SERVER_TOKEN", None)
    db = tmp_path_factory.mktemp("tf") / "store.db"
    with running_server(["--data", fixtures_dir / "server" / "export", "--db", db], env) as server:
        yield server.base
    assert "Traceback" not in server.stderr, server.stderr[-3000:]


def run_export(http: httpx.Client, method: str, url: str, **kw) -> dict[str, list[dict]]:
    """Kick-off -> poll (honouring Retry-After, scaled down) -> download every file -> DELETE; files by type."""
    r = http.request(method, url, headers={**ASYNC, **kw.pop("headers", {})}, **kw)
    assert r.status_code == 202, r.text
    poll = r.headers["content-location"]
    for _ in range(400):
        s = http.get(poll)
        if s.status_code == 200:
            break
        assert s.status_code == 202 and int(s.headers["retry-after"]) >= 1
        time.sleep(0.02)
    manifest = s.json()
    files: dict[str, list[dict]] = {}
    for out in manifest["output"]:
        got = http.get(out["url"])
        assert got.status_code == 200
        files[out["type"]] = [orjson.loads(x) for x in got.content.splitlines() if x.strip()]
        assert len(files[out["type"]]) == out["count"]
    assert http.delete(poll).status_code == 202
    return files


def _ids(resources: list[dict]) -> set[str]:
    return {r["id"] for r in resources}


def _code(r: dict) -> str:
    c = r["code"]["coding"][0]
    return f"{c['system']}|{c['code']}"


def _type_filter(rtype: str, **params: str) -> str:
    """The _typeFilter value: TYPE?query with the query's values URL-encoded, as the Bulk Data IG asks."""
    return f"{rtype}?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())


def test_type_filter_get_matches_fixture_and_search(base, fixture_data):
    with httpx.Client(timeout=30) as http:
        files = run_export(http, "GET", f"{base}/$export", params=[
            ("_type", "Observation,Patient"), ("_typeFilter", _type_filter("Observation", code=GLUCOSE))])
        want = {r["id"] for r in fixture_data["Observation"] if _code(r) == GLUCOSE}
        assert want and _ids(files["Observation"]) == want
        assert _ids(files["Patient"]) == _ids(fixture_data["Patient"])  # no filter for Patient: all of them
        assert set(files) == {"Observation", "Patient"}
        search = http.get(f"{base}/Observation", params={"code": GLUCOSE, "_count": 500}).json()
        assert search["total"] == len(want)


def test_type_filters_or_per_type_and_within_one_filter(base, fixture_data):
    obs = fixture_data["Observation"]
    with httpx.Client(timeout=30) as http:
        files = run_export(http, "GET", f"{base}/Patient/$export", params=[
            ("_typeFilter", _type_filter("Observation", code=GLUCOSE, date="ge2015-01-01")),
            ("_typeFilter", _type_filter("Observation", code=BP_PANEL)),
            ("_typeFilter", _type_filter("Patient", gender="female")),
        ])
    want = ({r["id"] for r in obs if _code(r) == GLUCOSE and r["effectiveDateTime"] >= "2015-01-01"}
            | {r["id"] for r in obs if _code(r) == BP_PANEL})
    assert want and _ids(files["Observation"]) == want
    females = {r["id"] for r in fixture_data["Patient"] if r["gender"] == "female"}
    assert females and _ids(files["Patient"]) == females
    # types without a filter are exported whole
    assert _ids(files["Condition"]) == _ids(fixture_data["Condition"])


def test_post_kickoff_equals_get(base, fixture_data):
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "_outputFormat", "valueString": "application/fhir+ndjson"},
        {"name": "_since", "valueInstant": "2000-01-01T00:00:00Z"},
        {"name": "_type", "valueString": "Observation"},
        {"name": "_type", "valueString": "Encounter"},
        {"name": "_typeFilter", "valueString": _type_filter("Observation", code=GLUCOSE)},
        {"name": "_typeFilter", "valueString": _type_filter("Encounter", patient="Patient/p01")},
    ]}
    with httpx.Client(timeout=30) as http:
        posted = run_export(http, "POST", f"{base}/$export", json=body)
        got = run_export(http, "GET", f"{base}/$export", params=[
            ("_outputFormat", "application/fhir+ndjson"), ("_since", "2000-01-01T00:00:00Z"),
            ("_type", "Observation,Encounter"),
            ("_typeFilter", _type_filter("Observation", code=GLUCOSE)),
            ("_typeFilter", _type_filter("Encounter", patient="Patient/p01"))])
    assert {t: _ids(v) for t, v in posted.items()} == {t: _ids(v) for t, v in got.items()}
    assert _ids(posted["Encounter"]) == {r["id"] for r in fixture_data["Encounter"]
                                         if r["subject"]["reference"] == "Patient/p01"}


def test_post_patient_parameter_limits_the_compartment(base, fixture_data):
    picked = ["p01", "p04"]
    body = {"resourceType": "Parameters", "parameter": [
        *({"name": "patient", "valueReference": {"reference": f"Patient/{p}"}} for p in picked),
        {"name": "_type", "valueString": "Patient,Condition"}]}
    with httpx.Client(timeout=30) as http:
        files = run_export(http, "POST", f"{base}/Patient/$export", json=body)
        group = run_export(http, "POST", f"{base}/Group/all/$export", json=body)
    assert _ids(files["Patient"]) == set(picked)
    assert _ids(files["Condition"]) == {r["id"] for r in fixture_data["Condition"]
                                        if r["subject"]["reference"].split("/")[-1] in picked}
    assert {t: _ids(v) for t, v in group.items()} == {t: _ids(v) for t, v in files.items()}


def _outcome(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    doc = r.json()
    assert doc["resourceType"] == "OperationOutcome"
    return doc["issue"][0]["diagnostics"] + " " + " ".join(doc["issue"][0].get("expression", []))


def test_kickoff_errors_name_the_parameter(base):
    url = f"{base}/$export"
    with httpx.Client(timeout=30) as http:
        msg = _outcome(http.get(url, params={"_typeFilter": "Observation?flavour=sweet"}, headers=ASYNC), 400)
        assert "flavour" in msg
        msg = _outcome(http.get(url, params={"_typeFilter": "Observation?_count=5"}, headers=ASYNC), 400)
        assert "_count" in msg
        msg = _outcome(http.get(url, params={"_typeFilter": "Observation?code:below=x"}, headers=ASYNC), 400)
        assert "code:below" in msg
        assert "date" in _outcome(http.get(url, params={"_typeFilter": "Observation?date=yesterday"},
                                           headers=ASYNC), 400)
        assert "TYPE?QUERY" in _outcome(http.get(url, params={"_typeFilter": "x"}, headers=ASYNC), 400)
        assert "Medication" in _outcome(http.get(url, params={"_typeFilter": "Medication?code=1"}, headers=ASYNC),
                                        400)
        assert "Group" in _outcome(http.get(f"{base}/Patient/$export", params={"_typeFilter": "Group?member=p01"},
                                            headers=ASYNC), 400)
        # POST bodies
        assert "Parameters" in _outcome(http.post(url, json={"resourceType": "Patient"}, headers=ASYNC), 400)
        assert "respond-async" in _outcome(http.post(url, json={"resourceType": "Parameters"}), 400)
        bad_ref = {"resourceType": "Parameters", "parameter": [{"name": "patient", "valueReference":
                                                                 {"reference": "Patient/nobody"}}]}
        assert "nobody" in _outcome(http.post(f"{base}/Patient/$export", json=bad_ref, headers=ASYNC), 400)
        assert "patient" in _outcome(http.post(url, json=bad_ref, headers=ASYNC), 400)  # system level: no patient
        bad_type = {"resourceType": "Parameters", "parameter": [{"name": "_type", "valueInteger": 3}]}
        assert "_type" in _outcome(http.post(url, json=bad_type, headers=ASYNC), 400)


def test_lenient_ignores_unknown_filter_parameters(base, fixture_data):
    with httpx.Client(timeout=30) as http:
        files = run_export(http, "GET", f"{base}/$export",
                           params={"_type": "Observation", "_typeFilter": "Observation?flavour=sweet"},
                           headers={"Prefer": "respond-async, handling=lenient"})
    assert _ids(files["Observation"]) == _ids(fixture_data["Observation"])
