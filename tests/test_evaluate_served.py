"""What /$privacy-report may publish from a real `fhirsynth evaluate` report: synthetic values only, each marked
with what it was computed from; never the real-only reference column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhirsynth.evaluate.report import evaluate
from fhirsynth.evaluate.toy import toy_timelines
from fhirsynth.timeline.io import write_timelines

from fhirsynth.api import privacy as privacy_api  # noqa: E402


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("served")
    for name, seed in (("real", 31), ("holdout", 32), ("synthetic", 33)):
        write_timelines(toy_timelines(60, seed=seed, visits_per_year=0.4, id_prefix=name[0]), root / name)
    evaluate(root / "real", root / "synthetic", holdout=root / "holdout", out_dir=root / "report", html=False,
             validity_sample=5)
    return root / "report"


def _metrics(body: dict) -> list[dict[str, dict]]:
    return [{p["name"]: p for p in m["part"]} for m in body["parameter"] if m["name"] == "metric"]


def test_serves_synthetic_values_never_the_reference_column(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    rows = {r["metric"]: r for r in report["summary"]}
    assert any(isinstance(r.get("reference"), float) for r in rows.values())  # there was something to withhold
    body = privacy_api.privacy_parameters(None, report_dir)
    metrics = _metrics(body)
    served = {m["name"]["valueString"] for m in metrics}
    expected = {k for k, r in rows.items() if isinstance(r.get("synthetic"), int | float)
                and not k.startswith("Formal")}
    assert served == expected
    for m in metrics:
        assert "reference" not in m
        row = rows[m["name"]["valueString"]]
        assert m["synthetic"]["valueDecimal"] == pytest.approx(row["synthetic"], abs=1e-6)
        synthetic_only = row["group"] in ("plausibility", "validity")
        assert m["computedFrom"]["valueString"] == ("synthetic" if synthetic_only else "real")
    # no attachment of the report (distributions of the real data), and the note says what is not DP
    assert not any("valueAttachment" in p for p in body["parameter"])
    note = next(p for p in body["parameter"] if p["name"] == "metricsNote")["valueString"]
    assert "without differential privacy" in note


def test_unknown_groups_count_as_real():
    assert privacy_api.computed_from({"group": "something-new"}) == "real"
    assert privacy_api.computed_from({"group": "plausibility"}) == "synthetic"
    assert privacy_api.computed_from({"group": "validity"}) == "synthetic"
