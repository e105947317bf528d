"""`load --ids server|conditional` against a loopback FHIR server that assigns ids, as a server does for a user who
may not choose them: POST entries get new ids, urn:uuid references inside a transaction are resolved by the server,
If-None-Exist finds what an earlier load stored, and each entry's answer says where it went (response.location, or
only the returned resource, as the `answer` option picks). Every reference must resolve when it arrives, so a
loader that sends an old id, a urn of another transaction or an unstored resource fails here. The same paths are
tested against Medplum in test_load_medplum.py; this server is fast enough for the mutation runner."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl

import pytest
from load_helpers import operation_outcome

from fhirsynth.export.bundles import iter_references, rewrite_refs
from fhirsynth.export.loader import load_export
from fhirsynth.export.writer import write_export
from fhirsynth.timeline.assembler import GeneratorInfo
from fhirsynth.timeline.samples import random_timelines

GEN = GeneratorInfo(model_hash="ef" * 32, epsilon=8.0, delta=1e-5, recorded="2026-03-04T05:06:07+00:00")



class AssigningServer:
    """A FHIR endpoint for transaction and batch Bundles that chooses every POSTed resource's id.

    answer: "location" (response.location Type/id/_history/1), "absolute" (the same as an absolute URL),
    "resource" (no location, the stored resource in entry.resource) or "none" (neither: the loader cannot know)."""

    def __init__(self, answer: str = "location") -> None:
        self.answer = answer
        self.store: dict[str, dict] = {}
        self.next_id = 0
        self.posts = 0
        self.bundles: list[dict] = []  # each Bundle received
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802 - http.server naming
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with server.lock:
                    server.posts += 1
                    server.bundles.append(body)
                    status, result = server.process(body)
                data = json.dumps(result).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    # ------------------------------------------------------------ FHIR semantics

    def _match(self, rtype: str, query: str, pending: dict[str, dict]) -> list[str]:
        """Type/ids the If-None-Exist search finds: identifier=system|value, or a Provenance's target + agent-type."""
        params = dict(parse_qsl(query))
        found = []
        for name, r in {**self.store, **pending}.items():
            if r["resourceType"] != rtype:
                continue
            if "identifier" in params:
                system, _, value = params["identifier"].partition("|")
                if any(i.get("system") == system and i.get("value") == value for i in r.get("identifier") or []):
                    found.append(name)
            elif "target" in params and "agent-type" in params:
                targets = {t.get("reference") for t in r.get("target") or []}
                agents = {f"{c.get('system')}|{c.get('code')}" for a in r.get("agent") or []
                          for c in (a.get("type") or {}).get("coding") or []}
                if params["target"] in targets and params["agent-type"] in agents:
                    found.append(name)
            else:
                raise ValueError(f"unsupported If-None-Exist {query!r}")
        return found

    def _new_name(self, rtype: str) -> str:
        self.next_id += 1
        return f"{rtype}/srv{self.next_id}"

    def _response(self, name: str, status: str, resource: dict) -> dict:
        if self.answer == "location":
            return {"response": {"status": status, "location": f"{name}/_history/1"}}
        if self.answer == "absolute":
            return {"response": {"status": status, "location": f"{self.url}/{name}/_history/1"}}
        if self.answer == "resource":
            return {"response": {"status": status}, "resource": resource}
        return {"response": {"status": status}}

    def process(self, bundle: dict) -> tuple[int, dict]:
        kind = bundle.get("type")
        if bundle.get("resourceType") != "Bundle" or kind not in ("transaction", "batch"):
            return 400, operation_outcome("not a transaction or batch Bundle")
        if kind == "batch":
            return 200, {"resourceType": "Bundle", "type": "batch-response",
                         "entry": [self._one(e, {}, {}, batch=True) for e in bundle.get("entry") or []]}
        # a transaction: assign every entry's place first (references between its entries resolve to them), then
        # check and store all of it or nothing
        pending: dict[str, dict] = {}
        full_urls: dict[str, str] = {}
        plan = []
        for e in bundle.get("entry") or []:
            req, r = e.get("request") or {}, e["resource"]
            if req.get("method") == "PUT":
                return 403, operation_outcome("this user may not choose ids (PUT)")
            query = req.get("ifNoneExist")
            found = self._match(r["resourceType"], query, pending) if query else []
            if len(found) > 1:
                return 412, operation_outcome(f"If-None-Exist {query} matches {len(found)} resources")
            name = found[0] if found else self._new_name(r["resourceType"])
            full_urls[e["fullUrl"]] = name
            plan.append((name, r, bool(found)))
            if not found:
                pending[name] = r
        out, stored = [], {}
        for i, (name, r, existing) in enumerate(plan):
            if existing:
                out.append(self._response(name, "200 OK", self.store[name]))
                continue
            r = {**rewrite_refs(r, full_urls), "id": name.split("/")[1]}
            for ref in iter_references(r):
                if ref not in self.store and ref not in pending:
                    return 400, operation_outcome(f"entry[{i}]: unresolvable reference {ref}")
            stored[name] = r
            out.append(self._response(name, "201 Created", r))
        self.store.update(stored)
        return 200, {"resourceType": "Bundle", "type": "transaction-response", "entry": out}

    def _one(self, e: dict, pending: dict, full_urls: dict, *, batch: bool) -> dict:
        """A batch entry on its own: a reference must point at something stored already."""
        req, r = e.get("request") or {}, e["resource"]
        if req.get("method") == "PUT":
            return {"response": {"status": "403 Forbidden", "outcome": operation_outcome("may not choose ids")}}
        query = req.get("ifNoneExist")
        found = self._match(r["resourceType"], query, {}) if query else []
        if found:
            return self._response(found[0], "200 OK", self.store[found[0]])
        for ref in iter_references(r):
            if ref not in self.store:
                return {"response": {"status": "404 Not Found", "outcome": operation_outcome(f"unresolvable reference {ref}")}}
        name = self._new_name(r["resourceType"])
        self.store[name] = {**r, "id": name.split("/")[1]}
        return self._response(name, "201 Created", self.store[name])

    @property
    def sizes(self) -> list[int]:
        """Entries of each Bundle received."""
        return [len(b.get("entry") or []) for b in self.bundles]

    def counts(self) -> Counter:
        return Counter(r["resourceType"] for r in self.store.values())

    def dangling(self) -> list[tuple[str, str]]:
        return sorted((n, ref) for n, r in self.store.items() for ref in iter_references(r) if ref not in self.store)

    def __enter__(self) -> AssigningServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _export(out: Path, fmt: str = "transaction", n: int = 4, seed: int = 31) -> tuple[Counter, set[str]]:
    """Writes an export; returns its resource counts per type and its Type/ids."""
    write_export(random_timelines(n, seed=seed), out, fmt=fmt, profile="us-core", seed=seed, generator=GEN)
    names: set[str] = set()
    if fmt == "ndjson":
        for f in out.glob("*.ndjson"):
            names |= {f"{r['resourceType']}/{r['id']}" for r in map(json.loads, f.read_text().splitlines())}
    else:
        for f in out.glob("*.json"):
            if f.name != "manifest.json":
                names |= {f"{e['resource']['resourceType']}/{e['resource']['id']}"
                          for e in json.loads(f.read_text())["entry"]}
    return Counter(n.split("/")[0] for n in names), names


