"""Write fixtures/bad/: deliberately broken inputs for tests/test_bad_input_matrix.py.

Each file has the one defect its name says; valid resources sit beside the broken one so the tests can check
that nothing is lost (the ingest report's read = used + skipped per type). Rerun to regenerate:

    python scripts/make_bad_fixtures.py
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "bad"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"


def patient(pid: str, birth: str = "1970-05-17") -> dict:
    return {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": birth}


def condition(cid: str, pid: str, onset: str = "2020-03-04T10:00:00Z", system: str = SNOMED,
              code: str = "44054006") -> dict:
    return {
        "resourceType": "Condition", "id": cid, "subject": {"reference": f"Patient/{pid}"},
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                       "code": "active"}]},
        "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                           "code": "confirmed"}]},
        "code": {"coding": [{"system": system, "code": code}]},
        "onsetDateTime": onset,
    }


def observation(oid: str, pid: str, value: object = 95.0, when: str = "2020-03-04T10:00:00Z") -> dict:
    return {
        "resourceType": "Observation", "id": oid, "status": "final", "subject": {"reference": f"Patient/{pid}"},
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "laboratory"}]}],
        "code": {"coding": [{"system": LOINC, "code": "2339-0"}]},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
    }


def ndjson(*resources: dict) -> bytes:
    return b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in resources)


def ingest_fixtures(d: Path) -> None:
    ok = ndjson(patient("p-trunc"), condition("c-trunc-1", "p-trunc"), observation("o-trunc-1", "p-trunc"))
    full = gzip.compress(ok * 20, mtime=0)
    (d / "truncated-gzip.ndjson.gz").write_bytes(full[: len(full) // 2])

    line = ndjson(patient("p-utf8-bad"))
    bad = line.replace(b'"female"', b'"fe\xff\xfemale"')
    (d / "invalid-utf8-on-line-2.ndjson").write_bytes(ndjson(patient("p-utf8-ok")) + bad
                                                      + ndjson(condition("c-utf8", "p-utf8-ok")))

    wrong = {**patient("p-wrongtype"), "resourceType": "Patinet"}
    (d / "wrong-resource-type.ndjson").write_bytes(ndjson(patient("p-rt-ok"), wrong,
                                                          condition("c-rt", "p-rt-ok")))

    numeric = {**patient("p-numtype"), "resourceType": 42}
    (d / "resource-type-not-a-string.ndjson").write_bytes(ndjson(patient("p-num-ok"), numeric))

    (d / "json-array-instead-of-object.json").write_text(json.dumps([patient("p-array")]))

    (d / "reference-to-missing-patient.ndjson").write_bytes(
        ndjson(patient("p-present"), condition("c-orphan", "p-absent"), observation("o-orphan", "p-absent"),
               condition("c-present", "p-present")))

    (d / "dates-in-year-0001.ndjson").write_bytes(
        ndjson(patient("p-y1", birth="0001-01-01"), condition("c-y1", "p-y1", onset="0001-01-01T00:00:00Z"),
               observation("o-y1", "p-y1", when="0001-06-01")))

    (d / "dates-in-year-9999.ndjson").write_bytes(
        ndjson(patient("p-y9999", birth="9999-12-31"), condition("c-y9999", "p-y9999", onset="9999-12-31T23:59:59Z"),
               observation("o-y9999", "p-y9999", when="9999-12-31")))

    (d / "huge-and-nan-values.ndjson").write_bytes(
        ndjson(patient("p-huge"), observation("o-huge", "p-huge", value=1e308),
               observation("o-neghuge", "p-huge", value=-1e308),
               observation("o-nanstr", "p-huge", value="NaN"), observation("o-infstr", "p-huge", value="Infinity"))
        # a bare NaN token is not JSON at all
        + b'{"resourceType":"Observation","id":"o-bare-nan","status":"final","subject":{"reference":"Patient/p-huge"},'
          b'"code":{"coding":[{"system":"http://loinc.org","code":"2339-0"}]},"effectiveDateTime":"2020-01-01",'
          b'"valueQuantity":{"value":NaN}}\n')

    (d / "unknown-code-system.ndjson").write_bytes(
        ndjson(patient("p-sys"), condition("c-sys-unknown", "p-sys", system="http://example.org/not-a-code-system",
                                           code="X1"),
               condition("c-sys-ok", "p-sys")))

    (d / "empty-file.ndjson").write_bytes(b"")
    (d / "whitespace-only.ndjson").write_bytes(b"\n\n   \n")

    bom = ndjson(patient("p-bom"), condition("c-bom", "p-bom"))
    (d / "utf8-bom-start.ndjson").write_bytes(b"\xef\xbb\xbf" + bom)

    (d / "bundle-without-entry.json").write_text(json.dumps({"resourceType": "Bundle", "type": "collection"}))

    m = d / "manifest-missing-file"
    m.mkdir()
    (m / "Patient.ndjson").write_bytes(ndjson(patient("p-manifest")))
    (m / "manifest.json").write_text(json.dumps({
        "transactionTime": "2020-01-01T00:00:00Z", "request": "urn:test", "requiresAccessToken": False,
        "output": [{"type": "Patient", "url": "Patient.ndjson"}, {"type": "Condition", "url": "Condition.ndjson"}],
        "error": []}, indent=2))


def mapping_fixtures(d: Path) -> None:
    (d / "invalid-toml-line-3.toml").write_text('version = 1\nname = "x"\n[Condition\nkind = "condition"\n')
    (d / "unknown-keys.toml").write_text(
        'version = 1\nname = "unknown-keys"\ncolour = "blue"\n\n[Patient]\nshoe_size = "shoe.size"\n\n'
        '[Condition]\nkind = "condition"\npatient = ["subject"]\ntime = ["onsetDateTime"]\ncode = "code"\n'
        'systems = ["http://snomed.info/sct"]\nflavour = "sweet"\n')
    (d / "wrong-types.toml").write_text(
        'version = "one"\nname = 7\n\n[Patient]\nbirth_date = 3\n\n'
        '[Condition]\nkind = "condition"\npatient = "subject"\ntime = 5\ncode = ["code"]\n'
        'systems = "http://snomed.info/sct"\n')


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "ingest").mkdir(parents=True)
    (OUT / "mappings").mkdir()
    ingest_fixtures(OUT / "ingest")
    mapping_fixtures(OUT / "mappings")
    (OUT / "README.md").write_text(
        "# Deliberately broken inputs\n\nWritten by `scripts/make_bad_fixtures.py` (rerun to regenerate) for "
        "`tests/test_bad_input_matrix.py`. Each file has the one defect its name says; valid resources sit beside "
        "it so the tests can check nothing is lost. Model-dir, CLI-flag and API cases are built in the test itself.\n")


if __name__ == "__main__":
    main()
