"""What `load` makes of each kind of answer, from a real HTTP server on 127.0.0.1 that answers what the test
scripts: the exact failure record, its message and its log line, for answers a strict or broken server gives."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from load_helpers import operation_outcome
from serverproc import free_port

from fhirsynth.export.loader import LoadReport, Sender, load_export
from fhirsynth.export.loadplan import Located


class ScriptedServer:
    """Answers the POSTs in turn with the scripted (status, body bytes, headers), repeating the last; records each
    request's body and headers."""

    def __init__(self, answers: list[tuple[int, bytes, dict]]) -> None:
        self.answers, self.seen, self.headers, self.paths = answers, [], [], []
        self.delay = 0.0  # seconds to wait before answering
        self.in_flight = self.most_in_flight = 0  # requests being answered at once
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):  # noqa: N802 - http.server naming
                with lock:
                    server.seen.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0)))))
                    server.headers.append(dict(self.headers))
                    server.paths.append(self.path)
                    status, body, headers = server.answers[min(len(server.seen), len(server.answers)) - 1]
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                time.sleep(server.delay)
                with lock:
                    server.in_flight -= 1
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _bytes(body: dict | bytes) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


@pytest.fixture
def scripted():
    servers = []

    def start(status: int, body: dict | bytes, *later: tuple[int, dict | bytes, dict],
              headers: dict | None = None) -> ScriptedServer:
        """The first answer (status, body, headers), then the `later` ones in turn."""
        s = ScriptedServer([(status, _bytes(body), headers or {}), *[(st, _bytes(b), h) for st, b, h in later]])
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()



def _bundle(n: int) -> dict:
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:{k}", "resource": {"resourceType": "Basic", "id": f"b{k}"},
         "request": {"method": "PUT", "url": f"Basic/b{k}"}} for k in range(n)]}


def _post(url: str, bundle: dict, names: list[str], *, retries: int = 0, backoff: float = 0.0
          ) -> tuple[dict | None, LoadReport]:
    async def go():
        report = LoadReport()
        async with httpx.AsyncClient(timeout=10) as client:
            sender = Sender(client, url, retries, backoff, report, Located(), "client", False, 50)
            failure, _ = await sender.post(bundle, names)
        return failure, report

    return asyncio.run(go())


def test_a_3xx_answer_is_a_failure_not_a_confirmation(scripted):
    server = scripted(300, operation_outcome("multiple choices"))
    failure, report = _post(server.url, _bundle(2), ["a", "b"])
    assert failure == {"status": 300, "message": "HTTP 300: multiple choices", "attempts": 1}
    assert report.entries == Counter()  # nothing read from a non-2xx answer


def test_entry_failures_use_the_callers_names_and_the_message_shows_five(scripted):
    entries = [{"response": {"status": "422 Unprocessable Entity", "outcome": operation_outcome(f"bad {k}")}} for k in range(6)]
    server = scripted(200, {"resourceType": "Bundle", "type": "transaction-response", "entry": entries})
    names = [f"part.ndjson line {k + 1}" for k in range(6)]
    failure, report = _post(server.url, _bundle(6), names)
    every = [f"part.ndjson line {k + 1}: HTTP 422 Unprocessable Entity: bad {k}" for k in range(6)]
    assert failure == {"status": 200, "attempts": 1, "entries": every,
                       "message": "HTTP 200 but 6 entries failed: " + "; ".join(every[:5])}
    assert report.entries == Counter({(n, "failed"): 1 for n in names})  # counted under the names given


def test_a_2xx_answer_that_is_not_json_says_so(scripted):
    server = scripted(200, b"<html>ok</html>")
    failure, report = _post(server.url, _bundle(1), ["Basic/b0"])
    assert failure["message"] == ("HTTP 200 but 1 entry failed: 2xx answer is not a transaction-response Bundle "
                                  "(not JSON): nothing is confirmed stored")
    assert report.entries == Counter({("Basic", "unconfirmed"): 1})



def test_a_network_error_is_named_by_its_type():
    failure, report = _post(f"http://127.0.0.1:{free_port()}/fhir", _bundle(1), ["Basic/b0"])
    assert failure["status"] is None and failure["attempts"] == 1
    assert failure["message"].startswith("ConnectError: ")