def _files(out: Path) -> int:
    return sum(1 for f in out.glob("*.json") if f.name != "manifest.json")


@pytest.mark.parametrize("ids", ["server", "conditional"])
@pytest.mark.parametrize("answer", ["location", "absolute", "resource"])
def test_server_assigned_ids_store_everything_with_resolving_references(tmp_path, ids, answer):
    """Chunks of 7 entries: most references cross transactions, so each must be rewritten to the id the server gave
    the earlier chunk's resource, however the answer says it."""
    expected, exported = _export(tmp_path / "x")
    with AssigningServer(answer) as server:
        report = load_export(tmp_path / "x", server.url, ids=ids, max_entries=7, retries=0)
    assert report.failed == 0 and report.failures == [] and report.loaded == _files(tmp_path / "x")
    assert server.counts() == expected
    assert server.dangling() == []
    assert not exported & server.store.keys()  # the server chose every id
    assert report.by_type() == {t: {"created": n} for t, n in sorted(expected.items())}
    assert report.unconditional == 0  # every fhirsynth resource has an identifier (or is a matchable Provenance)
    assert server.posts >= sum(expected.values()) / 7


def test_batch_with_server_ids_stores_what_is_referenced_first(tmp_path):
    expected, _ = _export(tmp_path / "b")
    with AssigningServer() as server:
        report = load_export(tmp_path / "b", server.url, ids="server", batch=True, retries=0)
    assert report.failed == 0 and server.counts() == expected and server.dangling() == []
    assert report.by_type() == {t: {"created": n} for t, n in sorted(expected.items())}


