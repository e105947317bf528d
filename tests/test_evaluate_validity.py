"""FHIR validity rate of a synthetic *timelines* dir: a bounded, seeded sample assembled and validated."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path

import pytest

from fhirsynth.evaluate.plausibility import fhir_validity_timelines, sample_timelines_dir
from fhirsynth.evaluate.toy import toy_timelines
from fhirsynth.timeline.io import read_timelines, write_timelines
from fhirsynth.timeline.types import Event, Timeline



@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("validity") / "toy"
    write_timelines(toy_timelines(30, seed=21, visits_per_year=0.3), out)
    return out


def test_sample_is_bounded_seeded_and_complete(toy_dir):
    full = {t.patient.patient_id: t for t in read_timelines(toy_dir)}
    a = sample_timelines_dir(toy_dir, 10, seed=1)
    assert len(a) == 10 and len({t.patient.patient_id for t in a}) == 10
    # every sampled patient comes back with all of its events, unchanged
    for t in a:
        assert t.events == full[t.patient.patient_id].events
    assert [t.patient.patient_id for t in sample_timelines_dir(toy_dir, 10, seed=1)] == \
        [t.patient.patient_id for t in a]
    assert {t.patient.patient_id for t in sample_timelines_dir(toy_dir, 10, seed=2)} != \
        {t.patient.patient_id for t in a}
    assert len(sample_timelines_dir(toy_dir, 1000, seed=1)) == 30  # smaller cohort: everyone


def test_valid_toy_timelines_rate_one(toy_dir):
    res = fhir_validity_timelines(toy_dir, sample=12, seed=0)
    assert res["computable"] and res["patients_sampled"] == 12
    assert res["by_type"]["Patient"]["checked"] == 12 and res["by_type"]["Provenance"]["checked"] == 12
    assert res["checked"] == sum(s["checked"] for s in res["by_type"].values())
    assert res["valid_rate"] == 1.0, res["examples"]


def test_invalid_resources_are_counted_with_first_problems(toy_dir, tmp_path):
    """A code system with spaces violates the FHIR uri pattern: every such Condition must be flagged."""
    bad = []
    n_bad = 0
    for t in list(read_timelines(toy_dir))[:8]:
        enc = next(e for e in t.events if e.kind == "encounter")
        ev = Event(time=enc.time + timedelta(minutes=1), kind="condition", system="not a uri", code="123",
                   display="broken", encounter_id=enc.encounter_id)
        bad.append(Timeline(dataclasses.replace(t.patient), [*t.events, ev]).sorted())
        n_bad += 1
    write_timelines(bad, tmp_path / "bad")
    res = fhir_validity_timelines(tmp_path / "bad", sample=200, seed=0)
    assert res["patients_sampled"] == 8
    assert res["invalid"] == n_bad == res["by_type"]["Condition"]["invalid"]
    assert res["valid_rate"] == pytest.approx(1 - n_bad / res["checked"])
    assert res["examples"] and "Condition/" in res["examples"][0] and "system" in res["examples"][0]


def test_per_type_cap_counts_what_it_skips(toy_dir):
    res = fhir_validity_timelines(toy_dir, sample=30, seed=0, per_type=5)
    obs = res["by_type"]["Observation"]
    assert obs["checked"] == 5 and obs["skipped_over_cap"] > 0
    assert res["per_type_cap"] == 5


def test_report_has_validity_for_timelines_input(toy_dir, tmp_path):
    from fhirsynth.cli import main
    from fhirsynth.evaluate.report import evaluate

    rep = evaluate(toy_dir, toy_dir, out_dir=tmp_path / "r", html=True, validity_sample=6)
    pl = rep["plausibility"]
    assert pl["fhir_validity_synthetic"]["patients_sampled"] == 6
    assert pl["fhir_validity_real"]["patients_sampled"] == 6
    row = next(r for r in rep["summary"] if r["metric"] == "FHIR validity rate")
    # the real data's own validity is another figure beside it, not the (holdout-only) reference
    assert row["synthetic"] == 1.0 and row["reference"] is None and row["extras"]["real data"] == 1.0
    assert "6 patients sampled" in (tmp_path / "r" / "report.html").read_text()
    skipped = evaluate(toy_dir, toy_dir, out_dir=tmp_path / "r0", html=False, validity_sample=0)
    assert skipped["plausibility"]["fhir_validity_synthetic"]["computable"] is False
    rc = main(["evaluate", "--real", str(toy_dir), "--synthetic", str(toy_dir), "--out", str(tmp_path / "o"),
               "--validity-sample", "-1"])
    assert rc == 2