def test_an_unreadable_bundle_file_is_one_failure_with_its_name_and_a_log_line(tmp_path: Path, scripted, caplog):
    server = scripted(200, {})
    (tmp_path / "bad.json").write_text("{not json")
    with caplog.at_level(logging.ERROR, logger="fhirsynth.export.loader"):
        report = load_export(tmp_path, server.url, retries=0)
    (failure,) = report.failures
    assert failure == {"file": "bad.json", "status": None, "message": failure["message"]}
    assert failure["message"].startswith("invalid JSON: ")
    assert (report.loaded, report.failed, server.seen) == (0, 1, [])
    assert [r.getMessage() for r in caplog.records] == [f"bad.json: {failure['message']}"]


def test_a_file_split_in_two_says_which_transaction_failed_and_logs_it(tmp_path: Path, scripted, caplog):
    server = scripted(422, operation_outcome("rejected"))
    doc = _bundle(3)
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with caplog.at_level(logging.ERROR, logger="fhirsynth.export.loader"):
        report = load_export(tmp_path, server.url, retries=0, max_entries=2)
    (failure,) = report.failures
    assert failure["message"] == ("transaction 1 of 2 (2 entries): HTTP 422: rejected; "
                                  "1 later entries of the file not sent")
    assert (failure["file"], failure["status"], failure["attempts"], failure["not_sent"]) == ("p.json", 422, 1, 1)
    assert len(server.seen) == 1 and report.failed == 1 and report.loaded == 0
    assert [r.getMessage() for r in caplog.records] == [
        f"p.json: failed after 1 attempt(s): {failure['message']}"]


def _response(n: int) -> dict:
    return {"resourceType": "Bundle", "type": "transaction-response",
            "entry": [{"response": {"status": "201 Created"}} for _ in range(n)]}


def test_retries_follow_retry_after_and_stop_after_the_last_allowed(scripted, caplog):
    """429 three times (Retry-After: 0), then 201: with 2 retries the third 429 is the end, each retry logged with
    its number and the server's delay, not the 30 s backoff."""
    slow = (429, operation_outcome("slow down"), {"Retry-After": "0"})
    server = scripted(*slow[:2], slow, slow, (200, _response(1), {}), headers=slow[2])
    with caplog.at_level(logging.DEBUG, logger="fhirsynth.export.loader"):
        failure, report = _post(server.url, _bundle(1), ["Basic/b0"], retries=2, backoff=30.0)
    assert failure == {"status": 429, "message": "HTTP 429: slow down", "attempts": 3}
    assert report.retries == 2 and len(server.seen) == 3
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG] == [
        "HTTP 429: slow down; retry 1 in 0.00s", "HTTP 429: slow down; retry 2 in 0.00s"]
    # one retry more and the fourth answer is the 201
    server = scripted(*slow[:2], slow, slow, (200, _response(1), {}), headers=slow[2])
    failure, report = _post(server.url, _bundle(1), ["Basic/b0"], retries=3, backoff=30.0)
    assert failure is None and report.retries == 3 and report.entries == Counter({("Basic", "created"): 1})


def test_requests_carry_the_fhir_media_type_and_the_token(tmp_path: Path, scripted):
    server = scripted(200, _response(1))
    (tmp_path / "p.json").write_text(json.dumps(_bundle(1)))
    report = load_export(tmp_path, server.url, retries=0, token="s3cret")
    assert report.loaded == 1
    (headers,) = server.headers
    headers = {k.lower(): v for k, v in headers.items()}
    assert headers["content-type"] == headers["accept"] == "application/fhir+json"
    assert headers["authorization"] == "Bearer s3cret"


def _patient_with_condition(pid: str, cid: str) -> dict:
    """A transaction Bundle: Patient/pid and Condition/cid about it, both PUT under their ids."""
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient", "id": pid},
         "request": {"method": "PUT", "url": f"Patient/{pid}"}},
        {"fullUrl": "urn:uuid:c", "resource": {"resourceType": "Condition", "id": cid,
                                                "subject": {"reference": "urn:uuid:p"}},
         "request": {"method": "PUT", "url": f"Condition/{cid}"}}]}


def _sent_types(server: ScriptedServer) -> list[str]:
    """The resource type of the first entry of each request the server saw."""
    return [e["entry"][0]["resource"]["resourceType"] for e in server.seen]


def test_a_batch_with_client_ids_is_one_request(tmp_path: Path, scripted):
    """--batch with client ids: every id is known, so the chunk goes as one batch (server ids would need one batch
    per dependency rank)."""
    (tmp_path / "p.json").write_text(json.dumps(_patient_with_condition("p", "c")))
    server = scripted(200, {"resourceType": "Bundle", "type": "batch-response",
                            "entry": [{"response": {"status": "201 Created"}}] * 2})
    report = load_export(tmp_path, server.url, retries=0, batch=True)
    assert report.loaded == 1 and len(server.seen) == 1
    (sent,) = server.seen
    assert sent["type"] == "batch" and [e["resource"]["resourceType"] for e in sent["entry"]] == ["Patient", "Condition"]


