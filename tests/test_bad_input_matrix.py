"""The bad-input matrix: ingest, mappings, CLI flags, API parameters and model dirs.

Every case runs the real command (`python -m fhirsynth ...` in a subprocess, with a timeout) or the real server
over loopback HTTP, and checks the contract: exit code 2 (or the right HTTP status with an OperationOutcome),
ONE stderr line naming what and where, never a traceback, and for ingest: nothing lost (the report's
read = used + skipped for every resource type). Inputs live in fixtures/bad/ (scripts/make_bad_fixtures.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from serverproc import free_port, running_server

BAD = Path(__file__).resolve().parent.parent / "fixtures" / "bad"
BAD_INGEST = BAD / "ingest"
BAD_MAPPINGS = BAD / "mappings"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fhirsynth", "-q", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=ENV)


def cli_pair(a: list[str | Path], b: list[str | Path],
             timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], ...]:
    """Two independent commands at once (the CPU-light ingest runs overlap: halves the matrix's wall time)."""
    procs = [subprocess.Popen([sys.executable, "-m", "fhirsynth", "-q", *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV) for args in (a, b)]
    out = []
    for args, proc in zip((a, b), procs, strict=True):
        stdout, stderr = proc.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return tuple(out)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2, exactly one non-empty stderr line that names every needle, no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2, f"exit {proc.returncode}; stderr: {proc.stderr[-2000:]}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{proc.stderr[-2000:]}"
    line = lines[0]
    assert line.startswith("fhirsynth ") and "error" in line, line
    assert "internal error" not in line, line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def assert_balanced(report: dict) -> None:
    """Nothing lost: per type and in total, read = used + skipped, and the reasons add up."""
    for rtype, t in report["resource_types"].items():
        assert t["read"] == t["used"] + t["skipped"], (rtype, t)
        assert t["skipped"] == sum(t["skipped_by_reason"].values()), (rtype, t)
    totals = report["totals"]
    assert totals["read"] == totals["used"] + totals["skipped"]
    assert totals["read"] == sum(t["read"] for t in report["resource_types"].values())
    assert totals["skipped"] == sum(r["count"] for r in report["skipped"].values())


def count_lines(path: Path) -> int:
    import gzip

    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return sum(1 for ln in data.splitlines() if ln.strip())


# ------------------------------------------------------------------------------------------------- ingest

# (fixture file, skip reason it must produce, where the example must point (suffix of the path), resources
#  that must still be used)
SKIPPING_INPUTS = [
    # the complete line before the cut (the Patient) is used; the cut-off line 2 is counted at file:line
    ("truncated-gzip.ndjson.gz", "truncated_gzip", "truncated-gzip.ndjson.gz:2", 1),
    ("invalid-utf8-on-line-2.ndjson", "invalid_json", "invalid-utf8-on-line-2.ndjson:2", 2),
    ("wrong-resource-type.ndjson", "unmapped_type", "wrong-resource-type.ndjson:2", 2),
    ("resource-type-not-a-string.ndjson", "not_fhir_resource", "resource-type-not-a-string.ndjson:2", 1),
    ("reference-to-missing-patient.ndjson", "subject_not_found", "reference-to-missing-patient.ndjson:2", 2),
    ("unknown-code-system.ndjson", "code_system_not_accepted", "unknown-code-system.ndjson:2", 2),
    ("huge-and-nan-values.ndjson", "invalid_json", "huge-and-nan-values.ndjson:6", 5),
]


@pytest.mark.parametrize(("name", "reason", "where", "used"), SKIPPING_INPUTS, ids=[c[0] for c in SKIPPING_INPUTS])
def test_ingest_skips_and_counts_bad_resources(tmp_path: Path, name: str, reason: str, where: str,
                                               used: int | None) -> None:
    src = BAD_INGEST / name
    # --strict turns the same skips into exit 2 with one line naming the file; no timelines are written
    proc, strict = cli_pair(["ingest", src, "--out", tmp_path / "tl"],
                            ["ingest", src, "--out", tmp_path / "strict", "--strict"])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads((tmp_path / "tl" / "ingest-report.json").read_text())
    assert_balanced(report)
    if used is not None:
        assert report["totals"]["used"] == used, report["totals"]
    assert report["skipped"][reason]["count"] >= 1, report["skipped"]
    examples = [ex["where"] for ex in report["skipped"][reason]["examples"]]
    assert any(w.endswith(where) or w.endswith(where + " entry[0]") for w in examples), examples
    assert (tmp_path / "tl" / "events.parquet").is_file() and (tmp_path / "tl" / "patients.parquet").is_file()

    assert_one_line_error(strict, str(src), "--strict", reason)
    assert not (tmp_path / "strict" / "events.parquet").exists()
    assert json.loads((tmp_path / "strict" / "ingest-report.json").read_text())["outputs_written"] is False


def test_ingest_huge_and_nan_values_never_become_non_finite(tmp_path: Path) -> None:
    """1e308 is a number and is kept; "NaN"/"Infinity" strings are not numbers and never become float NaN/inf."""
    import math

    import pyarrow.parquet as pq

    proc = cli("ingest", BAD_INGEST / "huge-and-nan-values.ndjson", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    events = pq.read_table(tmp_path / "events.parquet").to_pylist()
    by_id = {e["source_id"]: e for e in events}
    assert by_id["Observation/o-huge"]["value"] == 1e308
    assert by_id["Observation/o-neghuge"]["value"] == -1e308
    for e in events:
        assert e["value"] is None or math.isfinite(e["value"]), e
    assert "Observation/o-bare-nan" not in by_id  # the bare NaN token line is invalid JSON, counted as skipped


@pytest.mark.parametrize("name", ["dates-in-year-0001.ndjson", "dates-in-year-9999.ndjson"])
def test_ingest_extreme_years_round_trip(tmp_path: Path, name: str) -> None:
    """Year 1 and year 9999 are valid FHIR dates: kept exactly (no overflow, no silent shift), nothing lost."""
    import pyarrow.parquet as pq

    proc = cli("ingest", BAD_INGEST / name, "--out", tmp_path, "--strict")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "ingest-report.json").read_text())
    assert_balanced(report)
    assert report["totals"] == {"read": 3, "used": 3, "skipped": 0}
    year = 1 if "0001" in name else 9999
    events = pq.read_table(tmp_path / "events.parquet").to_pylist()
    assert len(events) == 2 and all(e["time"].year == year for e in events)
    patients = pq.read_table(tmp_path / "patients.parquet").to_pylist()
    assert patients[0]["birth_date"].year == year


def test_ingest_bom_file_is_read(tmp_path: Path) -> None:
    proc = cli("ingest", BAD_INGEST / "utf8-bom-start.ndjson", "--out", tmp_path, "--strict")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "ingest-report.json").read_text())
    assert report["totals"] == {"read": 2, "used": 2, "skipped": 0}


