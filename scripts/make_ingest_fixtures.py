"""Write fixtures/ingest/: small hand-made FHIR inputs for the ingest tests, valid and deliberately broken.

    python scripts/make_ingest_fixtures.py

valid/   every input shape ingest reads (bulk NDJSON + manifest, transaction / batch / collection / searchset /
         document Bundles, .gz, a UTF-8 BOM, a single-line Bundle); expected/ holds golden outputs written by
         hand here (not by the code under test).
broken/  one file per defect, named by what is wrong; each holds its own Patient so only the named defect is
         skipped. mappings/ holds broken mapping files.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "ingest"
LOINC, SNOMED, UCUM = "http://loinc.org", "http://snomed.info/sct", "http://unitsofmeasure.org"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
OBS_CAT = "http://terminology.hl7.org/CodeSystem/observation-category"
COND_CAT = "http://terminology.hl7.org/CodeSystem/condition-category"
RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
ETH = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"
NAT = "http://hl7.org/fhir/StructureDefinition/patient-nationality"


def cc(system: str, code: str, display: str | None = None) -> dict:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def patient(pid: str | None, gender: str = "female", birth: str = "1970-05-17", **extra) -> dict:
    res = {"resourceType": "Patient", "gender": gender, "birthDate": birth, **extra}
    if pid:
        res["id"] = pid
    return res


def condition(cid: str | None, subject: str, code: str = "44054006", onset: str | None = "2019-05-17", **extra) -> dict:
    res = {"resourceType": "Condition", "subject": {"reference": subject},
           "code": cc(SNOMED, code, "Diabetes mellitus type 2"),
           "category": [cc(COND_CAT, "problem-list-item")],
           "clinicalStatus": cc("http://terminology.hl7.org/CodeSystem/condition-clinical", "active"),
           "verificationStatus": cc("http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed")}
    if cid:
        res["id"] = cid
    if onset:
        res["onsetDateTime"] = onset
    res.update(extra)
    return res


def observation(oid: str | None, subject: str, code: str = "2339-0", when: str | None = "2020-03-04T10:00:00Z",
                value: float | None = 95.0, unit: str = "mg/dL", category: str = "laboratory", **extra) -> dict:
    res = {"resourceType": "Observation", "status": "final", "subject": {"reference": subject},
           "code": cc(LOINC, code), "category": [cc(OBS_CAT, category)]}
    if oid:
        res["id"] = oid
    if when:
        res["effectiveDateTime"] = when
    if value is not None:
        res["valueQuantity"] = {"value": value, "unit": unit, "system": UCUM, "code": unit}
    res.update(extra)
    return res


def encounter(eid: str, subject: str, start: str, end: str, cls: str = "AMB") -> dict:
    return {"resourceType": "Encounter", "id": eid, "status": "finished", "class": {"system": ACT, "code": cls},
            "type": [cc(SNOMED, "185349003", "Encounter for check up")], "subject": {"reference": subject},
            "period": {"start": start, "end": end}}


def bp(oid: str, subject: str, when: str, sys_: float, dia: float, encounter_ref: str | None = None) -> dict:
    res = observation(oid, subject, "85354-9", when, None, category="vital-signs")
    res["component"] = [
        {"code": cc(LOINC, "8480-6", "Systolic blood pressure"),
         "valueQuantity": {"value": sys_, "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"}},
        {"code": cc(LOINC, "8462-4", "Diastolic blood pressure"),
         "valueQuantity": {"value": dia, "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"}},
    ]
    if encounter_ref:
        res["encounter"] = {"reference": encounter_ref}
    return res


def bundle(btype: str, resources: list[dict], full_urls: list[str], **extra_entry) -> dict:
    entries = []
    for res, url in zip(resources, full_urls, strict=True):
        entry = {"fullUrl": url, "resource": res, **extra_entry}
        if btype in ("transaction", "batch"):
            entry["request"] = {"method": "POST", "url": res["resourceType"]}
        entries.append(entry)
    return {"resourceType": "Bundle", "type": btype, "entry": entries}


def write_ndjson(path: Path, items: list, *, bom: bool = False, raw_lines: dict[int, str] | None = None) -> None:
    lines = [json.dumps(x, separators=(",", ":")) for x in items]
    for idx, text in (raw_lines or {}).items():
        lines.insert(idx, text)
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)


def write_json(path: Path, obj: dict, *, indent: int | None = 2) -> None:
    data = json.dumps(obj, indent=indent, separators=None if indent else (",", ":")).encode()
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data)


def valid(root: Path) -> None:
    bulk = root / "valid" / "bulk"
    bulk.mkdir(parents=True)
    ana = patient("pat-ana", "female", "1970-05-17", deceasedDateTime="2020-01-02T03:04:05+01:00",
                  identifier=[{"system": "https://example.org/mrn", "value": "MRN-1"}],
                  extension=[
                      {"url": RACE, "extension": [
                          {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238",
                                                                  "code": "2106-3", "display": "White"}},
                          {"url": "text", "valueString": "White"}]},
                      {"url": ETH, "extension": [
                          {"url": "ombCategory", "valueCoding": {
                              "system": "urn:oid:2.16.840.1.113883.6.238", "code": "2186-5",
                              "display": "Not Hispanic or Latino"}}]},
                  ],
                  address=[{"use": "work", "country": "CA"}, {"use": "home", "country": "US"}],
                  communication=[{"language": cc("urn:ietf:bcp:47", "fr")},
                                 {"language": cc("urn:ietf:bcp:47", "en-US"), "preferred": True}])
    ben = patient("pat-ben", "male", "1980", deceasedBoolean=True)
    write_ndjson(bulk / "Patient.ndjson", [ana, ben])
    write_ndjson(bulk / "Condition.ndjson", [
        condition("cond-ana-year", "Patient/pat-ana", onset="2019"),
        condition("cond-ben-tz", "Patient/pat-ben", code="38341003", onset="2019-05-17T23:30:00-05:00",
                  abatementDateTime="2019-06"),
    ])
    write_ndjson(bulk / "Observation.ndjson", [
        bp("obs-ana-bp", "Patient/pat-ana", "2020-03-04T10:00:00Z", 120.0, 80.0, "Encounter/enc-ana-1"),
        observation("obs-ben-smoke", "Patient/pat-ben", "72166-2", "2020-03-05", None, category="social-history",
                    valueCodeableConcept=cc(SNOMED, "266919005", "Never smoked tobacco")),
        observation("obs-ana-glucose", "Patient/pat-ana", "2339-0", None, 5.4, "mmol/L",
                    effectivePeriod={"start": "2020-03-04T10:15:00+00:00", "end": "2020-03-04T10:20:00+00:00"}),
    ])
    write_ndjson(bulk / "Encounter.ndjson", [
        encounter("enc-ana-1", "Patient/pat-ana", "2020-03-04T09:45:00+00:00", "2020-03-04T11:00:00+00:00"),
    ])
    write_json(bulk / "manifest.json", {
        "transactionTime": "2026-01-01T00:00:00Z", "request": "http://example.org/fhir/$export",
        "requiresAccessToken": False,
        "output": [{"type": t, "url": f"{t}.ndjson"} for t in ("Patient", "Condition", "Observation", "Encounter")],
        "error": [],
    })

    # transaction Bundle: urn:uuid references, a Synthea conditional reference, an entry without id, a DELETE
    u = "urn:uuid:"
    cleo = patient("pat-cleo", "female", "1990-01-01",
                   identifier=[{"system": "https://github.com/synthetichealth/synthea", "value": "cleo-1"}])
    enc = encounter("enc-cleo-1", f"{u}pat-cleo", "2021-07-01T08:00:00Z", "2021-07-01T09:00:00Z", "EMER")
    cond = condition("cond-cleo", "Patient?identifier=https://github.com/synthetichealth/synthea|cleo-1",
                     code="195662009", onset="2021-07-01T08:30:00Z", encounter={"reference": f"{u}enc-cleo-1"})
    obs = observation(None, f"{u}pat-cleo", "8310-5", "2021-07-01T08:10:00Z", 39.1, "Cel", category="vital-signs",
                      encounter={"reference": f"{u}enc-cleo-1"})
    prac = {"resourceType": "Practitioner", "id": "prac-1"}
    tx = bundle("transaction", [cleo, enc, cond, obs, prac],
                [f"{u}pat-cleo", f"{u}enc-cleo-1", f"{u}cond-cleo", f"{u}obs-cleo-temp", f"{u}prac-1"])
    tx["entry"].append({"request": {"method": "DELETE", "url": "Observation/old-1"}})
    write_json(root / "valid" / "transaction-bundle.json", tx)

    # IPS document Bundle (Composition first), gzipped; EU nationality, address country and language
    dia = patient("pat-dia", "female", "1985-02-03",
                  extension=[{"url": NAT, "extension": [{"url": "code", "valueCodeableConcept":
                                                         cc("urn:iso:std:iso:3166", "ES", "Spain")}]}],
                  address=[{"country": "ES"}], communication=[{"language": cc("urn:ietf:bcp:47", "es")}])
    comp = {"resourceType": "Composition", "id": "comp-dia", "status": "final", "type": cc(LOINC, "60591-5"),
            "subject": {"reference": f"{u}pat-dia"}, "date": "2024-01-01T00:00:00Z", "title": "Patient Summary",
            "section": [{"title": "Problems", "entry": [{"reference": f"{u}cond-dia"}]}]}
    c_dia = condition("cond-dia", f"{u}pat-dia", code="73211009", onset="2015-06")
    o_dia = bp("obs-dia-bp", f"{u}pat-dia", "2023-11-20T12:00:00+01:00", 135.0, 88.0)
    doc = bundle("document", [comp, dia, c_dia, o_dia], [f"{u}comp-dia", f"{u}pat-dia", f"{u}cond-dia",
                                                          f"{u}obs-dia-bp"])
    doc["identifier"] = {"system": "urn:ietf:rfc:3986", "value": "urn:uuid:doc-dia"}
    doc["timestamp"] = "2024-01-01T00:00:00Z"
    write_json(root / "valid" / "ips-document-bundle.json.gz", doc)

    # searchset with absolute fullUrls and relative references
    base = "http://example.org/fhir"
    fay = patient("pat-fay", "female", "2001-09-09")
    o_fay = observation("obs-fay", "Patient/pat-fay", "29463-7", "2022-02-02T02:02:02Z", 61.5, "kg",
                        category="vital-signs")
    ss = bundle("searchset", [fay, o_fay], [f"{base}/Patient/pat-fay", f"{base}/Observation/obs-fay"],
                search={"mode": "match"})
    write_json(root / "valid" / "searchset-bundle.json", ss)
    # collection and batch
    gus = patient("pat-gus", "male", "1950-12-31")
    write_json(root / "valid" / "collection-bundle.json", bundle(
        "collection", [gus, condition("cond-gus", f"{u}pat-gus", onset="2000-01-01")],
        [f"{u}pat-gus", f"{u}cond-gus"]))
    hal = patient("pat-hal", "other", "1999-03-03")
    write_json(root / "valid" / "batch-bundle.json", bundle(
        "batch", [hal, observation("obs-hal", f"{u}pat-hal")], [f"{u}pat-hal", f"{u}obs-hal"]))
    # UTF-8 BOM in front of NDJSON
    write_ndjson(root / "valid" / "bom-start.ndjson",
                 [patient("pat-ida", "female", "1960-06-06"), observation("obs-ida", "Patient/pat-ida")], bom=True)
    # one Bundle on one line (the streaming test lowers the size threshold to exercise ijson on it)
    jon = patient(None, "male", "1975-07-07")
    obs_list = [observation(f"obs-jon-{i}", f"{u}pat-jon", when=f"2020-01-01T00:{i // 60:02d}:{i % 60:02d}Z",
                            value=float(i)) for i in range(200)]
    write_json(root / "valid" / "single-line-bundle.json",
               bundle("collection", [jon, *obs_list], [f"{u}pat-jon", *[f"{u}obs-jon-{i}" for i in range(200)]]),
               indent=None)

    # golden outputs, written by hand: what the bulk set and the transaction/document bundles must give
    expected = root / "expected"
    expected.mkdir()
    write_json(expected / "bulk-events.json", [
        {"patient_id": "pat-ana", "time": "2019-01-01T00:00:00+00:00", "time_precision": "year", "kind": "condition",
         "system": SNOMED, "code": "44054006", "category": "problem-list-item", "status": "active"},
        {"patient_id": "pat-ben", "time": "2019-05-18T04:30:00+00:00", "time_precision": "second",
         "kind": "condition", "system": SNOMED, "code": "38341003", "end_time": "2019-06-01T00:00:00+00:00"},
        {"patient_id": "pat-ana", "time": "2020-03-04T10:00:00+00:00", "kind": "observation", "system": LOINC,
         "code": "8480-6", "value": 120.0, "unit": "mm[Hg]", "panel_code": "85354-9", "encounter_id": "enc-ana-1",
         "category": "vital-signs"},
        {"patient_id": "pat-ana", "time": "2020-03-04T10:00:00+00:00", "kind": "observation", "system": LOINC,
         "code": "8462-4", "value": 80.0, "unit": "mm[Hg]", "panel_code": "85354-9", "encounter_id": "enc-ana-1"},
        {"patient_id": "pat-ben", "time": "2020-03-05T00:00:00+00:00", "time_precision": "day",
         "kind": "observation", "code": "72166-2", "value_system": SNOMED, "value_code": "266919005",
         "value_display": "Never smoked tobacco", "category": "social-history"},
        {"patient_id": "pat-ana", "time": "2020-03-04T10:15:00+00:00", "kind": "observation", "code": "2339-0",
         "value": 5.4, "unit": "mmol/L", "end_time": "2020-03-04T10:20:00+00:00"},
        {"patient_id": "pat-ana", "time": "2020-03-04T09:45:00+00:00", "kind": "encounter", "system": ACT,
         "code": "AMB", "encounter_id": "enc-ana-1", "end_time": "2020-03-04T11:00:00+00:00",
         "value_code": "185349003", "status": "finished"},
    ])
    write_json(expected / "bulk-patients.json", [
        {"patient_id": "pat-ana", "sex": "female", "birth_date": "1970-05-17", "deceased": True,
         "death_date": "2020-01-02T02:04:05+00:00", "race_code": "2106-3", "race_display": "White",
         "ethnicity_code": "2186-5", "country": "US", "language": "en-US", "nationality": None},
        {"patient_id": "pat-ben", "sex": "male", "birth_date": "1980-01-01", "deceased": True, "death_date": None,
         "race_code": None, "country": None},
    ])
    write_json(expected / "bundle-events.json", [
        {"patient_id": "pat-cleo", "time": "2021-07-01T08:00:00+00:00", "kind": "encounter", "code": "EMER",
         "encounter_id": "enc-cleo-1"},
        {"patient_id": "pat-cleo", "time": "2021-07-01T08:30:00+00:00", "kind": "condition", "code": "195662009",
         "encounter_id": "enc-cleo-1", "source_id": "Condition/cond-cleo"},
        {"patient_id": "pat-cleo", "time": "2021-07-01T08:10:00+00:00", "kind": "observation", "code": "8310-5",
         "value": 39.1, "unit": "Cel", "encounter_id": "enc-cleo-1", "source_id": "Observation/obs-cleo-temp"},
        {"patient_id": "pat-dia", "time": "2015-06-01T00:00:00+00:00", "time_precision": "month",
         "kind": "condition", "code": "73211009"},
        {"patient_id": "pat-dia", "time": "2023-11-20T11:00:00+00:00", "kind": "observation", "code": "8480-6",
         "value": 135.0, "panel_code": "85354-9"},
        {"patient_id": "pat-dia", "time": "2023-11-20T11:00:00+00:00", "kind": "observation", "code": "8462-4",
         "value": 88.0, "panel_code": "85354-9"},
    ])


def broken(root: Path) -> None:
    b = root / "broken"
    b.mkdir(parents=True)

    def own(name: str) -> tuple[dict, str]:
        pid = f"pat-{name}"
        return patient(pid), f"Patient/{pid}"

    p, ref = own("json")
    write_ndjson(b / "invalid-json-on-line-3.ndjson", [p, observation("o1", ref), observation("o2", ref)],
                 raw_lines={2: '{"resourceType": "Observation", "id": "cut-off", "status": '})
    (b / "invalid-json-truncated-bundle.json").write_text('{"resourceType": "Bundle", "type": "collection",\n'
                                                        '  "entry": [\n    {"resource": {"resourceType": "Patient"')
    p, ref = own("nores")
    write_ndjson(b / "not-a-fhir-resource.ndjson", [p, {"id": "x", "status": "final"}, [1, 2, 3]])
    p, ref = own("unmapped")
    write_ndjson(b / "unmapped-type.ndjson", [p, {"resourceType": "MedicationRequest", "id": "mr1",
                                                  "subject": {"reference": ref}}])
    p, ref = own("nosubj")
    o = observation("o-nosubj", ref)
    del o["subject"]
    write_ndjson(b / "no-subject.ndjson", [p, o])
    p, ref = own("notfound")
    write_ndjson(b / "subject-not-found.ndjson", [p, observation("o-orphan", "Patient/nobody-has-this-id")])
    p, ref = own("group")
    write_ndjson(b / "subject-not-a-patient.ndjson", [p, observation("o-group", "Group/g1")])
    p, ref = own("notime")
    write_ndjson(b / "no-usable-time.ndjson", [p, observation("o-notime", ref, when=None),
                                               observation("o-badtime", ref, when="2019-13-45")])
    p, ref = own("system")
    o = observation("o-local", ref)
    o["code"] = cc("http://local.example/codes", "GLU")
    write_ndjson(b / "code-system-not-accepted.ndjson", [p, o])
    p, ref = own("nocode")
    o = observation("o-nocode", ref)
    o["code"] = {"text": "glucose, free text only"}
    write_ndjson(b / "no-code.ndjson", [p, o])
    p, ref = own("eie")
    c = condition("c-eie", ref)
    c["verificationStatus"] = cc("http://terminology.hl7.org/CodeSystem/condition-ver-status", "entered-in-error")
    write_ndjson(b / "entered-in-error.ndjson", [p, observation("o-eie", ref, status="entered-in-error"), c])
    p, ref = own("refuted")
    c = condition("c-refuted", ref)
    c["verificationStatus"] = cc("http://terminology.hl7.org/CodeSystem/condition-ver-status", "refuted")
    write_ndjson(b / "refuted-condition.ndjson", [p, c])
    p, ref = own("dup")
    write_ndjson(b / "duplicate-ids.ndjson", [p, observation("o-dup", ref), observation("o-dup", ref, value=1.0), p])
    write_ndjson(b / "patient-without-id.ndjson", [patient(None)])
    p, ref = own("malformed")
    o1 = observation("o-sysobj", ref)
    o1["code"]["coding"][0]["system"] = {"not": "a string"}
    o2 = observation("o-timelist", ref)
    o2["effectiveDateTime"] = ["2020-01-01"]
    write_ndjson(b / "malformed-element-types.ndjson", [p, o1, o2])
    p, ref = own("gz")
    good = gzip.compress(("\n".join(json.dumps(x) for x in [p] + [observation(f"o{i}", ref) for i in range(50)])
                          + "\n").encode(), mtime=0)
    (b / "truncated-gzip.ndjson.gz").write_bytes(good[: len(good) * 2 // 3])

    m = root / "mappings"
    m.mkdir(parents=True)
    (m / "many-problems.toml").write_text(
        'version = 7\n'
        'colour = "blue"\n\n'
        '[Patient]\nbirth_date = 3\nshoe_size = "42"\n\n'
        '[Observation]\nkind = "measurement"\npatient = ["subject"]\ncode = "code"\n'
        'systems = "http://loinc.org"\ncomponents = "explode"\n\n'
        '[Condition]\npatient = ["subject"]\ntime = ["onsetDateTime"]\ncode = "code"\n'
    )
    (m / "invalid-toml.toml").write_text('version = 1\n[Observation\nkind = "observation"\n')
    (m / "minimal-conditions-only.toml").write_text(
        'version = 1\nname = "conditions-only"\n\n[Patient]\n\n'
        '[Condition]\nkind = "condition"\npatient = ["subject"]\ntime = ["onsetDateTime", "recordedDate"]\n'
        'code = "code"\nsystems = ["http://snomed.info/sct"]\n\n[assemble]\nprofile = "test"\n'
    )


def main() -> None:
    if ROOT.exists():
        shutil.rmtree(ROOT)
    valid(ROOT)
    broken(ROOT)
    (ROOT / "README.md").write_text(
        "# Ingest fixtures\n\nWritten by `scripts/make_ingest_fixtures.py` (rerun it to regenerate). `valid/` covers "
        "every input shape; `expected/` holds hand-written golden outputs; each file in `broken/` has the "
        "one defect its name says; `mappings/` has broken and minimal mapping files.\n"
    )


if __name__ == "__main__":
    main()