def test_a_failed_stage_stops_the_stages_after_it_and_says_how_many(tmp_path: Path, scripted, caplog):
    """NDJSON loads type by type; the Encounters (the middle stage) fail, so the Observations that point at them
    are not sent: one transaction not attempted, and the log says so."""
    rows = {"Patient": {"resourceType": "Patient", "id": "p"},
            "Encounter": {"resourceType": "Encounter", "id": "e", "status": "finished",
                          "class": {"code": "AMB"}, "subject": {"reference": "Patient/p"}},
            "Observation": {"resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "x"},
                            "subject": {"reference": "Patient/p"}, "encounter": {"reference": "Encounter/e"}}}
    for rtype, row in rows.items():
        (tmp_path / f"{rtype}.ndjson").write_text(json.dumps(row) + "\n")
    server = scripted(200, _response(1), (422, operation_outcome("no"), {}))
    with caplog.at_level(logging.ERROR, logger="fhirsynth.export.loader"):
        report = load_export(tmp_path, server.url, retries=0, concurrency=1)
    assert _sent_types(server) == ["Patient", "Encounter"]
    assert (report.loaded, report.failed, report.not_attempted) == (1, 1, 1)
    assert caplog.records[-1].getMessage() == "stopped after a failed stage: 1 later transaction(s) not sent"


def test_a_server_slower_than_the_timeout_is_a_failure_not_a_wait(tmp_path: Path, scripted):
    server = scripted(200, _response(1))
    server.delay = 3.0
    (tmp_path / "p.json").write_text(json.dumps(_bundle(1)))
    report = load_export(tmp_path, server.url, retries=0, timeout=0.3)
    assert (report.loaded, report.failed) == (0, 1)
    assert report.failures[0]["message"].startswith("ReadTimeout")


def test_a_trailing_slash_on_the_base_url_posts_to_the_base(tmp_path: Path, scripted):
    server = scripted(200, _response(1))
    (tmp_path / "p.json").write_text(json.dumps(_bundle(1)))
    report = load_export(tmp_path, server.url + "/", retries=0)
    assert report.loaded == 1 and server.paths == ["/fhir"]
    assert 0.0 <= report.seconds < 60.0  # the wall time of this load, not a clock reading


def test_an_https_url_is_accepted_and_a_failed_connection_is_reported(tmp_path: Path):
    (tmp_path / "p.json").write_text(json.dumps(_bundle(1)))
    report = load_export(tmp_path, f"https://127.0.0.1:{free_port()}/fhir", retries=0)
    assert (report.loaded, report.failed) == (0, 1) and report.failures[0]["message"].startswith("ConnectError")


def test_ndjson_with_client_ids_loads_what_is_referenced_first(tmp_path: Path, scripted):
    """Patients that name their managing Organization: the Organizations go first even with client ids, so a server
    that checks references on write finds them (the fixed order would put Patient first)."""
    (tmp_path / "Patient.ndjson").write_text(json.dumps(
        {"resourceType": "Patient", "id": "p", "managingOrganization": {"reference": "Organization/o"}}) + "\n")
    (tmp_path / "Organization.ndjson").write_text(json.dumps({"resourceType": "Organization", "id": "o"}) + "\n")
    server = scripted(200, _response(1))
    report = load_export(tmp_path, server.url, retries=0, concurrency=1)
    assert report.loaded == 2 and report.failed == 0
    assert _sent_types(server) == ["Organization", "Patient"]
    assert [e["entry"][0]["request"] for e in server.seen] == [
        {"method": "PUT", "url": "Organization/o"}, {"method": "PUT", "url": "Patient/p"}]


def test_a_manifest_output_without_a_type_takes_it_from_its_file(tmp_path: Path, scripted):
    """Bulk Data's `type` is required, but an export without it still loads in reference order: the file's own
    resources say it holds Patients, so they go before the Observations that point at them, whatever the manifest's
    order."""
    (tmp_path / "a.ndjson").write_text(json.dumps(
        {"resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "x"},
         "subject": {"reference": "Patient/p"}}) + "\n")
    (tmp_path / "b.ndjson").write_text(json.dumps({"resourceType": "Patient", "id": "p"}) + "\n")
    (tmp_path / "manifest.json").write_text(json.dumps({"output": [
        {"type": "Observation", "url": "a.ndjson"}, {"url": "b.ndjson"}]}))
    server = scripted(200, _response(1))
    report = load_export(tmp_path, server.url, retries=0, concurrency=1)
    assert report.loaded == 2 and _sent_types(server) == ["Patient", "Observation"]


