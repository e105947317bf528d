"""What `load` makes of each kind of answer, from a real HTTP server on 127.0.0.1 that answers what the test
scripts: the exact failure record, its message and its log line, for answers a strict or broken server gives."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from fhirsynth.export.loader import LoadReport, Sender, load_export
from fhirsynth.export.loadplan import Located


class ScriptedServer:
    """Answers every POST with (status, body bytes); records the requests' bodies."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status, self.body, self.seen = status, body, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):  # noqa: N802 - http.server naming
                server.seen.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0)))))
                self.send_response(server.status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    servers = []

    def start(status: int, body: dict | bytes) -> ScriptedServer:
        s = ScriptedServer(status, body if isinstance(body, bytes) else json.dumps(body).encode())
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def _outcome(text: str) -> dict:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid", "diagnostics": text}]}


def _bundle(n: int) -> dict:
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:{k}", "resource": {"resourceType": "Basic", "id": f"b{k}"},
         "request": {"method": "PUT", "url": f"Basic/b{k}"}} for k in range(n)]}


def _post(url: str, bundle: dict, names: list[str]) -> tuple[dict | None, LoadReport]:
    async def go():
        report = LoadReport()
        async with httpx.AsyncClient(timeout=10) as client:
            sender = Sender(client, url, 0, 0.0, report, Located(), "client", False, 50)
            failure, _ = await sender.post(bundle, names)
        return failure, report

    return asyncio.run(go())


def test_a_3xx_answer_is_a_failure_not_a_confirmation(scripted):
    server = scripted(300, _outcome("multiple choices"))
    failure, report = _post(server.url, _bundle(2), ["a", "b"])
    assert failure == {"status": 300, "message": "HTTP 300: multiple choices", "attempts": 1}
    assert report.entries == Counter()  # nothing read from a non-2xx answer


def test_entry_failures_use_the_callers_names_and_the_message_shows_five(scripted):
    entries = [{"response": {"status": "422 Unprocessable Entity", "outcome": _outcome(f"bad {k}")}} for k in range(6)]
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


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_network_error_is_named_by_its_type():
    failure, report = _post(f"http://127.0.0.1:{_closed_port()}/fhir", _bundle(1), ["Basic/b0"])
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
    server = scripted(422, _outcome("rejected"))
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
