"""What `load` sends for foreign Bundles and each id mode (loadplan), with exact expectations; the same paths run
against a real server in test_load_medplum.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fhirsynth.export.loadplan import (
    Located,
    NotLoadable,
    batch_steps,
    bundle_entries,
    chunks,
    conditional_query,
    dependency_order,
    entry_for,
    local_name,
    prepare,
    record_locations,
)
from fhirsynth.export.ndjson_source import NdjsonFile, stages_by_references
from fhirsynth.timeline.assembler import RESOURCE_ID_SYSTEM


def test_local_name_of_references_and_locations():
    assert local_name("Patient/1") == "Patient/1"
    assert local_name("http://x.org/fhir/Patient/1") == "Patient/1"
    assert local_name("Observation/9/_history/2") == "Observation/9"
    assert local_name("https://h/base/Encounter/e/_history/1") == "Encounter/e"
    assert local_name("urn:uuid:abc") == "urn:uuid:abc"
    assert local_name("#contained") == "#contained"


def _searchset() -> dict:
    """A search result from another server: absolute fullUrls, relative and absolute references, an outcome."""
    return {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"fullUrl": "http://other/fhir/Observation/o1", "search": {"mode": "match"},
         "resource": {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "Patient/p1"},
                      "hasMember": [{"reference": "http://other/fhir/Observation/o2/_history/3"}]}},
        {"fullUrl": "http://other/fhir/Observation/o2", "search": {"mode": "match"},
         "resource": {"resourceType": "Observation", "id": "o2", "status": "final", "code": {"text": "y"},
                      "subject": {"reference": "Patient/elsewhere"}}},
        {"fullUrl": "http://other/fhir/Patient/p1", "search": {"mode": "include"},
         "resource": {"resourceType": "Patient", "id": "p1"}},
        {"search": {"mode": "outcome"}, "resource": {"resourceType": "OperationOutcome", "issue": []}},
    ]}


def test_foreign_searchset_entries_point_at_each_other_by_urn():
    entries = bundle_entries(_searchset())
    assert [e.name for e in entries] == ["Observation/o1", "Observation/o2", "Patient/p1"]  # outcome dropped
    urn = {e.name: e.full_url for e in entries}
    assert all(u.startswith("urn:uuid:") for u in urn.values()) and len(set(urn.values())) == 3
    o1, o2, _ = (e.resource for e in entries)
    assert o1["subject"]["reference"] == urn["Patient/p1"]
    assert o1["hasMember"][0]["reference"] == urn["Observation/o2"]  # absolute and versioned
    assert o2["subject"]["reference"] == "Patient/elsewhere"  # not in the Bundle: left for the server
    assert entries[0].aliases == ("Observation/o1", "http://other/fhir/Observation/o1")
    # dependency order: the Patient first, o1 after the o2 it points at
    assert [e.name for e in dependency_order(entries)] == ["Patient/p1", "Observation/o2", "Observation/o1"]


@pytest.mark.parametrize("doc,reason", [
    ({"resourceType": "Patient"}, "not a FHIR Bundle"),
    ([], "not a FHIR Bundle (resourceType 'list')"),
    ({"resourceType": "Bundle", "type": "message"}, "'message' Bundle holds no data"),
    ({"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "GET", "url": "Patient"}}]},
     "is a GET"),
    ({"resourceType": "Bundle", "type": "collection", "entry": [{"fullUrl": "urn:uuid:1"}]}, "has no resource"),
    ({"resourceType": "Bundle", "type": "collection", "entry": ["x"]}, "Bundle.entry[0] is not an object"),
])
def test_bundles_that_cannot_be_loaded_say_why(doc, reason):
    with pytest.raises(NotLoadable, match=re.escape(reason)):
        bundle_entries(doc)


def test_a_reference_cycle_is_broken_not_dropped():
    a = entry_for({"resourceType": "Observation", "id": "a"}, "urn:uuid:a")
    b = entry_for({"resourceType": "Observation", "id": "b", "hasMember": [{"reference": "urn:uuid:a"}]}, "urn:uuid:b")
    a.resource["hasMember"] = [{"reference": "urn:uuid:b"}]
    p = entry_for({"resourceType": "Patient", "id": "p"}, "urn:uuid:p")
    assert [e.name for e in dependency_order([a, b, p])] == ["Patient/p", "Observation/a", "Observation/b"]


def test_an_entry_released_from_a_cycle_and_freed_again_does_not_end_the_order():
    """p <-> e is a cycle; p (rank first) is released, e follows, which frees p a second time while o, which
    needs e, still waits: o must come out too."""
    p = entry_for({"resourceType": "Patient", "id": "p", "link": [{"other": {"reference": "urn:uuid:e"}}]},
                  "urn:uuid:p")
    e = entry_for({"resourceType": "Encounter", "id": "e", "subject": {"reference": "urn:uuid:p"}}, "urn:uuid:e")
    o = entry_for({"resourceType": "Observation", "id": "o", "encounter": {"reference": "urn:uuid:e"}}, "urn:uuid:o")
    assert [x.name for x in dependency_order([o, e, p])] == ["Patient/p", "Encounter/e", "Observation/o"]


def _patient_bundle() -> list:
    p = entry_for({"resourceType": "Patient", "id": "p", "identifier": [
        {"system": "urn:mrn", "value": "42"}, {"system": RESOURCE_ID_SYSTEM, "value": "p"}]}, "urn:uuid:p")
    e = entry_for({"resourceType": "Encounter", "id": "e", "identifier": [{"system": RESOURCE_ID_SYSTEM,
                                                                           "value": "e"}],
                   "subject": {"reference": "urn:uuid:p"}}, "urn:uuid:e")
    o = entry_for({"resourceType": "Observation", "id": "o", "subject": {"reference": "urn:uuid:p"},
                   "encounter": {"reference": "urn:uuid:e"}}, "urn:uuid:o")
    v = entry_for({"resourceType": "Provenance", "id": "v", "target": [{"reference": "urn:uuid:p"},
                                                                         {"reference": "urn:uuid:o"}],
                   "agent": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                                              "provenance-participant-type", "code": "assembler"}]}}]},
                  "urn:uuid:v")
    return [v, o, e, p]


def _answer(prepared, ids: dict[str, str], status: str = "201 Created") -> dict:
    return {"resourceType": "Bundle", "type": "transaction-response",
            "entry": [{"response": {"status": status, "location": f"{e.rtype}/{ids[e.name]}/_history/1"}}
                      for e in prepared.entries]}


def test_server_ids_post_without_ids_and_point_later_chunks_at_the_servers_ids():
    entries = _patient_bundle()
    located = Located()
    located.add(entries)
    first, second = chunks(entries, 2, "server")
    assert [e.name for e in first] == ["Patient/p", "Encounter/e"]
    sent = prepare(first, located, "server", batch=False)
    assert [x["request"] for x in sent.bundle["entry"]] == [{"method": "POST", "url": "Patient"},
                                                           {"method": "POST", "url": "Encounter"}]
    assert all("id" not in x["resource"] for x in sent.bundle["entry"])
    assert sent.bundle["entry"][1]["resource"]["subject"] == {"reference": "urn:uuid:p"}  # same transaction
    assert record_locations(sent, _answer(sent, {"Patient/p": "P1", "Encounter/e": "E1"}), located) == []
    later = prepare(second, located, "server", batch=False).bundle["entry"]
    obs, prov = (x["resource"] for x in later)
    assert obs["subject"] == {"reference": "Patient/P1"} and obs["encounter"] == {"reference": "Encounter/E1"}
    assert prov["target"] == [{"reference": "Patient/P1"}, {"reference": "urn:uuid:o"}]


def test_conditional_mode_matches_on_identifiers_and_sends_provenance_last_by_its_patient():
    entries = _patient_bundle()
    located = Located()
    located.add(entries)
    parts = chunks(entries, 50, "conditional")
    assert [[e.name for e in c] for c in parts] == [["Patient/p", "Encounter/e", "Observation/o"], ["Provenance/v"]]
    sent = prepare(parts[0], located, "conditional", batch=False)
    requests = [x["request"] for x in sent.bundle["entry"]]
    assert requests[0]["ifNoneExist"] == f"identifier={RESOURCE_ID_SYSTEM}|p"  # ours before the MRN
    assert requests[1]["ifNoneExist"] == f"identifier={RESOURCE_ID_SYSTEM}|e"
    assert "ifNoneExist" not in requests[2] and sent.unconditional == 1  # no identifier to match on
    record_locations(sent, _answer(sent, {"Patient/p": "P1", "Encounter/e": "E1", "Observation/o": "O1"},
                                   "200 OK"), located)
    prov = prepare(parts[1], located, "conditional", batch=False).bundle["entry"][0]
    assert prov["request"]["ifNoneExist"] == ("target=Patient/P1&agent-type=http://terminology.hl7.org/CodeSystem/"
                                              "provenance-participant-type|assembler")
    assert conditional_query({"resourceType": "Provenance", "target": []}) is None
    # only a Provenance is searched by target and agent: another resource with the same agent and a target found
    # for it would get a search its type does not have
    agent = [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                   "code": "assembler"}]}}]
    assert conditional_query({"resourceType": "AuditEvent", "agent": agent}, "Patient/P1") is None
    assert conditional_query({"resourceType": "Provenance", "agent": agent}, "Patient/P1") == \
        prov["request"]["ifNoneExist"]
    assert conditional_query({"resourceType": "Device", "identifier": {"system": "s", "value": "v"}}) == \
        "identifier=s|v"


def test_client_mode_puts_our_ids_and_a_batch_points_at_them_directly():
    entries = _patient_bundle()
    located = Located()
    located.add(entries)
    (chunk,) = chunks(entries, 50)
    (step,) = batch_steps(chunk, "client")
    sent = prepare(step, located, "client", batch=True).bundle
    assert sent["type"] == "batch"
    assert [x["request"] for x in sent["entry"]][:2] == [{"method": "PUT", "url": "Patient/p"},
                                                         {"method": "PUT", "url": "Encounter/e"}]
    assert "urn:uuid:" not in json.dumps([x["resource"] for x in sent["entry"]])


def test_batch_with_server_ids_goes_rank_by_rank_and_refuses_what_it_cannot_point_at():
    entries = _patient_bundle()
    located = Located()
    located.add(entries)
    (chunk,) = chunks(entries, 50, "server")
    steps = batch_steps(chunk, "server")
    assert [[e.rtype for e in s] for s in steps] == [["Patient"], ["Encounter"], ["Observation"], ["Provenance"]]
    with pytest.raises(NotLoadable, match="refers to urn:uuid:p, which is not stored yet.*earlier batch"):
        prepare(steps[1], located, "server", batch=True)  # the Patient's location is not known yet
    missing = record_locations(prepare(steps[0], located, "server", batch=True),
                               {"entry": [{"response": {"status": "201 Created"}}]}, located)
    assert missing == ["Patient/p: the server's answer says neither its location nor its id"]


def test_ndjson_with_server_ids_refuses_a_reference_to_what_is_not_stored_yet():
    located = Located(export_types=frozenset({"Patient", "Observation"}))
    obs = entry_for({"resourceType": "Observation", "id": "o", "subject": {"reference": "Patient/p"}})
    located.add([obs])
    with pytest.raises(NotLoadable, match="refers to Patient/p, which this export holds but has not stored yet"):
        prepare([obs], located, "server", batch=False)
    assert prepare([obs], Located(), "client", batch=False).bundle["entry"][0]["request"]["method"] == "PUT"


def test_ndjson_stages_follow_the_references_in_the_data(tmp_path: Path):
    def write(rtype: str, *resources: dict) -> NdjsonFile:
        path = tmp_path / f"{rtype}.ndjson"
        path.write_text("".join(json.dumps(r) + "\n" for r in resources))
        return NdjsonFile(path, rtype)

    files = [
        write("ExplanationOfBenefit", {"resourceType": "ExplanationOfBenefit", "id": "x",
                                       "claim": {"reference": "Claim/c"}, "patient": {"reference": "Patient/p"}}),
        write("Claim", {"resourceType": "Claim", "id": "c", "patient": {"reference": "Patient/p"},
                        "provider": {"reference": "http://h/Practitioner/d"}}),
        write("Patient", {"resourceType": "Patient", "id": "p", "link": [{"other": {"reference": "Patient/q"}}]}),
        write("Practitioner", {"resourceType": "Practitioner", "id": "d"}),
    ]
    layers = [sorted(f.rtype for f in layer) for layer in stages_by_references(files)]
    assert layers == [["Patient", "Practitioner"], ["Claim"], ["ExplanationOfBenefit"]]


def test_a_sources_own_conditional_creates_are_kept_with_server_ids_in_small_transactions():
    doc = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:o{i}", "resource": {"resourceType": "Organization", "identifier": [
            {"system": "urn:npi", "value": str(i)}]},
         "request": {"method": "POST", "url": "Organization", "ifNoneExist": f"identifier=urn:npi|{i}"}}
        for i in range(10)] + [
        {"fullUrl": f"urn:uuid:x{i}", "resource": {"resourceType": "Observation", "status": "final",
                                                   "code": {"text": "x"}},
         "request": {"method": "POST", "url": "Observation"}} for i in range(30)]}
    entries = bundle_entries(doc)
    assert entries[0].if_none_exist == "identifier=urn:npi|0" and entries[-1].if_none_exist is None
    parts = chunks(entries, 50, "server")
    assert [len(c) for c in parts] == [8, 8, 24]  # conditional creates 8 at a time, then the rest
    sent = prepare(parts[0], Located(), "server", batch=False).bundle["entry"]
    assert sent[0]["request"] == {"method": "POST", "url": "Organization", "ifNoneExist": "identifier=urn:npi|0"}
    assert [len(c) for c in chunks(entries, 50, "client")] == [40]  # PUT by id needs no isolation


def test_local_name_leaves_what_is_no_type_and_id():
    assert local_name("Patient") == "Patient"
    assert local_name("abc/def") == "abc/def"  # lower case: not a resource type


def test_a_searchset_outcome_first_still_leaves_every_match():
    doc = _searchset()
    doc["entry"].insert(0, doc["entry"].pop())  # the OperationOutcome first
    assert [e.name for e in bundle_entries(doc)] == ["Observation/o1", "Observation/o2", "Patient/p1"]


@pytest.mark.parametrize("btype", ["transaction", "batch"])
def test_requests_that_store_nothing_are_named(btype):
    doc = {"resourceType": "Bundle", "type": btype, "entry": [
        {"resource": {"resourceType": "Patient", "id": "p"}, "request": {"method": "PUT", "url": "Patient/p"}},
        {"resource": {"resourceType": "Patient", "id": "q"}, "request": {"url": "Patient/q"}}]}
    with pytest.raises(NotLoadable) as err:
        bundle_entries(doc)
    assert str(err.value) == ("Bundle.entry[1] is a request without a method: `load` only stores resources (PUT or "
                              "POST entries)")
    doc["type"] = "message"
    with pytest.raises(NotLoadable) as err:
        bundle_entries(doc)
    assert str(err.value) == ("a 'message' Bundle holds no data to store; `load` takes transaction, batch, "
                              "collection, searchset, document Bundles or NDJSON")


def test_references_resolve_by_exact_name_by_local_name_or_stay():
    no_id = entry_for({"resourceType": "Patient"}, "http://other/fhir/Patient/1")  # no id: only its fullUrl
    with_id = entry_for({"resourceType": "Encounter", "id": "e"}, "urn:uuid:e")
    located = Located()
    located.add([no_id, with_id])
    assert located.resolve("http://other/fhir/Patient/1", set(), batch=False) == "http://other/fhir/Patient/1"
    assert located.resolve("http://other/fhir/Patient/1", {no_id.full_url}, batch=False) == no_id.full_url
    assert located.resolve("https://h/Encounter/e/_history/2", {"urn:uuid:e"}, batch=False) == "urn:uuid:e"
    # known but not stored and not in the transaction: sent as it was written
    assert located.resolve("Encounter/e", set(), batch=False) == "Encounter/e"
    assert located.resolve("urn:uuid:e", set(), batch=False) == "urn:uuid:e"
    located.stored["urn:uuid:e"] = "Encounter/E9"
    assert located.resolve("Encounter/e", set(), batch=False) == "Encounter/E9"
    assert located.resolve("urn:uuid:e", {"urn:uuid:e"}, batch=True) == "Encounter/E9"  # a batch: where stored
    assert located.resolve("Practitioner/x", set(), batch=False) == "Practitioner/x"  # not in the load


def test_where_the_server_put_each_entry_is_read_from_location_resource_or_put_url():
    entries = [entry_for({"resourceType": "Patient", "id": "a"}, "urn:uuid:a"),
               entry_for({"resourceType": "Patient", "id": "b"}, "urn:uuid:b"),
               entry_for({"resourceType": "Patient", "id": "c"}, "urn:uuid:c"),
               entry_for({"resourceType": "Patient"}, "urn:uuid:d")]
    located = Located()
    located.add(entries)
    prepared = prepare(entries, located, "client", batch=False)
    located.stored.clear()
    answer = {"entry": [
        {"response": {"status": "201 Created", "location": "https://srv/fhir/Patient/A1/_history/3"}},
        {"response": {"status": "200 OK"}, "resource": {"resourceType": "Patient", "id": "B1"}},
        {"response": {"status": "200 OK"}},  # nothing said: a PUT is where it was put
        {"response": {"status": "201 Created"}},  # a POST without location: unknown
    ]}
    missing = record_locations(prepared, answer, located)
    assert located.stored == {"urn:uuid:a": "Patient/A1", "urn:uuid:b": "Patient/B1", "urn:uuid:c": "Patient/c"}
    assert missing == ["Patient/(new): the server's answer says neither its location nor its id"]


def test_conditional_mode_needs_both_system_and_value_and_sends_several_provenance_chunks():
    assert conditional_query({"resourceType": "Patient", "identifier": [
        {"value": "no-system"}, {"system": "s"}, "junk", {"system": "urn:mrn", "value": "7"}]}) == \
        "identifier=urn:mrn|7"
    assert conditional_query({"resourceType": "Patient", "identifier": [{"value": "v"}]}) is None
    provs = [entry_for({"resourceType": "Provenance", "id": f"v{i}"}, f"urn:uuid:v{i}") for i in range(3)]
    parts = chunks([*provs, entry_for({"resourceType": "Patient", "id": "p"}, "urn:uuid:p")], 2, "conditional")
    assert [[e.name for e in c] for c in parts] == [["Patient/p"], ["Provenance/v0", "Provenance/v1"],
                                                   ["Provenance/v2"]]


def test_what_cannot_be_sent_is_refused_with_the_whole_reason():
    entries = _patient_bundle()
    located = Located()
    located.add(entries)
    encounter = next(e for e in entries if e.rtype == "Encounter")
    with pytest.raises(NotLoadable) as err:  # a batch cannot point at an entry of the same batch
        prepare([encounter, entries[-1]], located, "server", batch=True)
    assert str(err.value) == ("Encounter/e refers to urn:uuid:p, which is not stored yet (a batch resolves no "
                              "reference between its entries, so with server-assigned ids it must be stored by an "
                              "earlier batch)")
    with pytest.raises(NotLoadable) as err:  # a transaction without the Patient, which is not stored either
        prepare([encounter], located, "server", batch=False)
    assert str(err.value) == ("Encounter/e refers to urn:uuid:p, which is not stored yet (a reference cycle between "
                              "transactions?)")
    ndjson = Located(export_types=frozenset({"Patient", "Observation"}))
    obs = entry_for({"resourceType": "Observation", "id": "o", "subject": {"reference": "Patient/p"}})
    ndjson.add([obs])
    with pytest.raises(NotLoadable) as err:
        prepare([obs], ndjson, "conditional", batch=False)
    assert str(err.value) == ("Observation/o refers to Patient/p, which this export holds but has not stored yet; "
                              "with server-assigned ids the referenced type must load first (or use --ids client)")
    # our own ids (client mode): the Patient will be at Patient/p whatever the order, so nothing is refused
    sent = prepare([obs], ndjson, "client", batch=False).bundle["entry"][0]
    assert sent["request"] == {"method": "PUT", "url": "Observation/o"}
    assert sent["resource"]["subject"] == {"reference": "Patient/p"}


def test_conditional_provenance_is_matched_by_its_patient_target_not_its_first():
    prov = entry_for({"resourceType": "Provenance", "id": "v",
                      "target": ["Patient/p0", {"reference": "Observation/o9"}, {"reference": "Patient/p9"}],
                      "agent": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                                                "provenance-participant-type", "code": "assembler"}]}}]})
    sent = prepare([prov], Located(), "conditional", batch=False).bundle["entry"][0]
    assert sent["request"]["ifNoneExist"] == ("target=Patient/p9&agent-type=http://terminology.hl7.org/CodeSystem/"
                                              "provenance-participant-type|assembler")