# Input with no FHIR resource at all cannot make timelines: it must be an error naming the input, not an
# empty timelines directory that only fails later in `train`.
EMPTY_INPUTS = ["empty-file.ndjson", "whitespace-only.ndjson", "bundle-without-entry.json"]


@pytest.mark.parametrize("name", EMPTY_INPUTS)
def test_ingest_input_without_resources_is_an_error(tmp_path: Path, name: str) -> None:
    src = BAD_INGEST / name
    proc = cli("ingest", src, "--out", tmp_path / "tl")
    assert_one_line_error(proc, str(src))
    assert not (tmp_path / "tl" / "events.parquet").exists()


# Input that has JSON but no usable resource (nothing FHIR, nothing parseable): exit 2 without --strict too, naming
# the file and each skip reason, and no timelines (an empty timelines dir would only fail in the next command).
UNUSABLE_INPUTS = {
    "not-fhir.json": ('{"name": "not FHIR", "items": [1, 2]}', ["not_fhir_resource"]),
    "invalid.json": ('{"resourceType": "Patient", "id": ', ["invalid_json"]),
    "garbage.ndjson": ('garbage\n{"no": "resourceType"}\n<xml/>\n', ["invalid_json x2", "not_fhir_resource x1"]),
}


@pytest.mark.parametrize("name", list(UNUSABLE_INPUTS))
def test_ingest_input_without_usable_resource_is_an_error(tmp_path: Path, name: str) -> None:
    text, reasons = UNUSABLE_INPUTS[name]
    src = tmp_path / name
    src.write_text(text)
    proc = cli("ingest", src, "--out", tmp_path / "tl")
    assert_one_line_error(proc, str(src), "no usable FHIR resource", "0 patients", *reasons)
    assert not (tmp_path / "tl" / "events.parquet").exists()
    report = json.loads((tmp_path / "tl" / "ingest-report.json").read_text())
    assert report["outputs_written"] is False and report["totals"]["used"] == 0
    assert_balanced(report)


