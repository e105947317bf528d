"""Ingest on fixtures/ingest: golden outputs (compared by meaning), every broken case's skip reason, joins across
files in both orders, every Bundle type, streaming of large Bundles, strict mode and the CLI."""

from __future__ import annotations

import gzip
import json
import shutil
from datetime import date, datetime
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhirsynth.cli import main as cli_main
from fhirsynth.errors import InputError, MappingError, StrictModeError
from fhirsynth.fhir import readers
from fhirsynth.fhir.readers import iter_resources
from fhirsynth.timeline import adapter
from fhirsynth.timeline.adapter import ingest
from fhirsynth.timeline.io import read_timelines


@pytest.fixture(scope="module")
def ing(fixtures_dir: Path) -> Path:
    return fixtures_dir / "ingest"


def _plain(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return value


def _rows(path: Path) -> list[dict]:
    return [{k: _plain(v) for k, v in row.items()} for row in pq.read_table(path).to_pylist()]


def _assert_balanced(report: dict) -> None:
    for rtype, c in report["resource_types"].items():
        assert c["read"] == c["used"] + c["skipped"], rtype
        assert c["skipped"] == sum(c["skipped_by_reason"].values()), rtype
    t = report["totals"]
    assert t["read"] == t["used"] + t["skipped"]
    assert t["skipped"] == sum(v["count"] for v in report["skipped"].values())


def _match(expected: list[dict], actual: list[dict]) -> None:
    """Each expected event (a subset of columns) matches exactly one actual event on all its columns."""
    for exp in expected:
        hits = [a for a in actual if all(a.get(k) == v for k, v in exp.items())]
        assert len(hits) == 1, f"expected exactly one event matching {exp}, got {len(hits)}"


# -- golden outputs -------------------------------------------------------------------------------------------

def test_bulk_ndjson_golden(ing: Path, tmp_path: Path) -> None:
    report = ingest([ing / "valid" / "bulk"], tmp_path)
    _assert_balanced(report)
    assert report["totals"] == {"read": 8, "used": 8, "skipped": 0}
    events = _rows(tmp_path / "events.parquet")
    expected = json.loads((ing / "expected" / "bulk-events.json").read_text())
    assert len(events) == 7  # the BP panel became two component events and no panel event
    _match(expected, events)
    patients = {p["patient_id"]: p for p in _rows(tmp_path / "patients.parquet")}
    for exp in json.loads((ing / "expected" / "bulk-patients.json").read_text()):
        got = patients[exp["patient_id"]]
        assert {k: got[k] for k in exp} == exp
    on_disk = json.loads((tmp_path / "ingest-report.json").read_text())
    assert on_disk["totals"] == report["totals"]


def test_manifest_reads_its_outputs(ing: Path, tmp_path: Path) -> None:
    via_manifest = ingest([ing / "valid" / "bulk" / "manifest.json"], tmp_path / "a")
    via_dir = ingest([ing / "valid" / "bulk"], tmp_path / "b")
    assert via_manifest["files"] == 4 == via_dir["files"]  # the manifest and the dir walk name the same files once
    assert via_manifest["events"] == via_dir["events"]


def test_bundles_golden(ing: Path, tmp_path: Path) -> None:
    report = ingest([ing / "valid" / "transaction-bundle.json", ing / "valid" / "ips-document-bundle.json.gz"],
                    tmp_path, mapping="ips")
    _assert_balanced(report)
    events = _rows(tmp_path / "events.parquet")
    _match(json.loads((ing / "expected" / "bundle-events.json").read_text()), events)
    assert report["resource_types"]["Composition"]["skipped_by_reason"] == {"unmapped_type": 1}
    assert report["resource_types"]["Practitioner"]["skipped_by_reason"] == {"unmapped_type": 1}
    assert report["bundle_entries_without_resource"] == 1  # the DELETE entry
    dia = next(p for p in _rows(tmp_path / "patients.parquet") if p["patient_id"] == "pat-dia")
    assert (dia["nationality"], dia["country"], dia["language"]) == ("ES", "ES", "es")


@pytest.mark.parametrize(
    ("name", "patient", "n_events"),
    [
        ("searchset-bundle.json", "pat-fay", 1),
        ("collection-bundle.json", "pat-gus", 1),
        ("batch-bundle.json", "pat-hal", 1),
        ("bom-start.ndjson", "pat-ida", 1),
        ("single-line-bundle.json", "pat-jon", 200),  # Patient without id: id from its fullUrl
    ],
)
def test_each_input_shape(ing: Path, tmp_path: Path, name: str, patient: str, n_events: int) -> None:
    report = ingest([ing / "valid" / name], tmp_path)
    _assert_balanced(report)
    assert report["totals"]["skipped"] == 0
    events = _rows(tmp_path / "events.parquet")
    assert len(events) == n_events
    assert {e["patient_id"] for e in events} == {patient}


def test_large_bundle_is_streamed(ing: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    normal = ingest([ing / "valid" / "single-line-bundle.json"], tmp_path / "a")
    monkeypatch.setattr(readers, "STREAM_BUNDLE_BYTES", 1000)
    streamed = ingest([ing / "valid" / "single-line-bundle.json"], tmp_path / "b")
    assert streamed["totals"] == normal["totals"]
    assert _rows(tmp_path / "a" / "events.parquet") == _rows(tmp_path / "b" / "events.parquet")


def test_timelines_read_back(ing: Path, tmp_path: Path) -> None:
    ingest([ing / "valid"], tmp_path)
    timelines = {t.patient.patient_id: t for t in read_timelines(tmp_path)}
    assert len(timelines) == 9
    ana = timelines["pat-ana"]
    assert [e.kind for e in ana.events][:1] == ["condition"]  # 2019 condition before the 2020 visit
    assert ana.patient.race_code == "2106-3" and ana.patient.deceased


# -- cross-file joins -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("patients_first", [True, False])
def test_patient_in_another_file_joins_in_any_order(ing: Path, tmp_path: Path, patients_first: bool) -> None:
    bulk = ing / "valid" / "bulk"
    files = [bulk / "Observation.ndjson", bulk / "Condition.ndjson", bulk / "Encounter.ndjson"]
    files = [bulk / "Patient.ndjson", *files] if patients_first else [*files, bulk / "Patient.ndjson"]
    report = ingest(files, tmp_path)
    assert report["totals"]["skipped"] == 0
    events = _rows(tmp_path / "events.parquet")
    assert len(events) == 7
    assert {e["patient_id"] for e in events} == {"pat-ana", "pat-ben"}


def test_conditional_reference_to_patient_in_other_file(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    cond = {"resourceType": "Condition", "id": "c1", "code": {"coding": [{"system": "http://snomed.info/sct",
            "code": "1"}]}, "onsetDateTime": "2020", "subject": {"reference": "Patient?identifier=urn:x|42"}}
    pat = {"resourceType": "Patient", "id": "p42", "identifier": [{"system": "urn:x", "value": "42"}]}
    (tmp_path / "in" / "a.ndjson").write_bytes(orjson.dumps(cond))
    (tmp_path / "in" / "b.ndjson").write_bytes(orjson.dumps(pat))
    report = ingest([tmp_path / "in"], tmp_path / "out")
    assert report["totals"]["skipped"] == 0
    assert _rows(tmp_path / "out" / "events.parquet")[0]["patient_id"] == "p42"


# -- broken inputs --------------------------------------------------------------------------------------------

BROKEN = [
    ("invalid-json-on-line-3.ndjson", {"invalid_json": 1}),
    ("invalid-json-truncated-bundle.json", {"invalid_json": 1}),
    ("not-a-fhir-resource.ndjson", {"not_fhir_resource": 2}),
    ("unmapped-type.ndjson", {"unmapped_type": 1}),
    ("no-subject.ndjson", {"no_subject": 1}),
    ("subject-not-found.ndjson", {"subject_not_found": 1}),
    ("subject-not-a-patient.ndjson", {"subject_not_patient": 1}),
    ("no-usable-time.ndjson", {"no_usable_time": 2}),
    ("code-system-not-accepted.ndjson", {"code_system_not_accepted": 1}),
    ("no-code.ndjson", {"no_code": 1}),
    ("entered-in-error.ndjson", {"entered_in_error": 2}),
    ("refuted-condition.ndjson", {"status_excluded": 1}),
    ("duplicate-ids.ndjson", {"duplicate_id": 2}),
    ("patient-without-id.ndjson", {"no_id": 1}),
    ("malformed-element-types.ndjson", {"malformed_resource": 1, "no_usable_time": 1}),
    ("truncated-gzip.ndjson.gz", {"truncated_gzip": 1}),
]


# fixtures with nothing usable at all: ingest is an error (no timelines to train on), the report still says why
NOTHING_USABLE = {"invalid-json-truncated-bundle.json", "patient-without-id.ndjson"}


@pytest.mark.parametrize(("name", "reasons"), BROKEN)
def test_broken_fixture_gives_its_reason(ing: Path, tmp_path: Path, name: str, reasons: dict[str, int]) -> None:
    if name in NOTHING_USABLE:
        with pytest.raises(InputError, match="no usable FHIR resource") as err:
            ingest([ing / "broken" / name], tmp_path, max_examples=1)
        assert all(reason in str(err.value) for reason in reasons) and name in str(err.value)
        report = json.loads((tmp_path / "ingest-report.json").read_text())
        assert report["outputs_written"] is False and not (tmp_path / "events.parquet").exists()
    else:
        report = ingest([ing / "broken" / name], tmp_path, max_examples=1)
    _assert_balanced(report)
    assert {k: v["count"] for k, v in report["skipped"].items()} == reasons
    for reason in reasons:
        ex = report["skipped"][reason]["examples"]
        assert len(ex) == 1 and name in ex[0]["where"]


def test_examples_name_file_line_and_resource(ing: Path, tmp_path: Path) -> None:
    report = ingest([ing / "broken" / "invalid-json-on-line-3.ndjson", ing / "broken" / "duplicate-ids.ndjson"],
                    tmp_path)
    assert report["skipped"]["invalid_json"]["examples"][0]["where"].endswith("invalid-json-on-line-3.ndjson:3")
    dups = {e["resource"] for e in report["skipped"]["duplicate_id"]["examples"]}
    assert dups == {"Observation/o-dup", "Patient/pat-dup"}
    # the first of the two o-dup observations is the one kept
    assert [e["value"] for e in _rows(tmp_path / "events.parquet") if e["source_id"] == "Observation/o-dup"] == [95.0]
    assert report["patients"]["duplicates"] == 1


def test_whole_broken_dir_balances_and_strict_fails(ing: Path, tmp_path: Path) -> None:
    report = ingest([ing / "broken"], tmp_path / "lenient")
    _assert_balanced(report)
    # + 2: Observation/o1 and o2 salvaged from truncated-gzip repeat ids already read from invalid-json-on-line-3
    assert report["totals"]["skipped"] == sum(sum(r.values()) for _, r in BROKEN) + 2
    assert report["skipped"]["duplicate_id"]["count"] == 2 + 2
    with pytest.raises(StrictModeError) as exc:
        ingest([ing / "broken"], tmp_path / "strict", strict=True)
    assert "skipped" in str(exc.value)
    assert (tmp_path / "strict" / "ingest-report.json").is_file()
    assert not (tmp_path / "strict" / "events.parquet").exists()


def test_many_small_spill_files_give_the_same_result(ing: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Joins and duplicate detection work across spill files (here: 3 rows per file)."""
    inputs = [ing / "broken", ing / "valid"]
    one = ingest(inputs, tmp_path / "one")
    monkeypatch.setattr(adapter, "SPILL_ROWS", 3)
    many = ingest(inputs, tmp_path / "many")
    for key in ("totals", "resource_types", "events", "patients"):
        assert one[key] == many[key], key
    assert one["skipped"]["duplicate_id"]["count"] == 2 + 2  # + o1, o2 salvaged from truncated-gzip
    assert _rows(tmp_path / "one" / "events.parquet") == _rows(tmp_path / "many" / "events.parquet")


def test_strict_passes_on_clean_input(ing: Path, tmp_path: Path) -> None:
    report = ingest([ing / "valid" / "bulk"], tmp_path, strict=True)
    assert report["outputs_written"] is True


def test_missing_and_empty_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        ingest([tmp_path / "nope.ndjson"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="no readable FHIR input"):
        ingest([tmp_path / "empty"], tmp_path / "out")


def test_manifest_pointing_to_missing_file(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"output": [{"type": "Patient", "url": "Patient.ndjson"}]}))
    with pytest.raises(InputError, match="missing file"):
        ingest([tmp_path / "manifest.json"], tmp_path / "out")


def test_ndjson_in_gz_and_json_named_ndjson(ing: Path, tmp_path: Path) -> None:
    src = ing / "valid" / "bulk"
    (tmp_path / "in").mkdir()
    for p in src.glob("*.ndjson"):
        (tmp_path / "in" / f"{p.name}.gz").write_bytes(gzip.compress(p.read_bytes()))
    shutil.copy(src / "Observation.ndjson", tmp_path / "obs-really-ndjson.json")  # misnamed, still read
    a = ingest([tmp_path / "in"], tmp_path / "a")
    b = ingest([src], tmp_path / "b")
    assert a["events"] == b["events"]
    c = ingest([tmp_path / "in" / "Patient.ndjson.gz", tmp_path / "obs-really-ndjson.json"], tmp_path / "c")
    assert c["resource_types"]["Observation"]["used"] == 3


# -- truncated / damaged gzip: every complete line before the damage is used ------------------------------------

def _cohort_lines(n_obs: int) -> list[bytes]:
    pat = {"resourceType": "Patient", "id": "p-big", "gender": "male", "birthDate": "1960-01-02"}
    obs = [{"resourceType": "Observation", "id": f"o{i}", "status": "final",
            "subject": {"reference": "Patient/p-big"}, "effectiveDateTime": f"2020-01-01T00:00:{i % 60:02d}Z",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
            "valueQuantity": {"value": float(i % 200), "unit": "mg/dL"}, "note": [{"text": "x" * (i % 97)}]}
           for i in range(n_obs)]
    return [orjson.dumps(r) for r in [pat, *obs]]


def test_truncated_gzip_salvages_every_complete_line(tmp_path: Path) -> None:
    """Cut a multi-chunk .ndjson.gz mid-way: all complete lines are used (the old GzipFile path lost the whole
    last 4 MB chunk), the cut line is one truncated_gzip problem at file:line, and the books balance."""
    lines = _cohort_lines(30_000)  # ~10 MB decompressed: several 4 MB read chunks
    data = b"\n".join(lines) + b"\n"
    packed = gzip.compress(data, compresslevel=1)
    cut = packed[: len(packed) * 2 // 3]
    src = tmp_path / "in" / "Cohort.ndjson.gz"
    src.parent.mkdir()
    src.write_bytes(cut)
    import zlib

    prefix = zlib.decompressobj(31).decompress(cut)  # what any gzip reader could recover from the cut file
    complete = prefix.count(b"\n")
    assert 10_000 < complete < len(lines) and not data[len(prefix) - 1:len(prefix)] == b"\n"

    report = ingest([src], tmp_path / "out")
    _assert_balanced(report)
    assert report["resource_types"]["Patient"]["used"] + report["resource_types"]["Observation"]["used"] == complete
    assert {k: v["count"] for k, v in report["skipped"].items()} == {"truncated_gzip": 1}
    ex = report["skipped"]["truncated_gzip"]["examples"][0]
    assert ex["where"] == f"{src}:{complete + 1}"
    assert f"lines 1-{complete} were read" in ex["detail"] and "cut off" in ex["detail"]
    on_disk = json.loads((tmp_path / "out" / "ingest-report.json").read_text())
    assert on_disk["skipped"]["truncated_gzip"]["count"] == 1
    assert len(_rows(tmp_path / "out" / "events.parquet")) == complete - 1  # every Observation line kept

    with pytest.raises(StrictModeError, match="truncated_gzip"):
        ingest([src], tmp_path / "strict", strict=True)


def test_gzip_missing_only_its_trailer_keeps_every_line(tmp_path: Path) -> None:
    """A file cut inside the 8-byte gzip trailer still holds all data: nothing is skipped, the damage is named."""
    lines = _cohort_lines(50)
    src = tmp_path / "t.ndjson.gz"
    src.write_bytes(gzip.compress(b"\n".join(lines))[:-5])  # no final newline: the last line is still whole
    problems: list[tuple[str, str, str]] = []
    reader = readers.ResourceReader(readers.discover_inputs([src]), lambda *a: problems.append(a))
    assert [r[3]["id"] for r in reader] == [orjson.loads(x)["id"] for x in lines]
    assert [(p[0], p[1]) for p in problems] == [("truncated_gzip", f"{src}:{len(lines) + 1}")]


def test_truncated_json_gz_bundle_names_the_file(ing: Path, tmp_path: Path) -> None:
    """A whole-file Bundle cut in half cannot be parsed: one truncated_gzip problem naming the file."""
    packed = (ing / "valid" / "ips-document-bundle.json.gz").read_bytes()
    src = tmp_path / "cut.json.gz"
    src.write_bytes(packed[: len(packed) // 2])
    report = ingest([src, ing / "valid" / "bulk"], tmp_path / "out")
    _assert_balanced(report)
    assert report["skipped"]["truncated_gzip"]["count"] == 1
    assert report["skipped"]["truncated_gzip"]["examples"][0]["where"] == str(src)


@given(st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=6), st.integers(0, 10_000),
       st.integers(1, 64))
@settings(max_examples=300, deadline=None)
def test_gunzip_reads_members_and_stops_cleanly_at_any_cut(members: list[bytes], cut: int, read: int) -> None:
    """Multi-member gzip with zero padding reads back exactly; cut anywhere, it yields a prefix and names the
    damage (or, cut inside padding after a whole member, nothing is missing)."""
    import io

    pieces = [(gzip.compress(m), b"\0" * (i % 2)) for i, m in enumerate(members)]
    packed = b"".join(c + pad for c, pad in pieces)
    whole = b"".join(members)
    legit, pos = {0}, 0  # cut points that lose nothing: each member's end, before and after its padding
    for c, pad in pieces:
        pos += len(c)
        legit.add(pos)
        pos += len(pad)
        legit.add(pos)
    old = readers.GZ_READ
    readers.GZ_READ = read
    try:
        gz = readers.Gunzip(io.BytesIO(packed))
        assert b"".join(iter(lambda: gz.read(5), b"")) == whole and gz.problem is None
        k = cut % (len(packed) + 1)
        gz = readers.Gunzip(io.BytesIO(packed[:k]))
        got = b"".join(iter(lambda: gz.read(5), b""))
    finally:
        readers.GZ_READ = old
    assert whole.startswith(got)
    if k in legit:
        assert gz.problem is None
    else:
        assert gz.problem is not None and gz.problem[0] == "truncated_gzip"


def test_iter_resources_yields_locations(ing: Path) -> None:
    items = list(iter_resources([ing / "valid" / "transaction-bundle.json"]))
    assert [r["resourceType"] for _, r in items] == ["Patient", "Encounter", "Condition", "Observation",
                                                      "Practitioner"]
    assert items[3][0].endswith("transaction-bundle.json entry[3]")
    assert items[3][1]["id"] == "obs-cleo-temp"  # missing id taken from fullUrl


# -- CLI ------------------------------------------------------------------------------------------------------

def test_cli_ingest_ok(ing: Path, tmp_path: Path) -> None:
    rc = cli_main(["ingest", str(ing / "valid" / "bulk"), "--out", str(tmp_path)])
    assert rc == 0
    assert (tmp_path / "events.parquet").is_file() and (tmp_path / "patients.parquet").is_file()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["/definitely/not/here.ndjson"], "does not exist"),
        (["{valid}", "--mapping", "no-such-mapping"], "mapping file not found"),
        (["{valid}", "--mapping", "{ing}/mappings/many-problems.toml"], "[Observation].kind"),
        (["{broken}", "--strict"], "--strict"),
    ],
)
def test_cli_bad_input_exit_2_one_line(ing: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                       args: list[str], needle: str) -> None:
    fmt = {"valid": ing / "valid" / "bulk", "broken": ing / "broken", "ing": ing}
    argv = ["ingest", *[a.format(**fmt) for a in args], "--out", str(tmp_path / "o")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]


def test_mapping_error_carries_all_problems(ing: Path, tmp_path: Path) -> None:
    with pytest.raises(MappingError) as exc:
        ingest([ing / "valid" / "bulk"], tmp_path, mapping=ing / "mappings" / "many-problems.toml")
    assert len(exc.value.problems) >= 7


# -- reader internals -----------------------------------------------------------------------------------------

@given(st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")), max_size=20), st.booleans())
@settings(max_examples=200, deadline=None)
def test_chunked_line_splitting_matches_split(lines: list[bytes], bom: bool) -> None:
    """Lines longer than a chunk, empty lines and a BOM come out exactly as bytes.split would give them."""
    import io

    data = b"\n".join(lines)
    raw = (b"\xef\xbb\xbf" if bom else b"") + data
    old = readers.CHUNK
    readers.CHUNK = 7
    try:
        got = [line for chunk in readers._iter_chunks(io.BytesIO(raw), lambda: None) for line in chunk]
    finally:
        readers.CHUNK = old
    body = raw.removeprefix(b"\xef\xbb\xbf")  # exactly one leading BOM is dropped
    want = body.split(b"\n") if body else []
    if want and want[-1] == b"":
        want.pop()
    assert got == want
