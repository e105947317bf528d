"""`fhirsynth load` against a real HTTP server on 127.0.0.1 that enforces transaction semantics."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from load_helpers import operation_outcome

from fhirsynth.cli import main
from fhirsynth.errors import UsageError
from fhirsynth.export.bundles import iter_references, rewrite_refs
from fhirsynth.export.loader import load_export
from fhirsynth.export.writer import read_manifest, write_export
from fhirsynth.timeline.assembler import GeneratorInfo
from fhirsynth.timeline.samples import random_timelines

GEN = GeneratorInfo(model_hash="cd" * 32, epsilon=8.0, delta=1e-5, recorded="2026-03-04T05:06:07+00:00")



class FhirServer:
    """A tiny FHIR transaction endpoint: checks what HAPI would reject, stores resources by Type/id (PUT)."""

    def __init__(self, *, throttle_first: int = 1, token: str | None = None, reject_every: int = 0,
                 non_bundle_200: bool = False, max_updates: int | None = None) -> None:
        """reject_every=k: process entry by entry (HTTP 200 with a transaction-response) and reject every k-th
        entry with 422, as a server without atomic transactions does; non_bundle_200: answer 200 with an
        OperationOutcome and store nothing."""
        self.max_updates = max_updates  # like a server's limit on updates per transaction
        self.transactions = 0
        self.reject_every = reject_every
        self.non_bundle_200 = non_bundle_200
        self.entries_seen = 0
        self.store: dict[str, dict] = {}
        self.requests = 0
        self.throttled = 0
        self.throttle_first = throttle_first
        self.token = token
        self.max_in_flight = 0
        self._in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802 - http.server naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with server.lock:
                    server.requests += 1
                    server._in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server._in_flight)
                    throttle = server.throttled < server.throttle_first
                    if throttle:
                        server.throttled += 1
                try:
                    if self.path != "/fhir":
                        return self._send(404, operation_outcome(f"no endpoint {self.path}"))
                    if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                        return self._send(401, operation_outcome("missing or wrong bearer token"))
                    if throttle:
                        return self._send(429, operation_outcome("slow down"), {"Retry-After": "0"})
                    status, result = server.transact(json.loads(body))
                    self._send(status, result)
                finally:
                    with server.lock:
                        server._in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def transact(self, bundle: dict) -> tuple[int, dict]:
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
            return 400, operation_outcome("not a transaction Bundle")
        entries = bundle.get("entry") or []
        if self.max_updates is not None and len(entries) > self.max_updates:
            return 400, operation_outcome("Transaction contains more update operations than allowed")
        full_urls = {e.get("fullUrl") for e in entries}
        types = [e["resource"]["resourceType"] for e in entries]
        if "Patient" in types and types[0] != "Patient":
            return 400, operation_outcome("Patient must come first")
        for i, e in enumerate(entries):
            r, req = e["resource"], e.get("request") or {}
            if req.get("method") != "PUT" or req.get("url") != f"{r['resourceType']}/{r['id']}":
                return 400, operation_outcome(f"entry[{i}]: expected PUT {r['resourceType']}/{r['id']}")
            for ref in iter_references(r):
                if "?" in ref:
                    return 400, operation_outcome(f"entry[{i}]: conditional reference {ref} not supported")
                if ref not in full_urls and ref not in self.store:  # in this transaction, or stored before
                    return 400, operation_outcome(f"entry[{i}]: unresolvable reference {ref}")
        if self.non_bundle_200:
            return 200, operation_outcome("accepted (nothing stored)")
        # as a real server does: references to entries of the transaction now point where they were stored
        stored_as = {e["fullUrl"]: e["request"]["url"] for e in entries if e.get("fullUrl")}
        entries = [{**e, "resource": rewrite_refs(e["resource"], stored_as)} for e in entries]
        if self.reject_every:
            out = []
            with self.lock:
                for e in entries:
                    r = e["resource"]
                    self.entries_seen += 1
                    if self.entries_seen % self.reject_every == 0:
                        out.append({"response": {"status": "422 Unprocessable Entity",
                                                 "outcome": operation_outcome(f"{r['resourceType']} failed profile check")}})
                    else:
                        self.store[f"{r['resourceType']}/{r['id']}"] = r
                        out.append({"response": {"status": "201 Created"}})
            return 200, {"resourceType": "Bundle", "type": "transaction-response", "entry": out}
        with self.lock:  # all or nothing
            self.transactions += 1
            for e in entries:
                r = e["resource"]
                self.store[f"{r['resourceType']}/{r['id']}"] = r
        return 200, {"resourceType": "Bundle", "type": "transaction-response",
                     "entry": [{"response": {"status": "200 OK"}} for _ in entries]}

    def __enter__(self) -> FhirServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def export(tmp_path) -> Path:
    out = tmp_path / "tx"
    write_export(random_timelines(6, seed=4, edge_cases=True), out, fmt="transaction", generator=GEN)
    return out


def test_load_retries_429_and_is_idempotent(export):
    with FhirServer(throttle_first=1) as server:
        report = load_export(export, server.url, concurrency=3, retries=3, backoff=0.01)
        assert (report.loaded, report.failed, report.retries) == (6, 0, 1)
        stored = len(server.store)
        expected = sum(read_manifest(export)["extension"]["fhirsynth"]["resources"].values())
        assert stored == expected
        again = load_export(export, server.url, concurrency=2, retries=0)
        assert again.loaded == 6 and len(server.store) == stored  # PUT with ids: no duplicates
        assert 1 <= server.max_in_flight <= 3


def test_broken_bundle_reported_with_operation_outcome(export, capsys):
    manifest = read_manifest(export)
    victim = export / manifest["output"][2]["url"]
    bundle = json.loads(victim.read_bytes())
    bundle["entry"][1]["resource"]["subject"] = {"reference": "urn:uuid:00000000-0000-0000-0000-000000000000"}
    victim.write_text(json.dumps(bundle))
    with FhirServer(throttle_first=0) as server:
        report = load_export(export, server.url, retries=2, backoff=0.01)
        assert report.loaded == 5 and report.failed == 1
        failure = report.failures[0]
        assert failure["file"] == victim.name and failure["status"] == 400
        assert "unresolvable reference urn:uuid:00000000" in failure["message"]
        assert failure["attempts"] == 1  # 400 is not retried
        code = main(["load", str(export), "--url", server.url, "--retries", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "1 of 6 bundle(s) failed" in err and "unresolvable reference" in err and victim.name in err


def test_token_sent_and_retries_exhausted(export):
    with FhirServer(throttle_first=100, token="s3cret") as server:
        report = load_export(export, server.url, retries=1, token="s3cret", backoff=0.01, concurrency=1)
        assert report.failed == 6 and report.retries == 6
        assert all(f["status"] == 429 and "slow down" in f["message"] for f in report.failures)
    with FhirServer(throttle_first=0, token="s3cret") as server:
        report = load_export(export, server.url, retries=0, token="wrong")
        assert report.failed == 6 and "bearer token" in report.failures[0]["message"]
        assert main(["load", str(export), "--url", server.url, "--token", "s3cret"]) == 0


def test_unreachable_server_is_retried_then_failed(export):
    report = load_export(export, "http://127.0.0.1:9/fhir", retries=1, backoff=0.01, timeout=2)
    assert report.failed == 6 and report.loaded == 0 and report.retries == 6


@pytest.mark.parametrize("fmt", ["collection", "document"])
def test_collection_and_document_exports_load_whole(tmp_path, fmt):
    """Any data-holding Bundle loads: every resource of a collection or IPS document export is PUT under its own id,
    its references (urn:uuid fullUrls in the Bundle) resolved to stored resources."""
    out = tmp_path / fmt
    write_export(random_timelines(3, seed=9), out, fmt=fmt, profile="ips" if fmt == "document" else "us-core",
                 generator=GEN)
    files = sorted(p for p in out.glob("*.json") if p.name != "manifest.json")
    exported = {f"{e['resource']['resourceType']}/{e['resource']['id']}"
                for f in files for e in json.loads(f.read_text())["entry"]}
    with FhirServer(throttle_first=0, max_updates=20) as server:
        report = load_export(out, server.url, retries=0, max_entries=20)
        assert (report.loaded, report.failed) == (3, 0)
        assert set(server.store) == exported
        assert not [ref for r in server.store.values() for ref in iter_references(r) if ref not in server.store]
        # one Bundle file given directly, not a directory
        assert main(["load", str(files[0]), "--url", server.url, "--max-entries", "20"]) == 0


def test_bundles_that_hold_no_data_are_refused_with_the_reason(tmp_path, capsys):
    d = tmp_path / "msgs"
    d.mkdir()
    (d / "message.json").write_text(json.dumps({"resourceType": "Bundle", "type": "message", "entry": []}))
    (d / "history.json").write_text(json.dumps({"resourceType": "Bundle", "type": "history", "entry": []}))
    (d / "patient.json").write_text(json.dumps({"resourceType": "Patient", "id": "p"}))
    (d / "delete.json").write_text(json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": "Patient/p"}}]}))
    (d / "broken.json").write_text("{nope")
    report = load_export(d, "http://127.0.0.1:9/fhir", retries=0)
    assert report.loaded == 0 and report.failed == 5
    reasons = {f["file"]: f["message"] for f in report.failures}
    assert "'message' Bundle holds no data" in reasons["message.json"]
    assert "'history' Bundle holds no data" in reasons["history.json"]
    assert reasons["patient.json"] == "not a FHIR Bundle (resourceType 'Patient')"
    assert "is a DELETE" in reasons["delete.json"]
    assert reasons["broken.json"].startswith("invalid JSON")
    assert main(["load", str(d), "--url", "http://127.0.0.1:9/fhir", "--retries", "0"]) == 2
    assert "5 of 5 bundle(s) failed" in capsys.readouterr().err
    assert main(["load", str(d), "--url", "ftp://x"]) == 2


@pytest.mark.parametrize("with_manifest", [True, False])
def test_ndjson_export_loads_type_by_type(tmp_path, with_manifest):
    """An NDJSON export (ours, or a bare directory of Bulk Data files) loads stage by stage, Patient first and
    Provenance last, in transactions of at most --max-entries PUTs: the server (which checks every reference
    against what is stored) accepts everything, and a reload duplicates nothing."""
    out = tmp_path / "nd"
    write_export(random_timelines(6, seed=4, edge_cases=True), out, generator=GEN)
    expected = sum(read_manifest(out)["extension"]["fhirsynth"]["resources"].values())
    if not with_manifest:
        (out / "manifest.json").unlink()
    with FhirServer(throttle_first=0, max_updates=10) as server:
        report = load_export(out, server.url, retries=0, max_entries=10)
        assert report.failed == 0 and len(server.store) == expected
        assert report.loaded == server.transactions >= expected // 10
        assert main(["load", str(out), "--url", server.url, "--max-entries", "10"]) == 0
        assert len(server.store) == expected


def test_gzip_transaction_export_loads(tmp_path):
    out = tmp_path / "txgz"
    write_export(random_timelines(3, seed=9), out, fmt="transaction", generator=GEN, gzip=True)
    assert all(o["url"].endswith(".json.gz") for o in read_manifest(out)["output"])
    with FhirServer(throttle_first=0) as server:
        report = load_export(out, server.url)
        assert (report.loaded, report.failed) == (3, 0)
        assert sum(1 for k in server.store if k.startswith("Patient/")) == 3


def test_rejected_entries_inside_a_200_fail_the_load(export, capsys):
    """A server that processes entries one by one answers 200 while rejecting some: every rejected entry is a
    failure naming the resource, the status and the OperationOutcome text, and the command exits non-zero."""
    with FhirServer(throttle_first=0, reject_every=10) as server:
        report = load_export(export, server.url, retries=0, concurrency=1)
        # a failed transaction stops its file (later chunks would point at what it did not store): count what
        # the server saw
        rejected = server.entries_seen // 10
        assert len(server.store) == server.entries_seen - rejected
        failed_entries = [f for failure in report.failures for f in failure["entries"]]
        assert len(failed_entries) == rejected  # no silent losses
        assert all("HTTP 422" in f and "failed profile check" in f for f in failed_entries)
        assert report.loaded + report.failed == 6 and report.failed >= 1
        assert sum(n for (_, outcome), n in report.entries.items() if outcome == "failed") == rejected
        assert sum(n for (_, outcome), n in report.entries.items() if outcome == "created") == len(server.store)
        assert main(["load", str(export), "--url", server.url, "--retries", "0"]) == 2
    assert "failed profile check" in capsys.readouterr().err
    with FhirServer(throttle_first=0, reject_every=1) as server:  # every entry rejected: nothing stored
        report = load_export(export, server.url, retries=0)
        assert report.loaded == 0 and report.failed == 6 and not server.store


def test_200_without_transaction_response_is_not_success(export):
    with FhirServer(throttle_first=0, non_bundle_200=True) as server:
        report = load_export(export, server.url, retries=0)
        assert report.loaded == 0 and report.failed == 6
        assert "not a transaction-response Bundle" in report.failures[0]["message"]


def test_max_entries_splits_patients_for_a_server_with_an_update_limit(export, capsys):
    """A server that refuses transactions of more than 10 updates: without splitting every larger patient fails
    with the server's message; with --max-entries 10 everything loads, references resolve across the chunks
    (the server checks each one), and a reload adds nothing."""
    sizes = [len(json.loads((export / o["url"]).read_bytes())["entry"]) for o in read_manifest(export)["output"]]
    assert max(sizes) > 10
    expected = sum(read_manifest(export)["extension"]["fhirsynth"]["resources"].values())
    with FhirServer(throttle_first=0, max_updates=10) as server:
        whole = load_export(export, server.url, retries=0, max_entries=1000)
        assert whole.failed == sum(n > 10 for n in sizes)
        assert all("more update operations than allowed" in f["message"] for f in whole.failures)
        report = load_export(export, server.url, retries=0, max_entries=10)
        assert (report.loaded, report.failed) == (6, 0)
        assert len(server.store) == expected
        assert server.transactions >= sum(-(-n // 10) for n in sizes)
        # every Provenance target is stored: as Type/id (an earlier chunk) or its urn:uuid (the same chunk)
        stored_ids = {key.split("/", 1)[1] for key in server.store}
        provenance = [r for r in server.store.values() if r["resourceType"] == "Provenance"]
        targets = [t["reference"] for p in provenance for t in p["target"]]
        assert provenance and any(not t.startswith("urn:uuid:") for t in targets)  # some point at earlier chunks
        assert all(t in server.store or t.removeprefix("urn:uuid:") in stored_ids for t in targets)
        assert main(["load", str(export), "--url", server.url, "--max-entries", "10"]) == 0
        assert len(server.store) == expected  # PUT with ids: a reload duplicates nothing
    assert main(["load", str(export), "--url", "http://127.0.0.1:9/fhir", "--max-entries", "0"]) == 2
    assert "--max-entries" in capsys.readouterr().err


def test_ndjson_load_stops_after_a_failed_stage(tmp_path, capsys):
    """If the Patients cannot be stored, nothing that points at them is sent: one failure, the rest counted as
    not attempted, exit 2 saying so."""
    out = tmp_path / "nd"
    write_export(random_timelines(3, seed=2), out, generator=GEN)
    report = load_export(out, "http://127.0.0.1:9/fhir", retries=0)
    assert report.failed == 1 and report.loaded == 0 and report.not_attempted >= 3
    assert report.failures[0]["file"].startswith("Patient.ndjson")
    assert main(["load", str(out), "--url", "http://127.0.0.1:9/fhir", "--retries", "0"]) == 2
    assert "not sent after it" in capsys.readouterr().err


def test_a_failed_transaction_says_which_one_how_many_entries_failed_and_what_was_not_sent(tmp_path):
    out = tmp_path / "one"
    write_export(random_timelines(1, seed=4), out, fmt="transaction", generator=GEN)
    (bundle,) = [p for p in out.glob("*.json") if p.name != "manifest.json"]
    size = len(json.loads(bundle.read_text())["entry"])
    assert size > 12
    with FhirServer(throttle_first=0, reject_every=2) as server:  # entries 2 and 4 of the first transaction
        report = load_export(out, server.url, retries=3, max_entries=4, concurrency=1)
    (failure,) = report.failures
    assert failure["status"] == 200 and failure["attempts"] == 1  # a rejected entry is not retried
    assert failure["not_sent"] == size - 4
    assert failure["message"].startswith(f"transaction 1 of {-(-size // 4)} (4 entries): HTTP 200 but 2 entries "
                                         "failed: ")
    assert failure["message"].endswith(f"; {size - 4} later entries of the file not sent")
    assert len(failure["entries"]) == 2 and "; ".join(failure["entries"]) in failure["message"]
    with FhirServer(throttle_first=0, reject_every=4) as server:  # one entry: singular
        report = load_export(out, server.url, retries=0, max_entries=4)
    assert "HTTP 200 but 1 entry failed: " in report.failures[0]["message"]


def test_an_entry_that_cannot_be_sent_fails_before_any_request(tmp_path):
    d = tmp_path / "fwd"
    d.mkdir()
    # a batch with server-assigned ids cannot point at an entry of the same batch
    (d / "b.json").write_text(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:o", "resource": {"resourceType": "Observation", "subject": {"reference": "urn:uuid:q"}}},
        {"fullUrl": "urn:uuid:q", "resource": {"resourceType": "Observation"}}]}))
    with FhirServer(throttle_first=0) as server:
        report = load_export(d, server.url, retries=0, batch=True, ids="server")
        assert server.requests == 0
    (failure,) = report.failures
    assert failure["status"] is None and failure["attempts"] == 0
    assert failure["message"].startswith("Observation/(new) refers to urn:uuid:q, which is not stored yet")


@pytest.mark.parametrize("kwargs,where,text", [
    ({"concurrency": 0}, "--concurrency", "must be at least 1, got 0"),
    ({"retries": -1}, "--retries", "must be 0 or more, got -1"),
    ({"max_entries": 0}, "--max-entries", "must be at least 1, got 0"),
    ({"ids": "mine"}, "--ids", "unknown id mode 'mine' (choose from client, server, conditional)"),
    ({"url": "ftp://x"}, "--url", "expected an http(s) FHIR base URL, got 'ftp://x'"),
])
def test_bad_options_name_the_option_and_the_value(export, kwargs, where, text):
    kwargs = {"url": "http://127.0.0.1:9/fhir", **kwargs}
    with pytest.raises(UsageError) as err:
        load_export(export, kwargs.pop("url"), **kwargs)
    assert err.value.where == where and text in str(err.value)
