"""GET /$privacy-report: the guarantee and the measured quality of the data this endpoint serves.

A consumer of a synthetic endpoint should not have to trust documentation: the operation returns a Parameters
resource with the formal guarantee (epsilon, delta, unit, accountants) read from the model's privacy.json (attached
whole), and, only when the operator opts in with `serve --report`, the headline scalar metrics of
`fhirsynth evaluate`. The full report.json / report.html are never served: they hold distributions of the real data
that no DP mechanism protects. Even the scalar metrics are computed on real data without DP, which the response says.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from fhirsynth.api.context import ServerContext, fhir_response
from fhirsynth.api.errors import outcome_response
from fhirsynth.timeline.assembler import HTEST

log = logging.getLogger(__name__)



def _read_json(path: Path | None) -> tuple[dict[str, Any] | None, bytes | None]:
    if path is None or not path.is_file():
        return None, None
    raw = path.read_bytes()
    try:
        return orjson.loads(raw), raw
    except orjson.JSONDecodeError:
        log.warning("ignoring unreadable %s", path)
        return None, None


def _value(v: Any) -> dict[str, Any]:
    if isinstance(v, bool):
        return {"valueBoolean": v}
    if isinstance(v, int):
        return {"valueInteger": v} if abs(v) < 2**31 else {"valueDecimal": v}
    if isinstance(v, float):
        return {"valueDecimal": round(v, 6)}
    return {"valueString": str(v)}


def _attachment(name: str, raw: bytes, title: str) -> dict[str, Any]:
    return {"name": name, "valueAttachment": {"contentType": "application/json", "title": title,
                                              "data": base64.b64encode(raw).decode("ascii")}}


def privacy_parameters(model_dir: Path | None, report_dir: Path | None) -> dict[str, Any] | None:
    """The Parameters resource, or None when neither a model nor an evaluation report is configured."""
    privacy, privacy_raw = _read_json(model_dir / "privacy.json" if model_dir else None)
    report, _ = _read_json(report_dir / "report.json" if report_dir else None)
    if privacy is None and report is not None:
        formal = report.get("privacy", {}).get("formal")
        if isinstance(formal, dict) and formal.get("available", True):
            privacy = formal
    if privacy is None and report is None:
        return None
    params: list[dict[str, Any]] = []
    if privacy is not None:
        dp = privacy.get("dp", True)
        params.append({"name": "differentialPrivacy", "valueBoolean": bool(dp)})
        for key in ("unit", "epsilon_total", "delta", "epsilon_prv", "epsilon_rdp", "epsilon_preprocessing",
                    "noise_multiplier", "sample_rate", "steps", "max_grad_norm", "n"):
            if privacy.get(key) is not None:
                params.append({"name": key, **_value(privacy[key])})
        if not dp:
            params.append({"name": "warning", "valueString": "trained without differential privacy "
                           "(epsilon = infinity): no formal guarantee"})
    if report is not None:
        params.append({"name": "metricsNote", "valueString": "evaluation metrics compare the synthetic data with the "
                       "real data; they are computed without differential privacy and published by the operator"})
        for row in report.get("summary", []) or []:
            if isinstance(row, dict) and isinstance(row.get("synthetic"), (int, float)):
                params.append({"name": "metric", "part": [
                    {"name": "group", "valueString": str(row.get("group"))},
                    {"name": "name", "valueString": str(row.get("metric"))},
                    {"name": "synthetic", **_value(float(row["synthetic"]))},
                    *([{"name": "reference", **_value(float(row["reference"]))}]
                      if isinstance(row.get("reference"), (int, float)) else []),
                ]})
    if privacy_raw is not None:
        params.append(_attachment("privacyReport", privacy_raw, "privacy.json (model dir)"))
    return {"resourceType": "Parameters", "meta": {"security": [HTEST], "tag": [HTEST]}, "parameter": params}


def add_routes(router: APIRouter, ctx: ServerContext) -> None:
    @router.get("/$privacy-report", summary="the privacy guarantee and evaluation of the served data")
    async def privacy_report(request: Request) -> Response:
        body = privacy_parameters(ctx.settings.model_dir, ctx.settings.report_dir)
        if body is None:
            return outcome_response(404, "no privacy report configured: serve with --model MODEL_DIR or "
                                    "--report REPORT_DIR", code="not-found")
        return fhir_response(orjson.dumps(body))
