"""The loader's pure parts with exact expectations (written against the survivors of the first mutation run,
MUTATION.md): reading a transaction-response, the OperationOutcome text, Retry-After, splitting, sources."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest

from fhirsynth.errors import LoadError, UsageError
from fhirsynth.export.loader import (
    MAX_BACKOFF_S,
    LoadReport,
    _retry_after,
    bundle_files,
    check_transaction_response,
    load_sources,
    outcome_text,
    split_transaction,
)


def _tx(*names: str) -> dict:
    entries = []
    for name in names:
        rtype, rid = name.split("/")
        entries.append({"fullUrl": f"urn:uuid:{rid}", "resource": {"resourceType": rtype, "id": rid},
                        "request": {"method": "PUT", "url": name}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _answer(*statuses: str, kind: str = "transaction-response", outcome: dict | None = None) -> dict:
    entries = []
    for s in statuses:
        response: dict = {"status": s}
        if outcome is not None and not s.startswith("2"):
            response["outcome"] = outcome
        entries.append({"response": response})
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


OUTCOME = {"resourceType": "OperationOutcome",
           "issue": [{"severity": "error", "code": "invalid", "diagnostics": "gender not in value set"},
                     {"severity": "error", "code": "required"}]}


def test_transaction_response_counts_each_outcome_per_type():
    failures, counts = check_transaction_response(
        _tx("Patient/p", "Encounter/e", "Observation/o", "Observation/q"),
        _answer("201 Created", "200 OK", "304 Not Modified", "200"))
    assert failures == []
    assert counts == Counter({("Patient", "created"): 1, ("Encounter", "updated"): 1,
                              ("Observation", "unchanged"): 1, ("Observation", "updated"): 1})


def test_failed_entries_name_resource_status_and_every_issue():
    failures, counts = check_transaction_response(_tx("Patient/p1", "Condition/c1"),
                                                  _answer("422 Unprocessable Entity", "201 Created", outcome=OUTCOME))
    assert failures == ["Patient/p1: HTTP 422 Unprocessable Entity: gender not in value set; required"]
    assert counts == Counter({("Patient", "failed"): 1, ("Condition", "created"): 1})
    failures, _ = check_transaction_response(_tx("Patient/p1"), {"resourceType": "Bundle", "type": "batch-response",
                                                                 "entry": [{"response": {}}]})
    assert failures == ["Patient/p1: HTTP (no status): no OperationOutcome"]


@pytest.mark.parametrize("answer", [
    {"resourceType": "OperationOutcome", "issue": []},
    {"resourceType": "Bundle", "type": "searchset", "entry": []},
    None,
    ["not", "a", "bundle"],
])
def test_an_answer_that_is_no_transaction_response_confirms_nothing(answer):
    failures, counts = check_transaction_response(_tx("Patient/p", "Encounter/e"), answer)
    kind = {dict: lambda: answer["resourceType"], type(None): lambda: "not JSON", list: lambda: "list"}[type(answer)]()
    assert failures == [f"2xx answer is not a transaction-response Bundle ({kind}): nothing is confirmed stored"]
    assert counts == Counter({("Patient", "unconfirmed"): 1, ("Encounter", "unconfirmed"): 1})


def test_batch_response_is_read_like_a_transaction_response():
    failures, counts = check_transaction_response(_tx("Patient/p"), _answer("201 Created", kind="batch-response"))
    assert failures == [] and counts == Counter({("Patient", "created"): 1})


def test_entry_count_mismatch_confirms_nothing():
    failures, counts = check_transaction_response(_tx("Patient/p", "Encounter/e"), _answer("201 Created"))
    assert failures == ["transaction-response has 1 entries for 2 sent"]
    assert counts == Counter({("Patient", "unconfirmed"): 1, ("Encounter", "unconfirmed"): 1})


def test_outcome_text_uses_diagnostics_details_code_and_location():
    doc = {"resourceType": "OperationOutcome", "issue": [
        {"diagnostics": "bad gender", "expression": ["Patient.gender"]},
        {"details": {"text": "unknown code"}, "location": ["Bundle.entry[1]", "x"]},
        {"code": "processing"}, {}]}
    r = httpx.Response(400, json=doc)
    assert outcome_text(r) == "bad gender (Patient.gender); unknown code (Bundle.entry[1], x); processing"
    long_body = " upstream\nbroke " + "x" * 400
    assert outcome_text(httpx.Response(502, text=long_body)) == ("upstream broke " + "x" * 400)[:300]
    assert outcome_text(httpx.Response(503, text="")) == "Service Unavailable"
    assert outcome_text(httpx.Response(400, json={"resourceType": "OperationOutcome", "issue": [{}]})) == \
        '{"resourceType":"OperationOutcome","issue":[{}]}'


def test_retry_after_seconds_date_and_backoff():
    def resp(value: str | None) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": value} if value is not None else {})

    assert _retry_after(resp("7"), 0, 0.5) == 7.0
    assert _retry_after(resp("-3"), 0, 0.5) == 0.0
    assert _retry_after(resp("9999"), 0, 0.5) == MAX_BACKOFF_S
    soon = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 <= _retry_after(resp(soon), 0, 0.5) <= 30
    past = format_datetime(datetime.now(timezone.utc) - timedelta(seconds=30), usegmt=True)
    assert _retry_after(resp(past), 3, 0.5) == 0.0  # a date gone by: retry now, not after a backoff
    for attempt in range(4):  # exponential with jitter in [0.5, 1.5) x base x 2^attempt
        delay = _retry_after(resp(None), attempt, 0.5)
        assert 0.25 * 2**attempt <= delay < 0.75 * 2**attempt
    assert _retry_after(None, 20, 0.5) == MAX_BACKOFF_S
    assert 0.25 <= _retry_after(resp("soon"), 0, 0.5) < 0.75  # unparseable: backoff


def test_split_orders_patient_first_provenance_last_and_rewrites_earlier_references():
    tx = _tx("Provenance/v", "Observation/o", "Encounter/e", "Patient/p", "Condition/c")
    tx["entry"][1]["resource"]["subject"] = {"reference": "urn:uuid:p"}
    tx["entry"][1]["resource"]["encounter"] = {"reference": "urn:uuid:e"}
    tx["entry"][0]["resource"]["target"] = [{"reference": "urn:uuid:o"}, {"reference": "urn:uuid:p"}]
    chunks = split_transaction(tx, 2)
    order = [[e["request"]["url"] for e in c["entry"]] for c in chunks]
    assert order == [["Patient/p", "Encounter/e"], ["Observation/o", "Condition/c"], ["Provenance/v"]]
    obs = chunks[1]["entry"][0]["resource"]
    assert obs["subject"]["reference"] == "Patient/p" and obs["encounter"]["reference"] == "Encounter/e"
    assert [t["reference"] for t in chunks[2]["entry"][0]["resource"]["target"]] == ["Observation/o", "Patient/p"]
    assert all(c["type"] == "transaction" for c in chunks)
    (whole,) = split_transaction(tx, 5)  # small enough: one transaction, references left to the server
    assert [e["request"]["url"] for e in whole["entry"]] == ["Patient/p", "Encounter/e", "Observation/o",
                                                            "Condition/c", "Provenance/v"]
    assert sorted(map(json.dumps, (e["resource"] for e in whole["entry"]))) == \
        sorted(map(json.dumps, (e["resource"] for e in tx["entry"])))
    batch = split_transaction(tx, 5, batch=True)
    assert len(batch) == 1 and batch[0]["type"] == "batch"
    assert batch[0]["entry"][0]["request"]["url"] == "Patient/p"
    assert "urn:uuid:" not in json.dumps([e["resource"] for e in batch[0]["entry"]])  # no reference left as one


def test_sources_of_each_export_layout(tmp_path: Path):
    with pytest.raises(UsageError):
        load_sources(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="no transaction Bundles or NDJSON"):
        load_sources(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{nope")
    with pytest.raises(LoadError, match="invalid manifest.json"):
        load_sources(bad)
    nd = tmp_path / "nd"
    nd.mkdir()
    (nd / "Observation.ndjson").write_text(json.dumps({"resourceType": "Observation", "id": "o"}) + "\n")
    (nd / "Patient.ndjson").write_text("\n" + json.dumps({"resourceType": "Patient", "id": "p"}) + "\n")
    kind, files = load_sources(nd)
    assert kind == "ndjson" and [f.rtype for f in files] == ["Patient", "Observation"]
    tx = tmp_path / "tx"
    tx.mkdir()
    (tx / "b.json").write_text(json.dumps(_tx("Patient/p")))
    (tx / ".hidden.json").write_text("{}")
    assert load_sources(tx) == ("bundles", [tx / "b.json"])
    # bundle_files (bench_load_medplum's input): the Bundles of a Bundle export, and a clear no for NDJSON
    (tx / "a.json").write_text(json.dumps(_tx("Patient/q")))
    (tx / "manifest.json").write_text(json.dumps({"output": [{"type": "Bundle", "url": "b.json"},
                                                              {"type": "Bundle", "url": "a.json"}]}))
    assert bundle_files(tx) == [tx / "b.json", tx / "a.json"]  # manifest order
    _raises(lambda: bundle_files(nd), LoadError, "not a Bundle export (it holds NDJSON)", str(nd))


def test_posts_count_as_created_or_existing_and_other_2xx_as_stored():
    tx = _tx("Patient/p", "Encounter/e", "Observation/o", "Observation/q", "Condition/c", "Condition/d")
    for entry, method in zip(tx["entry"], ["POST", "post", "PUT", None, "POST", "PUT"]):
        entry["request"] = {"method": method, "url": entry["resource"]["resourceType"]} if method else {}
    failures, counts = check_transaction_response(
        tx, _answer("201 Created", "200 OK", "200 OK", "202 Accepted", "300 Multiple Choices", "304"),
        names=["Patient/new", "Encounter/new", "Observation/o", "Observation/q", "Condition/x", "Condition/d"])
    assert failures == ["Condition/x: HTTP 300 Multiple Choices: no OperationOutcome"]
    assert counts == Counter({("Patient", "created"): 1, ("Encounter", "existing"): 1, ("Observation", "updated"): 1,
                              ("Observation", "stored"): 1, ("Condition", "failed"): 1,
                              ("Condition", "unchanged"): 1})
    report = LoadReport()
    report.entries.update(counts)
    assert report.by_type() == {"Condition": {"failed": 1, "unchanged": 1}, "Encounter": {"existing": 1},
                                "Observation": {"stored": 1, "updated": 1}, "Patient": {"created": 1}}
    outcome = {"issue": [{"details": {"text": "from details"}}, {"code": "invalid"}]}
    failures, _ = check_transaction_response(_tx("Patient/p"), _answer("400 Bad Request", outcome=outcome))
    assert failures == ["Patient/p: HTTP 400 Bad Request: from details; invalid"]


def _raises(call, kind, message: str, where: str):
    with pytest.raises(kind) as info:
        call()
    assert (info.value.message, info.value.where) == (message, where)


def test_bad_export_directories_say_what_and_where(tmp_path: Path):
    _raises(lambda: load_sources(tmp_path / "missing"), UsageError, "no such file or directory",
            str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    _raises(lambda: load_sources(tmp_path / "empty"), LoadError, "no transaction Bundles or NDJSON files found",
            str(tmp_path / "empty"))
    for name, text, message in (
            ("broken", "{nope", "invalid manifest.json: "),
            ("listed", "[1, 2]", "manifest.json is not a JSON object"),
            ("alien", json.dumps({"extension": {"fhirsynth": {"format": "xml"}}, "output": []}),
             "unknown export format 'xml' (a fhirsynth export is one of "),
    ):
        d = tmp_path / name
        d.mkdir()
        (d / "manifest.json").write_text(text)
        with pytest.raises(LoadError) as info:
            load_sources(d)
        assert info.value.message.startswith(message) and info.value.where == str(d / "manifest.json"), name


def test_a_single_file_and_a_manifest_of_each_kind(tmp_path: Path):
    one = tmp_path / "Patient.ndjson"
    one.write_text(json.dumps({"resourceType": "Patient", "id": "p"}) + "\n")
    kind, files = load_sources(one)
    assert kind == "ndjson" and [(f.path, f.rtype) for f in files] == [(one, "Patient")]
    bundle = tmp_path / "b.json"
    bundle.write_text(json.dumps(_tx("Patient/p")))
    assert load_sources(bundle) == ("bundles", [bundle])
    # a manifest names the files: its Bundles in its order, whatever else the directory holds
    d = tmp_path / "exp"
    d.mkdir()
    for n in ("z.json", "a.json", "stray.json"):
        (d / n).write_text(json.dumps(_tx("Patient/p")))
    (d / "manifest.json").write_text(json.dumps({
        "extension": {"fhirsynth": {"format": "transaction"}},
        "output": [{"type": "Bundle", "url": "z.json"}, {"type": "Bundle", "url": "a.json"}, {"url": ""}]}))
    assert load_sources(d) == ("bundles", [d / "z.json", d / "a.json"])
    # a Bulk Data manifest of NDJSON outputs; an output without a url names no file
    bulk = tmp_path / "bulk"
    bulk.mkdir()
    (bulk / "p.ndjson").write_text(json.dumps({"resourceType": "Patient", "id": "p"}) + "\n")
    (bulk / "q.ndjson").write_text(json.dumps({"resourceType": "Patient", "id": "q"}) + "\n")
    (bulk / "empty.ndjson").write_text("")
    (bulk / "manifest.json").write_text(json.dumps({"output": [
        {"type": "Observation", "url": "empty.ndjson"}, {"type": "Patient", "url": "p.ndjson"},
        {"url": "q.ndjson"}, {"type": "Observation"}]}))
    kind, files = load_sources(bulk)
    # the manifest's type where it gives one (an empty file has no first line to read it from), else the first line
    assert kind == "ndjson" and [(f.path, f.rtype) for f in files] == [
        (bulk / "p.ndjson", "Patient"), (bulk / "q.ndjson", "Patient"), (bulk / "empty.ndjson", "Observation")]


def test_a_directory_of_gzipped_bundles_without_a_manifest(tmp_path: Path):
    import gzip

    (tmp_path / "b.json.gz").write_bytes(gzip.compress(json.dumps(_tx("Patient/p")).encode()))
    (tmp_path / "notes.txt").write_text("not a Bundle")
    assert load_sources(tmp_path) == ("bundles", [tmp_path / "b.json.gz"])
