"""`fhirsynth generate` flag checking: bad values are one clear line naming the flag, exit 2."""

from __future__ import annotations

import pytest

from fhirsynth.cli import main
from fhirsynth.commands.generate import parse_age, parse_condition


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--age", "60-40"], "--age"),
        (["--age", "forty"], "--age"),
        (["--condition", "44054006"], "--condition"),
        (["--condition", "http://snomed.info/sct|"], "--condition"),
        (["--format", "csv"], "--format"),
        (["--profile", "uk-core"], "--profile"),
        (["--sex", "f"], "--sex"),
        (["--device", "tpu"], "--device"),
        (["-n", "0"], "-n"),
    ],
)
def test_bad_flags_name_the_flag(tmp_path, capsys, extra, flag):
    argv = ["generate", str(tmp_path), "--out", str(tmp_path / "out")]
    if "-n" not in extra:
        argv += ["-n", "5"]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fhirsynth generate: error: ") and flag in err[0], err
    assert not (tmp_path / "out").exists()


def test_missing_model_dir(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "-n", "1", "--out", str(tmp_path / "o")]) == 2
    assert "model directory does not exist" in capsys.readouterr().err


def test_parsers():
    assert parse_age(" 40 - 60 ") == (40, 60) and parse_age(None) is None
    assert parse_condition("http://snomed.info/sct|44054006") == ("http://snomed.info/sct", "44054006")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A real (tiny, 1-epoch, DP) model trained on random timelines: generate runs the real sampler."""
    from fhirsynth.model.config import ModelConfig
    from fhirsynth.model.train import train_model
    from fhirsynth.timeline.io import write_timelines
    from fhirsynth.timeline.samples import random_timelines

    root = tmp_path_factory.mktemp("gen")
    write_timelines(random_timelines(40, seed=3, visits=4), root / "timelines")
    report = train_model(root / "timelines", root / "model", dp=True, epsilon=8.0, epochs=1, device="cpu",
                         model_config=ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=256))
    return root / "model", report


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_generate_end_to_end_all_formats(tiny_model, tmp_path, monkeypatch):
    import json

    from fhirsynth.export.bundles import iter_references
    from fhirsynth.export.writer import read_manifest
    from fhirsynth.fhir.validate import validate_resource

    model_dir, privacy = tiny_model
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    for fmt, profile in (("ndjson", "us-core"), ("transaction", "us-core"), ("document", "ips"), ("collection", "ips")):
        out = tmp_path / fmt
        argv = ["generate", str(model_dir), "-n", "4", "--out", str(out), "--format", fmt, "--profile", profile,
                "--device", "cpu", "--seed", "2", "--sex", "female"]
        assert main(argv) == 0
        manifest = read_manifest(out)
        assert manifest["extension"]["fhirsynth"]["patients"] == 4
        resources = []
        for o in manifest["output"]:
            text = (out / o["url"]).read_text()
            docs = [json.loads(line) for line in text.splitlines()] if fmt == "ndjson" else [json.loads(text)]
            for doc in docs:
                assert validate_resource(doc) == []
                resources += [e["resource"] for e in doc["entry"]] if doc["resourceType"] == "Bundle" else [doc]
        patients = [r for r in resources if r["resourceType"] == "Patient"]
        assert len(patients) == 4 and {p["gender"] for p in patients} == {"female"}
        prov = [r for r in resources if r["resourceType"] == "Provenance"]
        assert len(prov) == 4 and prov[0]["recorded"] == "2026-01-01T00:00:00+00:00"
        assert f"epsilon={privacy['epsilon_total']:g}" in prov[0]["policy"][0]
        if fmt == "ndjson":
            ids = {f"{r['resourceType']}/{r['id']}" for r in resources}
            assert all(ref in ids for r in resources for ref in iter_references(r))
    # same seed (and SOURCE_DATE_EPOCH): byte-identical export
    again = tmp_path / "again"
    assert main(["generate", str(model_dir), "-n", "4", "--out", str(again), "--device", "cpu", "--seed", "2",
                 "--sex", "female"]) == 0
    for o in read_manifest(again)["output"]:
        assert (again / o["url"]).read_bytes() == (tmp_path / "ndjson" / o["url"]).read_bytes()


def test_generate_workers_do_not_change_the_output(tiny_model, tmp_path, monkeypatch):
    """--workers only splits the sampling across processes: the export is byte-identical."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")  # one generation timestamp for both runs
    model_dir, _ = tiny_model
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        assert main(["generate", str(model_dir), "-n", "6", "--out", str(out), "--seed", "5",
                     "--device", "cpu", "--workers", workers]) == 0
        outs.append({p.name: p.read_bytes() for p in sorted(out.glob("*.ndjson"))})
    assert outs[0] and outs[0] == outs[1]