def test_conditional_reload_stores_nothing_twice_and_server_mode_duplicates(tmp_path):
    expected, _ = _export(tmp_path / "c", n=3)
    with AssigningServer() as server:
        first = load_export(tmp_path / "c", server.url, ids="conditional", max_entries=5, retries=0)
        once = json.loads(json.dumps(server.store))
        again = load_export(tmp_path / "c", server.url, ids="conditional", max_entries=5, retries=0)
        assert first.failed == 0 and again.failed == 0
        assert server.store == once  # nothing written the second time
        assert again.by_type() == {t: {"existing": n} for t, n in sorted(expected.items())}
        twice = load_export(tmp_path / "c", server.url, ids="server", retries=0)
        assert twice.failed == 0 and server.counts() == Counter({t: 2 * n for t, n in expected.items()})
        assert server.dangling() == []


@pytest.mark.parametrize("ids", ["server", "conditional"])
def test_ndjson_with_server_ids_loads_in_reference_order(tmp_path, ids):
    expected, exported = _export(tmp_path / "nd", fmt="ndjson")
    with AssigningServer() as server:
        report = load_export(tmp_path / "nd", server.url, ids=ids, max_entries=6, retries=0)
    assert report.failed == 0 and report.not_attempted == 0
    assert server.counts() == expected and server.dangling() == [] and not exported & server.store.keys()


def test_an_answer_without_location_or_resource_fails_the_load_naming_it(tmp_path, capsys):
    _export(tmp_path / "n", n=2)
    with AssigningServer("none") as server:
        report = load_export(tmp_path / "n", server.url, ids="server", max_entries=4, retries=0)
    assert report.loaded == 0 and report.failed == _files(tmp_path / "n")
    message = report.failures[0]["message"]
    assert "location(s) unknown, so later references cannot be resolved" in message
    assert "the server's answer says neither its location nor its id" in message
    assert "transaction 1 of" in message and report.failures[0]["not_sent"] > 0
    assert report.failures[0]["status"] is None and report.failures[0]["attempts"] == 1  # stored, not refused


def test_resources_without_identifier_are_posted_unconditionally_and_counted(tmp_path):
    """Another generator's Bundle (no identifiers): conditional mode cannot match them, says how many, stores them."""
    patient = {"resourceType": "Patient", "name": [{"family": "Doe"}]}
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
           "subject": {"reference": "urn:uuid:00000000-0000-4000-8000-000000000001"}}
    tagged = {"resourceType": "Observation", "status": "final", "code": {"text": "y"},
              "identifier": [{"system": "urn:other", "value": "o-1"}],
              "subject": {"reference": "urn:uuid:00000000-0000-4000-8000-000000000001"}}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000001", "resource": patient,
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000002", "resource": obs,
         "request": {"method": "POST", "url": "Observation"}},
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000003", "resource": tagged,
         "request": {"method": "POST", "url": "Observation"}}]}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "one.json").write_text(json.dumps(bundle))
    with AssigningServer() as server:
        report = load_export(tmp_path / "other", server.url, ids="conditional", retries=0)
        # one entry per transaction: the count adds up over transactions
        again = load_export(tmp_path / "other", server.url, ids="conditional", retries=0, max_entries=1)
    assert report.failed == 0 and report.unconditional == 2 and again.unconditional == 2
    # the one with an identifier is found again; the two without are stored a second time
    assert server.counts() == Counter({"Patient": 2, "Observation": 3}) and server.dangling() == []
    assert again.by_type() == {"Observation": {"created": 1, "existing": 1}, "Patient": {"created": 1}}


