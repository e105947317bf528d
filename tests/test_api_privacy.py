"""GET /$privacy-report publishes the model's computed guarantee and the evaluation beside the data."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fhirsynth.api.app import create_app
from fhirsynth.api.settings import ServerSettings
from fhirsynth.store.sqlite import Store

PRIVACY = {"unit": "patient", "dp": True, "n": 800, "epsilon_total": 7.99, "epsilon_prv": 5.4, "epsilon_rdp": 5.99,
           "epsilon_preprocessing": 2.0, "epsilon_measurements": 1.6, "delta": 1e-5, "noise_multiplier": 1.23, "sample_rate": 0.08, "steps": 56}


def _client(tmp_path: Path, *, model_dir: Path | None = None, report_dir: Path | None = None) -> TestClient:
    settings = ServerSettings(db_path=tmp_path / "s.db", model_dir=model_dir, report_dir=report_dir)
    return TestClient(create_app(settings, store=Store(settings.db_path)))


def _params(body: dict) -> dict:
    return {p["name"]: p for p in body["parameter"] if p["name"] != "metric"}


def test_reports_the_models_privacy_json(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "privacy.json").write_text(json.dumps(PRIVACY))
    with _client(tmp_path, model_dir=model) as client:
        resp = client.get("/$privacy-report")
        assert resp.status_code == 200
        body = resp.json()
        assert body["resourceType"] == "Parameters"
        assert body["meta"]["security"][0]["code"] == "HTEST"
        p = _params(body)
        assert p["epsilon_total"]["valueDecimal"] == pytest.approx(7.99)
        assert p["delta"]["valueDecimal"] == pytest.approx(1e-5)
        # the share of epsilon spent on the calibration statistics is served beside the other parts
        assert p["epsilon_measurements"]["valueDecimal"] == pytest.approx(1.6)
        assert p["unit"]["valueString"] == "patient"
        assert p["differentialPrivacy"]["valueBoolean"] is True
        attached = json.loads(base64.b64decode(p["privacyReport"]["valueAttachment"]["data"]))
        assert attached == PRIVACY
        ops = {o["name"] for o in client.get("/metadata").json()["rest"][0]["operation"]}
        assert "privacy-report" in ops


def test_falls_back_to_the_evaluation_report_and_lists_metrics(tmp_path: Path) -> None:
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    report = {"privacy": {"formal": {"available": True, **PRIVACY, "dp": False, "epsilon_total": None}},
              "summary": [{"group": "fidelity", "metric": "Condition prevalence R²", "synthetic": 0.8,
                           "reference": 0.95, "ideal": 1.0}]}
    (report_dir / "report.json").write_text(json.dumps(report))
    with _client(tmp_path, report_dir=report_dir) as client:
        body = client.get("/$privacy-report").json()
        p = _params(body)
        assert p["differentialPrivacy"]["valueBoolean"] is False
        assert "epsilon = infinity" in p["warning"]["valueString"]
        metrics = [m for m in body["parameter"] if m["name"] == "metric"]
        assert metrics and metrics[0]["part"][2]["valueDecimal"] == pytest.approx(0.8)
        assert "metricsNote" in p
        assert not any("valueAttachment" in x for x in body["parameter"])  # real-data distributions stay private


def test_without_model_or_report_it_is_a_404_outcome(tmp_path: Path) -> None:
    with _client(tmp_path) as client:
        resp = client.get("/$privacy-report")
        assert resp.status_code == 404
        assert resp.json()["resourceType"] == "OperationOutcome"