def test_ingest_json_array_of_resources_is_an_error(tmp_path: Path) -> None:
    """A JSON array is not a FHIR shape (a Bundle or NDJSON is): its Patient is not silently used, and nothing else
    is left, so exit 2."""
    src = BAD_INGEST / "json-array-instead-of-object.json"
    assert_one_line_error(cli("ingest", src, "--out", tmp_path / "tl"), str(src), "not_fhir_resource")


def test_ingest_directory_of_unusable_files_names_them(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.json").write_text('{"not": "fhir"}')
    (src / "b.ndjson").write_text("{{{\n")
    line = assert_one_line_error(cli("ingest", src, "--out", tmp_path / "tl"), str(src), "no usable FHIR resource")
    assert "a.json" in line and "b.ndjson" in line, line


def test_ingest_partly_bad_input_succeeds_and_reports_skips(tmp_path: Path) -> None:
    """Without --strict a partial skip is not an error: exit 0, the log line and the report count the skips."""
    src = BAD_INGEST / "invalid-utf8-on-line-2.ndjson"
    proc = subprocess.run([sys.executable, "-m", "fhirsynth", "ingest", str(src), "--out", str(tmp_path / "tl")],
                          capture_output=True, text=True, timeout=60, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "invalid_json 1" in proc.stderr + proc.stdout, proc.stderr
    assert json.loads((tmp_path / "tl" / "ingest-report.json").read_text())["skipped"]["invalid_json"]["count"] == 1
    assert (tmp_path / "tl" / "events.parquet").is_file()


def test_ingest_empty_file_beside_valid_input_is_fine(tmp_path: Path) -> None:
    """Only input without any resource is an error; an empty file among real input is just nothing to read."""
    proc = cli("ingest", BAD_INGEST / "empty-file.ndjson", BAD_INGEST / "utf8-bom-start.ndjson", "--out", tmp_path,
               "--strict")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "ingest-report.json").read_text())["totals"]["used"] == 2


def test_ingest_empty_directory(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(cli("ingest", empty, "--out", tmp_path / "tl"), str(empty))
    assert not (tmp_path / "tl" / "events.parquet").exists()


def test_ingest_manifest_pointing_at_missing_file(tmp_path: Path) -> None:
    manifest = BAD_INGEST / "manifest-missing-file" / "manifest.json"
    proc = cli("ingest", manifest, "--out", tmp_path / "tl")
    assert_one_line_error(proc, str(manifest), "Condition.ndjson")
    assert not (tmp_path / "tl" / "events.parquet").exists()


def test_ingest_missing_input_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-input.ndjson"
    assert_one_line_error(cli("ingest", missing, "--out", tmp_path / "tl"), str(missing), "does not exist")


# ----------------------------------------------------------------------------------------------- mappings

MAPPING_CASES = [
    ("invalid-toml-line-3.toml", ["invalid TOML", "line 3"]),
    ("unknown-keys.toml", ["colour", "[Patient].shoe_size", "[Condition].flavour"]),
    ("wrong-types.toml", ["version", "name", "[Patient].birth_date", "[Condition].time", "[Condition].code"]),
]


@pytest.mark.parametrize(("name", "needles"), MAPPING_CASES, ids=[c[0] for c in MAPPING_CASES])
def test_bad_mapping_reports_every_problem_at_once(tmp_path: Path, fixtures_dir: Path, name: str,
                                                   needles: list[str]) -> None:
    mapping = BAD_MAPPINGS / name
    proc = cli("ingest", fixtures_dir / "server" / "export", "--out", tmp_path / "tl", "--mapping", mapping)
    assert_one_line_error(proc, str(mapping), *needles)
    assert not (tmp_path / "tl" / "events.parquet").exists()


def test_unknown_mapping_name(tmp_path: Path, fixtures_dir: Path) -> None:
    proc = cli("ingest", fixtures_dir / "server" / "export", "--out", tmp_path / "tl", "--mapping", "no-such-map")
    assert_one_line_error(proc, "no-such-map")


# -------------------------------------------------------------------------------- trained tiny model (module)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, fixtures_dir: Path) -> dict[str, Path]:
    """A timelines dir and the smallest model `train` allows (no DP: only its files matter here).

    The timelines include the year-1 / year-9999 and 1e308 inputs, so training on them is checked too.
    """
    work = tmp_path_factory.mktemp("tiny")
    proc = cli("ingest", fixtures_dir / "server" / "export", BAD_INGEST / "dates-in-year-0001.ndjson",
               BAD_INGEST / "dates-in-year-9999.ndjson", BAD_INGEST / "huge-and-nan-values.ndjson",
               "--out", work / "tl")
    assert proc.returncode == 0, proc.stderr
    proc = cli("train", work / "tl", "--out", work / "model", "--no-dp", "--epochs", "1", "--d-model", "8",
               "--layers", "1", "--heads", "1", "--max-len", "64", "--batch-size", "8", "--device", "cpu",
               timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"timelines": work / "tl", "model": work / "model"}


# ---------------------------------------------------------------------------------------------- CLI flags

TRAIN_FLAG_CASES = [
    (["--epsilon", "-1"], ["--epsilon"]),
    (["--epsilon", "abc"], ["--epsilon", "abc"]),
    (["--delta", "2"], ["--delta"]),
]


@pytest.mark.parametrize(("flags", "needles"), TRAIN_FLAG_CASES, ids=[" ".join(c[0]) for c in TRAIN_FLAG_CASES])
def test_train_bad_flags(tmp_path: Path, tiny: dict[str, Path], flags: list[str], needles: list[str]) -> None:
    proc = cli("train", tiny["timelines"], "--out", tmp_path / "m", "--device", "cpu", *flags)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "m" / "privacy.json").exists()


