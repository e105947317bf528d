"""`fhirsynth evaluate` end to end: both report files, strict JSON, self-contained HTML, clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fhirsynth.cli import main
from fhirsynth.evaluate.toy import toy_timelines
from fhirsynth.timeline.io import write_timelines


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evalcli")
    out = {}
    for name, seed in (("real", 11), ("holdout", 12), ("synthetic", 13)):
        write_timelines(toy_timelines(150, seed=seed, visits_per_year=0.6, id_prefix=name[0]), root / name)
        out[name] = root / name
    out["root"] = root
    return out


def _strict_json(path: Path) -> dict:
    def bad(const: str) -> None:
        raise AssertionError(f"non-standard JSON constant {const} in {path}")

    return json.loads(path.read_text(), parse_constant=bad)


def test_cli_writes_json_and_self_contained_html(dirs, capsys):
    out = dirs["root"] / "report"
    rc = main(["evaluate", "--real", str(dirs["real"]), "--synthetic", str(dirs["synthetic"]),
               "--holdout", str(dirs["holdout"]), "--out", str(out), "--validity-sample", "20"])
    assert rc == 0
    report = _strict_json(out / "report.json")
    assert set(report["fidelity"]) == {"synthetic", "holdout"}
    for key in ("utility", "privacy", "plausibility", "summary", "meta"):
        assert key in report
    assert report["meta"]["real"]["patients"] == 150
    assert 0.0 <= report["privacy"]["dcr"]["share_closer_to_training"] <= 1.0
    metrics = {row["metric"] for row in report["summary"]}
    assert {"Condition prevalence R²", "Detection AUC", "DCR share closer to training"} <= metrics
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "data:image/png;base64," in html
    # self-contained: nothing is fetched; every src is an inline data URI (code systems in text are not fetches)
    assert not re.search(r"<script|<link|<iframe|\bhref\s*=|url\(|@import", html, re.I)
    srcs = re.findall(r"\bsrc\s*=\s*(\S{0,24})", html, re.I)
    assert srcs and all(s.startswith('"data:image/png;base64,') for s in srcs), srcs[:3]
    assert "Condition prevalence" in html
    # a timelines dir as --synthetic still gets a FHIR validity rate, from a bounded sample
    validity = report["plausibility"]["fhir_validity_synthetic"]
    assert validity["patients_sampled"] == 20 and validity["valid_rate"] == 1.0
    assert next(r for r in report["summary"] if r["metric"] == "FHIR validity rate")["synthetic"] == 1.0


def test_cli_without_holdout_reports_reasons(dirs):
    out = dirs["root"] / "report2"
    assert main(["evaluate", "--real", str(dirs["real"]), "--synthetic", str(dirs["synthetic"]), "--out", str(out),
                 "--no-html", "--validity-sample", "10"]) == 0
    report = _strict_json(out / "report.json")
    assert not (out / "report.html").exists()
    assert "holdout" in report["privacy"]["dcr"]["reason"]
    assert report["privacy"]["formal"]["available"] is False
    assert report["fidelity"]["synthetic"]["prevalence"]["condition"]["r2"] is not None


def test_cli_bad_input_one_line_exit_2(dirs, tmp_path, capsys):
    rc = main(["evaluate", "--real", str(tmp_path / "missing"), "--synthetic", str(dirs["synthetic"]),
               "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--real" in err[0] and "missing" in err[0]
    (tmp_path / "empty").mkdir()
    rc = main(["evaluate", "--real", str(dirs["real"]), "--synthetic", str(tmp_path / "empty"),
               "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "--synthetic" in capsys.readouterr().err


def test_broken_model_dir_fails_fast(dirs, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "privacy.json").write_text(json.dumps({"epsilon": 3.0, "delta": 1e-5}))
    rc = main(["evaluate", "--real", str(dirs["real"]), "--synthetic", str(dirs["synthetic"]),
               "--model", str(model), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    # a model dir without weights, config and vocab is refused before any work, naming what is missing
    assert rc == 2 and "model" in err and "missing" in err and not (tmp_path / "r" / "report.json").exists()


def test_export_dir_is_ingested(dirs, tmp_path):
    from fhirsynth.export import writer
    from fhirsynth.evaluate.report import evaluate
    from fhirsynth.timeline.assembler import GeneratorInfo
    from fhirsynth.timeline.io import read_timelines

    subset = list(read_timelines(dirs["synthetic"]))[:40]
    export = tmp_path / "export"
    writer.write_export(subset, export, generator=GeneratorInfo(model_hash="test", epsilon=None, delta=None))
    write_timelines(subset, tmp_path / "direct")
    via_export = evaluate(dirs["real"], export, out_dir=tmp_path / "r1", html=False, validity_sample=10)
    direct = evaluate(dirs["real"], tmp_path / "direct", out_dir=tmp_path / "r2", html=False, validity_sample=10)
    # both paths validate FHIR: the export's own resources, or a sample of the timelines assembled
    assert via_export["plausibility"]["fhir_validity_synthetic"]["source"] == "export dir resources"
    assert direct["plausibility"]["fhir_validity_synthetic"]["patients_sampled"] == 10
    assert via_export["plausibility"]["fhir_validity_synthetic"]["valid_rate"] == 1.0
    assert direct["plausibility"]["fhir_validity_synthetic"]["valid_rate"] == 1.0
    assert via_export["meta"]["synthetic"]["patients"] == 40
    # the FHIR round trip (assemble -> NDJSON -> ingest) must not change the statistics
    for key in ("prevalence", "cooccurrence", "marginal"):
        assert via_export["fidelity"]["synthetic"][key] == direct["fidelity"]["synthetic"][key]


def test_claimed_epsilon_reads_model_privacy_reports():
    from fhirsynth.evaluate.report import claimed_epsilon

    assert claimed_epsilon({"dp": True, "epsilon_total": 0.99, "epsilon_prv": 0.7}) == 0.99
    assert claimed_epsilon({"epsilon": 3}) == 3.0
    assert claimed_epsilon({"dp": False, "epsilon_total": None}) is None


def test_negative_canaries_is_a_usage_error(dirs, tmp_path, capsys):
    rc = main(["evaluate", "--real", str(dirs["real"]), "--synthetic", str(dirs["synthetic"]),
               "--out", str(tmp_path / "o"), "--audit-canaries", "-3"])
    assert rc == 2 and "--audit-canaries" in capsys.readouterr().err