def test_entry_failures_with_server_ids_name_each_resource_by_its_own_id(tmp_path: Path, scripted):
    """With server-assigned ids the POSTed resources carry no id; a rejected entry is still named by the id it has
    in the export, so the user can find it."""
    (tmp_path / "p.json").write_text(json.dumps(_patient_with_condition("p1", "c1")))
    server = scripted(200, {"resourceType": "Bundle", "type": "transaction-response", "entry": [
        {"response": {"status": "201 Created", "location": "Patient/9/_history/1"}},
        {"response": {"status": "422 Unprocessable Entity", "outcome": operation_outcome("no onset")}}]})
    report = load_export(tmp_path, server.url, retries=0, ids="server")
    (sent,) = server.seen
    assert [e["request"] for e in sent["entry"]] == [{"method": "POST", "url": "Patient"},
                                                     {"method": "POST", "url": "Condition"}]
    assert "id" not in sent["entry"][1]["resource"]
    assert report.failed == 1
    assert report.failures[0]["entries"] == ["Condition/c1: HTTP 422 Unprocessable Entity: no onset"]


def test_load_export_retries_five_times_by_default(tmp_path: Path, scripted):
    busy = (503, operation_outcome("busy"), {"Retry-After": "0"})
    server = scripted(*busy[:2], headers=busy[2])
    (tmp_path / "p.json").write_text(json.dumps(_bundle(1)))
    report = load_export(tmp_path, server.url)
    assert len(server.seen) == 6 and report.retries == 5
    assert report.failures[0]["attempts"] == 6 and report.failures[0]["status"] == 503


def test_load_export_sends_four_bundles_at_once_by_default(tmp_path: Path, scripted):
    server = scripted(200, _response(1))
    server.delay = 0.4  # long enough for every worker to have its request open
    for k in range(8):
        (tmp_path / f"p{k}.json").write_text(json.dumps(_bundle(1)))
    report = load_export(tmp_path, server.url, retries=0)
    assert report.loaded == 8 and server.most_in_flight == 4


def test_load_export_backs_off_half_a_second_by_default(tmp_path: Path, scripted, caplog, monkeypatch):
    """Without Retry-After the first retry waits backoff x 2^0 x a jitter in [0.5, 1.5); the jitter pinned to 1."""
    import fhirsynth.export.loader as loader

    monkeypatch.setattr(loader.random, "random", lambda: 0.5)
    server = scripted(503, operation_outcome("busy"), (200, _response(1), {}))
    (tmp_path / "p.json").write_text(json.dumps(_bundle(1)))
    with caplog.at_level(logging.DEBUG, logger="fhirsynth.export.loader"):
        report = load_export(tmp_path, server.url)
    assert report.loaded == 1 and report.retries == 1
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG] == [
        "HTTP 503: busy; retry 1 in 0.50s"]


def test_client_ids_need_no_location_for_an_entry_posted_without_an_id(tmp_path: Path, scripted):
    """Another generator's Bundle loaded with client ids: the entry without an id is POSTed, and an answer that says
    nothing of where it went is no failure (only a later transaction that points at it would need it, and that
    one is refused when prepared); with server ids the same answer fails the file."""
    doc = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient", "id": "p"},
         "request": {"method": "PUT", "url": "Patient/p"}},
        {"fullUrl": "urn:uuid:o", "resource": {"resourceType": "Observation", "status": "final",
                                                "code": {"text": "x"}, "subject": {"reference": "urn:uuid:p"}},
         "request": {"method": "POST", "url": "Observation"}}]}
    (tmp_path / "p.json").write_text(json.dumps(doc))
    server = scripted(200, {"resourceType": "Bundle", "type": "transaction-response",
                            "entry": [{"response": {"status": "201 Created"}}] * 2})
    report = load_export(tmp_path, server.url, retries=0)
    assert (report.loaded, report.failed) == (1, 0)
    assert [e["request"]["method"] for e in server.seen[0]["entry"]] == ["PUT", "POST"]
    report = load_export(tmp_path, server.url, retries=0, ids="server")
    assert (report.loaded, report.failed) == (0, 1)
    assert "location(s) unknown" in report.failures[0]["message"]