def test_train_missing_timelines_dir(tmp_path: Path) -> None:
    missing = tmp_path / "no-timelines"
    assert_one_line_error(cli("train", missing, "--out", tmp_path / "m"), str(missing))


def test_train_huge_epsilon_is_refused(tmp_path: Path, tiny: dict[str, Path]) -> None:
    """An epsilon above the meaningful range is refused at once with one line naming --epsilon (before it could
    start a noise-multiplier search that does not terminate); the timeout only guards against a hang."""
    proc = cli("train", tiny["timelines"], "--out", tmp_path / "m", "--epsilon", "1000", "--epochs", "1",
               "--batch-size", "8", "--d-model", "8", "--layers", "1", "--heads", "1", "--max-len", "64",
               "--device", "cpu", timeout=300)
    assert proc.returncode == 2
    assert_one_line_error(proc, "--epsilon", "1000")
    assert not (tmp_path / "m").exists()


GENERATE_FLAG_CASES = [
    (["--age", "60-40"], ["--age", "60", "40"]),
    (["--age", "old"], ["--age", "old"]),
    (["--condition", "http://snomed.info/sct-44054006"], ["--condition", "SYSTEM|CODE"]),
    (["-n", "0"], ["-n"]),
    (["-n", "-5"], ["-n"]),
    (["--format", "xml"], ["--format", "xml"]),
    (["--profile", "nope"], ["--profile", "nope"]),
    (["--sex", "x"], ["--sex"]),
]


@pytest.mark.parametrize(("flags", "needles"), GENERATE_FLAG_CASES,
                         ids=[" ".join(c[0]) for c in GENERATE_FLAG_CASES])
def test_generate_bad_flags(tmp_path: Path, tiny: dict[str, Path], flags: list[str], needles: list[str]) -> None:
    args = ["generate", tiny["model"], "--out", tmp_path / "ex"]
    if "-n" not in flags:
        args += ["-n", "2"]
    proc = cli(*args, *flags)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "ex" / "manifest.json").exists()


def test_generate_missing_model_dir(tmp_path: Path) -> None:
    missing = tmp_path / "no-model"
    assert_one_line_error(cli("generate", missing, "-n", "2", "--out", tmp_path / "ex"), str(missing))


@pytest.mark.parametrize(("flags", "needles"), [
    (["--port", "70000"], ["--port"]),
    (["--data", "/nonexistent/export"], ["/nonexistent/export"]),
    ([], ["--data"]),
    (["-n", "3"], ["-n"]),
], ids=["port-out-of-range", "missing-export-dir", "no-source", "n-without-model"])
def test_serve_bad_flags(flags: list[str], needles: list[str]) -> None:
    assert_one_line_error(cli("serve", "--port", str(free_port()), *flags, timeout=30), *needles)


def test_serve_refuses_untagged_data(fixtures_dir: Path) -> None:
    """Real-looking data without the HTEST marker is never served (privacy guard), named by file:line."""
    untagged = fixtures_dir / "server" / "untagged"
    proc = cli("serve", "--data", untagged, "--port", str(free_port()), timeout=30)
    assert_one_line_error(proc, str(untagged / "Patient.ndjson"), "HTEST")


