"""GET /$privacy-report: the guarantee and the measured quality of the data this endpoint serves.

A consumer of a synthetic endpoint should not have to trust documentation: the operation returns a Parameters
resource. What it serves, and why each part is safe to serve:

- Always (with `serve --model`): the formal guarantee from the model's privacy.json (epsilon, delta, unit,
  accountants; attached whole). Everything in it is either a public setting or DP-accounted; the one exception is
  the training-set size n (and sample_rate = batch/n, the vocabulary threshold), which DP-SGD accounting treats
  as public, as is usual; an operator for whom the cohort size is secret must not serve the model's privacy.json.
- Only when the operator opts in with `serve --report REPORT_DIR`: the *synthetic* value of each headline scalar of
  `fhirsynth evaluate`, each marked with what it was computed from. Metrics of the synthetic data alone (the
  plausibility rates, FHIR validity of the synthetic data) are post-processing of the DP output and cost no
  privacy. Every other metric (fidelity against real, TSTR, attacks, copies, DCR) is a scalar computed on the
  real records WITHOUT DP: each leaks a little (a bounded-sensitivity number, not noised). Publishing them is the
  operator's decision, which `--report` is, and the response says so (metricsNote, part computedFrom).
- Never: the "reference" column (holdout vs training, TRTR, the real data's own plausibility rates, the
  attribute-inference base rate). Those are statistics of the real cohort alone, they say nothing about the
  synthetic data that the metric's ideal value does not, so the public ideal is served instead. Never the full
  report.json / report.html (distributions, per-code prevalences, plots of the real data), nor the canary audit.
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


# Summary rows whose synthetic value is computed from the synthetic data alone (see evaluate/report.py
# summary_rows): plausibility rates and the FHIR validity of the synthetic resources. Anything not listed counts
# as computed from real data.
_SYNTHETIC_ONLY_GROUPS = frozenset({"plausibility", "validity"})


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def computed_from(row: dict[str, Any]) -> str:
    """"synthetic" for a metric of the synthetic data alone (DP post-processing), else "real" (uses real records,
    not DP). Unknown groups count as real: the safe default."""
    return "synthetic" if row.get("group") in _SYNTHETIC_ONLY_GROUPS else "real"


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
                    "epsilon_measurements", "noise_multiplier", "sample_rate", "steps", "max_grad_norm", "n_estimate", "guarantee"):
            if privacy.get(key) is not None:
                params.append({"name": key, **_value(privacy[key])})
        if not dp:
            params.append({"name": "warning", "valueString": "trained without differential privacy "
                           "(epsilon = infinity): no formal guarantee"})
    if report is not None:
        params.append({"name": "metricsNote", "valueString": "evaluation metrics marked computedFrom=real compare "
                       "the synthetic data with the real data; they are computed without differential privacy and "
                       "published by the operator. Metrics marked computedFrom=synthetic use the synthetic data "
                       "only. Statistics of the real data alone (the evaluation's reference column) are not served."})
        for row in report.get("summary", []) or []:
            if not (isinstance(row, dict) and _is_number(row.get("synthetic"))):
                continue
            if str(row.get("metric", "")).startswith("Formal"):
                continue  # the guarantee is served above, from privacy.json, not re-derived from the report
            params.append({"name": "metric", "part": [
                {"name": "group", "valueString": str(row.get("group"))},
                {"name": "name", "valueString": str(row.get("metric"))},
                {"name": "synthetic", **_value(float(row["synthetic"]))},
                {"name": "computedFrom", "valueString": computed_from(row)},
                *([{"name": "ideal", **_value(float(row["ideal"]))}] if _is_number(row.get("ideal")) else []),
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