def test_unknown_locations_are_named_three_at_most(tmp_path):
    """The failure message names the first three entries whose location the answer does not give, then stops."""
    _export(tmp_path / "n", n=2)
    with AssigningServer("none") as server:
        report = load_export(tmp_path / "n", server.url, ids="server", max_entries=6, retries=0)
    message = report.failures[0]["message"]
    unknown = int(re.search(r"stored, but (\d+) location\(s\) unknown", message).group(1))
    assert unknown >= 4
    tail = message.split("later references cannot be resolved: ", 1)[1]
    named = re.sub(r"; \d+ later entries of the file not sent$", "", tail).split("; ")
    assert len(named) == 3
    assert all(re.fullmatch(r"[A-Za-z]+/[\w.-]+: the server's answer says neither its location nor its id", n)
               for n in named), named


def test_conditional_mode_sends_eight_entries_at_most_by_default_and_server_mode_fifty(tmp_path):
    """Without --max-entries: conditional creates need serializable isolation, which servers cap lower (Medplum: 8);
    server mode keeps the default 50 for the export's own entries (fhirsynth's Bundles carry no If-None-Exist)."""
    expected, _ = _export(tmp_path / "d", n=2)
    with AssigningServer() as server:
        report = load_export(tmp_path / "d", server.url, ids="conditional", retries=0)
    assert report.failed == 0 and server.counts() == expected
    assert max(server.sizes) == 8 and len(server.sizes) > _files(tmp_path / "d")
    with AssigningServer() as server:
        report = load_export(tmp_path / "d", server.url, ids="server", retries=0)
    assert report.failed == 0 and server.counts() == expected
    assert max(server.sizes) == 50 and all(n <= 50 for n in server.sizes)
    with AssigningServer() as server:  # a batch has no serializable transaction: the default stays 50
        report = load_export(tmp_path / "d", server.url, ids="conditional", batch=True, retries=0)
    assert report.failed == 0 and server.counts() == expected and max(server.sizes) > 8


def test_conditional_bundles_send_provenance_once_its_patient_is_stored(tmp_path):
    """A whole patient fits one transaction, yet its Provenance goes in a transaction of its own after it: its
    If-None-Exist names the Patient by the id the server gave it, so a reload finds it instead of copying it."""
    expected, _ = _export(tmp_path / "p", n=1)
    with AssigningServer() as server:
        report = load_export(tmp_path / "p", server.url, ids="conditional", max_entries=1000, retries=0)
        again = load_export(tmp_path / "p", server.url, ids="conditional", max_entries=1000, retries=0)
    assert report.failed == 0 and report.unconditional == 0 and server.counts() == expected
    first, last = server.bundles[0], server.bundles[1]
    assert "Provenance" not in {e["resource"]["resourceType"] for e in first["entry"]}
    assert [e["resource"]["resourceType"] for e in last["entry"]] == ["Provenance"] * expected["Provenance"]
    patient = next(n for n, r in server.store.items() if r["resourceType"] == "Patient")
    assert all(e["request"]["ifNoneExist"].startswith(f"target={patient}&agent-type=") for e in last["entry"])
    assert again.by_type() == {t: {"existing": n} for t, n in sorted(expected.items())}


def test_ndjson_with_server_ids_refuses_a_reference_to_an_exported_resource_it_lacks(tmp_path):
    """An Observation that points at Patient/ghost, which the export's Patient file does not hold: with
    server-assigned ids the server would read `Patient/ghost` as one of its own, so the transaction is refused
    before it is sent, saying why; what it does not touch loads."""
    (tmp_path / "Patient.ndjson").write_text(json.dumps({"resourceType": "Patient", "id": "p"}) + "\n")
    obs = [{"resourceType": "Observation", "id": f"o{k}", "status": "final", "code": {"text": "x"},
            "subject": {"reference": f"Patient/{who}"}} for k, who in enumerate(["p", "ghost"])]
    (tmp_path / "Observation.ndjson").write_text("".join(json.dumps(o) + "\n" for o in obs))
    with AssigningServer() as server:
        report = load_export(tmp_path, server.url, ids="server", retries=0)
    assert server.counts() == Counter({"Patient": 1}) and server.posts == 1
    (failure,) = report.failures
    assert failure["file"] == "Observation.ndjson:1-end" and failure["attempts"] == 0 and failure["status"] is None
    assert failure["message"] == ("Observation/o1 refers to Patient/ghost, which this export holds but has not "
                                  "stored yet; with server-assigned ids the referenced type must load first (or "
                                  "use --ids client)")