def test_serve_export_with_invalid_json_line(tmp_path: Path, fixtures_dir: Path) -> None:
    export = tmp_path / "export"
    shutil.copytree(fixtures_dir / "server" / "export", export)
    lines = (export / "Patient.ndjson").read_bytes().splitlines()
    bad_line = len(lines) // 2 + 1
    lines[bad_line - 1] = lines[bad_line - 1][:40]
    (export / "Patient.ndjson").write_bytes(b"\n".join(lines) + b"\n")
    proc = cli("serve", "--data", export, "--port", str(free_port()), timeout=30)
    assert_one_line_error(proc, f"Patient.ndjson:{bad_line}", "invalid JSON")


def test_serve_db_that_is_not_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "store.sqlite"
    db.write_bytes(b"this is not a database\n" * 100)
    proc = cli("serve", "--db", db, "--port", str(free_port()), timeout=30)
    assert_one_line_error(proc, str(db), "not a database")


@pytest.mark.parametrize(("flags", "needles"), [
    (["--url", "not-a-url"], ["--url", "not-a-url"]),
    (["--url", "http://127.0.0.1:9", "--max-entries", "0"], ["--max-entries", "0"]),
], ids=["bad-url", "max-entries-0"])
def test_load_bad_usage(fixtures_dir: Path, flags: list[str], needles: list[str]) -> None:
    assert_one_line_error(cli("load", fixtures_dir / "server" / "export", *flags, timeout=30), *needles)


@pytest.mark.parametrize("flag", ["--synthetic", "--holdout", "--model"])
def test_evaluate_missing_dirs(tmp_path: Path, tiny: dict[str, Path], flag: str) -> None:
    missing = tmp_path / "missing"
    args = {"--synthetic": tiny["timelines"], "--holdout": None, "--model": None}
    args[flag] = missing
    cmd = ["evaluate", "--real", tiny["timelines"], "--out", tmp_path / "report"]
    cmd += [x for k, v in args.items() if v is not None for x in (k, v)]
    proc = cli(*cmd)
    assert_one_line_error(proc, str(missing), flag)
    assert not (tmp_path / "report" / "report.json").exists()


def test_ingest_negative_max_examples(tmp_path: Path, fixtures_dir: Path) -> None:
    proc = cli("ingest", fixtures_dir / "server" / "export", "--out", tmp_path, "--max-examples", "-1")
    assert_one_line_error(proc, "--max-examples")


# ---------------------------------------------------------------------------------------------- model dirs


def _break_version(d: Path) -> str:
    cfg = json.loads((d / "config.json").read_text())
    cfg["format_version"] = 99
    (d / "config.json").write_text(json.dumps(cfg))
    return "config.json"


def _corrupt_weights(d: Path) -> str:
    data = (d / "model.pt").read_bytes()
    (d / "model.pt").write_bytes(data[: len(data) // 3])
    return "model.pt"


def _drop_privacy(d: Path) -> str:
    (d / "privacy.json").unlink()
    return "privacy.json"


def _empty(d: Path) -> str:
    for p in d.iterdir():
        p.unlink()
    return str(d)


def _bad_vocab(d: Path) -> str:
    (d / "vocab.json").write_text('{"tokens": [')
    return "vocab.json"


MODEL_BREAKS = {
    "different-format-version": _break_version,
    "truncated-weights": _corrupt_weights,
    "missing-privacy-json": _drop_privacy,
    "empty-dir": _empty,
    "invalid-vocab-json": _bad_vocab,
}


@pytest.fixture(scope="module")
def broken_model_runs(tmp_path_factory: pytest.TempPathFactory, tiny: dict[str, Path]) -> dict:
    """`generate` on every broken copy of the tiny model, run concurrently (each pays a torch import)."""
    work = tmp_path_factory.mktemp("broken-models")
    jobs, what = {}, {}
    for case, breaker in MODEL_BREAKS.items():
        model = work / case / "model"
        shutil.copytree(tiny["model"], model)
        what[case] = breaker(model)
        jobs[case] = subprocess.Popen(
            [sys.executable, "-m", "fhirsynth", "-q", "generate", str(model), "-n", "2", "--out",
             str(work / case / "ex")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    runs = {}
    for case, proc in jobs.items():
        stdout, stderr = proc.communicate(timeout=120)
        runs[case] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), what[case],
                      work / case / "ex")
    return runs


@pytest.mark.parametrize("case", sorted(MODEL_BREAKS))
def test_generate_from_broken_model_dir(broken_model_runs: dict, case: str) -> None:
    proc, what, out = broken_model_runs[case]
    assert_one_line_error(proc, what)
    assert not (out / "manifest.json").exists()


def test_serve_from_model_of_other_version(tmp_path: Path, tiny: dict[str, Path]) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny["model"], model)
    _break_version(model)
    proc = cli("serve", "--model", model, "-n", "2", "--port", str(free_port()), timeout=60)
    assert_one_line_error(proc, "config.json", "version")


def test_tiny_model_still_generates(tmp_path: Path, tiny: dict[str, Path]) -> None:
    """The control: the unbroken model dir works, so the failures above are the breakage, not the fixture."""
    proc = cli("generate", tiny["model"], "-n", "3", "--out", tmp_path / "ex")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "ex" / "manifest.json").read_text())
    assert {o["type"]: o["count"] for o in manifest["output"]}["Patient"] == 3
    for o in manifest["output"]:
        assert count_lines(tmp_path / "ex" / o["url"]) == o["count"]


# ----------------------------------------------------------------------------------------- API parameters


@pytest.fixture(scope="module")
def api(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    db = tmp_path_factory.mktemp("api") / "store.sqlite"
    env = {k: v for k, v in ENV.items() if k != "FHIRSYNTH_SERVER_TOKEN"}
    with running_server(["--data", fixtures_dir / "server" / "export", "--db", db], env) as server:
        yield server.base
    assert "Traceback" not in server.stderr


# (method, path, query, headers, status, text the diagnostics must contain, expression (param) or None)
API_CASES = [
    ("GET", "/Patient", {"birthdate": "2020-13-45"}, {}, 400, "2020-13-45", "birthdate"),
    ("GET", "/Observation", {"date": "ge2020-01-01T25:00"}, {}, 400, "25:00", "date"),
    ("GET", "/Patient", {"birthdate": "0000-01-01"}, {}, 400, "0000-01-01", "birthdate"),
    ("GET", "/Patient", {"shoe-size": "42"}, {}, 400, "shoe-size", "shoe-size"),
    ("GET", "/Patient", {"_count": "abc"}, {}, 400, "abc", "_count"),
    ("GET", "/Patient", {"_count": "-1"}, {}, 400, "negative", "_count"),
    ("GET", "/Patient", {"birthdate": "xx2020"}, {}, 400, "xx2020", "birthdate"),
    ("GET", "/Observation", {"value-quantity": "zz5"}, {}, 400, "zz5", "value-quantity"),
    ("GET", "/Patient", {"gender:sideways": "female"}, {}, 400, ":sideways", "gender:sideways"),
    ("GET", "/Patient", {"_sort": "shoe-size"}, {}, 400, "shoe-size", "_sort"),
    ("GET", "/Spaceship", {}, {}, 404, "Spaceship", None),
    ("GET", "/Spaceship/1", {}, {}, 404, "Spaceship", None),
    ("GET", "/Patient/no-such-patient", {}, {}, 404, "no-such-patient", None),
    ("GET", "/Patient/no-such-patient/$everything", {}, {}, 404, "no-such-patient", None),
    ("GET", "/Patient", {"_format": "xml"}, {}, 406, "xml", None),
    ("GET", "/Patient", {}, {"Accept": "application/fhir+xml"}, 406, "xml", None),
    ("DELETE", "/Patient/x", {}, {}, 405, "DELETE", None),
    ("PUT", "/Patient/x", {}, {}, 405, "PUT", None),
]


@pytest.mark.parametrize(("method", "path", "query", "headers", "status", "text", "expression"), API_CASES,
                         ids=[f"{c[0]} {c[1]} {c[2] or c[3]}" for c in API_CASES])
def test_api_bad_parameters(api: str, method: str, path: str, query: dict, headers: dict, status: int, text: str,
                            expression: str | None) -> None:
    resp = httpx.request(method, f"{api}{path}", params=query, headers=headers, timeout=30)
    assert resp.status_code == status, resp.text[:500]
    assert resp.headers["content-type"].startswith("application/fhir+json")
    body = resp.json()
    assert body["resourceType"] == "OperationOutcome"
    issue = body["issue"][0]
    assert issue["severity"] == "error"
    assert text in issue["diagnostics"], issue
    if expression is not None:
        assert issue.get("expression") == [expression], issue
