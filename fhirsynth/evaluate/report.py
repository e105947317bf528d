"""evaluate(): run every metric for synthetic-vs-real (and holdout-vs-real as the reference a perfect generator
would reach), write report.json and report.html."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from fhirsynth import __version__
from fhirsynth.errors import UsageError
from fhirsynth.evaluate.cohort import Cohort, load_cohort
from fhirsynth.evaluate.fidelity import fidelity_report
from fhirsynth.evaluate.plausibility import plausibility_report
from fhirsynth.evaluate.privacy import formal_guarantee, privacy_report
from fhirsynth.evaluate.tables import feature_spec, flatten
from fhirsynth.evaluate.utility import utility_report
from fhirsynth.timeline.io import EVENTS_FILE, PATIENTS_FILE

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"


def is_timelines_dir(path: Path) -> bool:
    return (path / EVENTS_FILE).is_file() and (path / PATIENTS_FILE).is_file()


def is_export_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "manifest.json").is_file() or any(
        p.name.endswith((".ndjson", ".ndjson.gz")) for p in path.iterdir()))


def _check_timelines(path: Path | None, flag: str) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    if not is_timelines_dir(path):
        raise UsageError(f"{flag} must be a timelines directory (events.parquet + patients.parquet)", where=str(path))
    return path


def _ingest_export(export_dir: Path, work: Path) -> Path:
    try:
        from fhirsynth.timeline.adapter import ingest  # lazy: helper INGEST's module
    except ImportError as exc:
        raise UsageError(f"--synthetic is an export dir but FHIR ingest is unavailable ({exc}); "
                         "pass a timelines dir instead", where=str(export_dir)) from exc
    out = work / "synthetic-timelines"
    report = ingest([export_dir], out, mapping="us-core")
    log.info("ingested synthetic export %s: %s", export_dir, {k: report[k] for k in list(report)[:6]})
    return out


def clean_json(obj: object) -> object:
    """numpy scalars -> Python, NaN/inf -> None, tuples -> lists (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _get(d: dict, *keys: str) -> object:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def claimed_epsilon(formal: dict) -> float | None:
    """The total epsilon of a privacy report (MODEL writes epsilon_total; plain `epsilon` also accepted);
    None for a model trained without DP or with replayable noise (--reproducible-noise: no guarantee)."""
    if formal.get("dp") is False or formal.get("reproducible_noise"):
        return None
    eps = formal.get("epsilon_total", formal.get("epsilon"))
    return float(eps) if isinstance(eps, int | float) else None


# (label, path into a fidelity dict, ideal)
HEADLINE_FIDELITY = [
    ("Condition prevalence R²", ("prevalence", "condition", "r2"), 1.0),
    ("Observation-code prevalence R²", ("prevalence", "observation", "r2"), 1.0),
    ("Within-visit co-occurrence R²", ("cooccurrence", "r2"), 1.0),
    ("Consecutive-visit transition R²", ("transitions", "r2"), 1.0),
    ("Condition code KL (real‖other)", ("marginal", "condition", "kl"), 0.0),
    ("Age at first event KS", ("distributions", "age_at_first_event_years", "ks"), 0.0),
    ("Events per patient KS", ("distributions", "events_per_patient", "ks"), 0.0),
    ("Visits per patient KS", ("distributions", "visits_per_patient", "ks"), 0.0),
    ("Days between visits KS", ("distributions", "days_between_visits", "ks"), 0.0),
    ("Sex total variation", ("distributions", "sex", "tvd"), 0.0),
    ("Numeric values mean KS (top LOINC)", ("numeric_values_mean_ks",), 0.0),
    ("Ordering |Δ share a-before-b|", ("ordering", "mean_abs_diff"), 0.0),
    ("1-way marginal TVD (flat table)", ("marginal_1way", "tvd"), 0.0),
    ("2-way marginal TVD (flat table)", ("marginal_2way", "tvd"), 0.0),
    ("Detection AUC", ("detection", "auc"), 0.5),
]


def summary_rows(report: dict) -> list[dict]:
    rows = []
    fid = report["fidelity"]
    for label, path, ideal in HEADLINE_FIDELITY:
        head = _get(fid.get("synthetic", {}), *path[:-1]) or {}
        null = head.get("null") if isinstance(head, dict) else None
        note = None
        if isinstance(null, dict) and all(isinstance(null.get(k), int | float) for k in ("median", "lo", "hi")):
            # real vs real at these sample sizes: how far another sample of real patients is
            note = (f"real-vs-real null {null['median']:.3f} [{null['lo']:.3f}, {null['hi']:.3f}]: "
                    f"{head.get('vs_null')}")
        interval = (head.get("ci") or head.get(f"{path[-1]}_ci95")) if isinstance(head, dict) else None
        rows.append({"group": "fidelity", "metric": label, "synthetic": _get(fid.get("synthetic", {}), *path),
                     "reference": _get(fid.get("holdout", {}), *path), "ideal": ideal, "interval": interval,
                     "note": note})
    util = report["utility"]
    us = util.get("summary") or {}
    rows.append({"group": "utility", "metric": "Mean TSTR/TRTR AUROC ratio (tasks beyond age)",
                 "synthetic": us.get("mean_ratio"), "reference": None, "ideal": 1.0,
                 "interval": us.get("mean_ratio_ci"),
                 "note": us.get("reason") or f"tasks: {', '.join(us.get('tasks_used') or []) or 'none'}"})
    for t in (util.get("tasks") or {}).values():
        note = t.get("reason")
        if t.get("measures_age"):
            note = f"measures age: age alone reaches {t.get('age_only_auroc'):.3f}"
        rows.append({"group": "utility", "metric": f"{t.get('description') or t.get('label')} AUROC (TSTR vs TRTR)",
                     "synthetic": t.get("tstr_auroc"), "reference": t.get("trtr_auroc"), "ideal": None,
                     "interval": t.get("tstr_ci"), "note": note})
    pr = report["privacy"]
    # (label, path of the synthetic value, path of its reference, ideal, path of its 95% interval)
    for label, path, ref, ideal, ci in [
        ("MIA likelihood AUC", ("mia_likelihood", "auc"), None, 0.5, ("mia_likelihood", "auc_ci95")),
        ("MIA likelihood TPR@1%FPR", ("mia_likelihood", "tpr_at_1pct_fpr"), None, 0.01, None),
        ("MIA record-distance AUC", ("mia_record_distance", "auc"), None, 0.5, ("mia_record_distance", "auc_ci95")),
        ("MIA code-set distance AUC", ("mia_distance", "auc"), None, 0.5, ("mia_distance", "auc_ci95")),
        ("DCR share closer to training", ("dcr", "share_closer_to_training"), ("dcr", "expected_share"), None,
         ("dcr", "share_ci95")),
        ("Near-copy rate", ("copies", "synthetic_near_copy_rate"), ("copies", "baseline_near_copy_rate"), None,
         ("copies", "synthetic_near_copy_rate_ci95")),
        ("Code-set copy rate", ("copies", "synthetic_codeset_copy_rate"), ("copies", "holdout_codeset_copy_rate"),
         None, ("copies", "synthetic_codeset_copy_rate_ci95")),
        ("Attribute inference advantage (members - non-members)", ("attribute_inference", "advantage"), None, 0.0,
         ("attribute_inference", "advantage_ci95")),
        ("Attribute inference success (members)", ("attribute_inference", "member_success"),
         ("attribute_inference", "nonmember_success"), None, None),
    ]:
        rows.append({"group": "privacy", "metric": label, "synthetic": _get(pr, *path),
                     "reference": _get(pr, *ref) if ref else None, "ideal": ideal,
                     "interval": _get(pr, *ci) if ci else None, "note": _get(pr, path[0], "reason")})
    rows.append({"group": "privacy", "metric": "Exact trajectory copies", "ideal": 0.0,
                 "synthetic": _get(pr, "copies", "synthetic_trajectory_copy_rate"),
                 "reference": _get(pr, "copies", "holdout_trajectory_copy_rate")})
    eps = claimed_epsilon(pr.get("formal", {}))
    rows.append({"group": "privacy", "metric": "Formal ε (δ)", "synthetic": eps,
                 "reference": _get(pr, "formal", "delta"), "ideal": None,
                 "note": None if _get(pr, "formal", "available") else _get(pr, "formal", "reason")})
    pl = report["plausibility"]
    for key, label in [("events_before_birth", "Events before birth"), ("events_after_death", "Events after death"),
                       ("abatement_before_onset", "Abatement before onset"),
                       ("physiologic_range", "Physiologic range violations"),
                       ("sex_specific_code", "Sex-specific code violations")]:
        rows.append({"group": "plausibility", "metric": f"{label} (event rate)",
                     "synthetic": _get(pl, "synthetic", key, "event_rate"),
                     "reference": _get(pl, "real", key, "event_rate"), "ideal": 0.0})
    for key, label in [("diastolic_not_below_systolic", "Diastolic ≥ systolic BP"),
                       ("bmi_inconsistent_with_weight_height", "BMI ≠ weight / height²"),
                       ("child_height_decrease", "Child height decreases")]:
        rows.append({"group": "plausibility", "metric": f"{label} (held-out rule, rate)", "ideal": 0.0,
                     "synthetic": _get(pl, "synthetic", "held_out_rules", key, "rate"),
                     "reference": _get(pl, "real", "held_out_rules", key, "rate")})
    rows.append({"group": "plausibility", "metric": "FHIR validity rate", "ideal": 1.0,
                 "synthetic": _get(pl, "fhir_validity_synthetic", "valid_rate"),
                 "reference": _get(pl, "fhir_validity_real", "valid_rate"),
                 "note": _get(pl, "fhir_validity_synthetic", "reason")})
    return rows


def evaluate(real_dir: str | Path, synthetic: str | Path, *, holdout: str | Path | None = None,
             model: str | Path | None = None, out_dir: str | Path, seed: int = 0,
             audit_canaries: int = 0, audit_kwargs: dict | None = None, html: bool = True,
             validity_sample: int = 200) -> dict:
    """Compare synthetic timelines (or an export dir, ingested first) with the real timelines they were trained
    on; write out_dir/report.json and report.html; return the report dict.

    Native thread pools are limited to FHIRSYNTH_EVAL_THREADS (default 1): the classifiers fit small tables,
    and OpenMP spin-waiting on busy shared cores made them 3-7x slower than one thread (measured)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=int(os.environ.get("FHIRSYNTH_EVAL_THREADS", "1"))):
        return _evaluate(real_dir, synthetic, holdout=holdout, model=model, out_dir=out_dir, seed=seed,
                         audit_canaries=audit_canaries, audit_kwargs=audit_kwargs, html=html,
                         validity_sample=validity_sample)


def _evaluate(real_dir: str | Path, synthetic: str | Path, *, holdout: str | Path | None,
              model: str | Path | None, out_dir: str | Path, seed: int, audit_canaries: int,
              audit_kwargs: dict | None, html: bool, validity_sample: int = 200) -> dict:
    t_start = time.perf_counter()
    real_path = _check_timelines(Path(real_dir), "--real")
    holdout_path = _check_timelines(Path(holdout) if holdout else None, "--holdout")
    model_path = Path(model) if model else None
    if model_path is not None:
        if not model_path.is_dir():
            raise UsageError("--model must be a model directory", where=str(model_path))
        formal_guarantee(model_path)  # fail fast on a broken model dir, before minutes of metrics
    synth_in = Path(synthetic)
    if not synth_in.is_dir():
        raise UsageError("--synthetic must be a timelines dir or an export dir", where=str(synth_in))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="fhirsynth-eval-"))
    try:
        export_dir = None
        if is_timelines_dir(synth_in):
            synth_path = synth_in
        elif is_export_dir(synth_in):
            export_dir = synth_in
            t = time.perf_counter()
            synth_path = _ingest_export(synth_in, work)
            timings["ingest_synthetic"] = time.perf_counter() - t
        else:
            raise UsageError("--synthetic is neither a timelines dir (events.parquet) nor an export dir "
                             "(manifest.json or *.ndjson)", where=str(synth_in))
        t = time.perf_counter()
        real = load_cohort(real_path, "real")
        synth = load_cohort(synth_path, "synthetic")
        hold = load_cohort(holdout_path, "holdout") if holdout_path else None
        timings["load"] = time.perf_counter() - t
        if real.n == 0 or synth.n == 0:
            raise UsageError(f"nothing to compare: real has {real.n} patients, synthetic has {synth.n}")
        report = _run_all(real, synth, hold, real_path=real_path, holdout_path=holdout_path, model_path=model_path,
                          export_dir=export_dir, synth_input=synth_in, seed=seed, timings=timings,
                          validity_sample=validity_sample)
        if audit_canaries:
            from fhirsynth.evaluate.audit import run_canary_audit

            t = time.perf_counter()
            kw = dict(audit_kwargs or {})
            formal = report["privacy"]["formal"]
            claimed = claimed_epsilon(formal)
            # audit the same setting as the model: its epsilon, no DP if it had none, else the CLI default 8
            default = claimed if claimed is not None else (math.inf if formal.get("dp") is False else 8.0)
            eps = kw.pop("epsilon", default)
            report["privacy"]["canary_audit"] = run_canary_audit(real_path, audit_canaries, epsilon=eps, **kw)
            timings["canary_audit"] = time.perf_counter() - t
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["summary"] = summary_rows(report)
    timings["total"] = time.perf_counter() - t_start
    report["meta"]["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    report = clean_json(report)
    atomic_write_text(out / REPORT_JSON, json.dumps(report, indent=1, allow_nan=False))
    if html:
        from fhirsynth.evaluate.html import render_html

        atomic_write_text(out / REPORT_HTML, render_html(report))
    log.info("wrote %s and %s in %.1fs", out / REPORT_JSON, out / REPORT_HTML, timings["total"])
    return report


def _run_all(real: Cohort, synth: Cohort, hold: Cohort | None, *, real_path: Path, holdout_path: Path | None,
             model_path: Path | None, export_dir: Path | None, synth_input: Path, seed: int, timings: dict,
             validity_sample: int = 200) -> dict:
    meta = {"generated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "fhirsynth_version": __version__,
            "real": {"path": str(real_path), "patients": real.n, "events": len(real.events)},
            "synthetic": {"path": str(synth_input), "export": export_dir is not None, "patients": synth.n,
                          "events": len(synth.events)},
            "holdout": {"path": str(holdout_path), "patients": hold.n, "events": len(hold.events)} if hold else None,
            "model": str(model_path) if model_path else None, "seed": seed,
            "visit_definition": "one patient-day with events",
            "release_note": "this report contains statistics of the real data (prevalences, values, attack "
                            "results): keep it with the real data; only the model's privacy.json is public"}
    t = time.perf_counter()
    spec = feature_spec(real)
    tables = {"real": flatten(real, spec), "synthetic": flatten(synth, spec)}
    if hold is not None:
        tables["holdout"] = flatten(hold, spec)
    timings["tables"] = time.perf_counter() - t
    t = time.perf_counter()
    fidelity, plots = {}, {}
    others = {"synthetic": synth, **({"holdout": hold} if hold is not None else {})}
    for name, other in others.items():
        fidelity[name], plots[name] = fidelity_report(real, other, real_table=tables["real"],
                                                      other_table=tables[name], seed=seed)
    timings["fidelity"] = time.perf_counter() - t
    t = time.perf_counter()
    utility = utility_report(real, synth, spec, holdout=hold, seed=seed)
    timings["utility"] = time.perf_counter() - t
    t = time.perf_counter()
    privacy = privacy_report(real, synth, hold, train_dir=real_path, holdout_dir=holdout_path, model_dir=model_path,
                             seed=seed)
    timings["privacy"] = time.perf_counter() - t
    t = time.perf_counter()
    plaus = plausibility_report({"real": real, **others}, export_dir, synthetic_dir=synth_input, real_dir=real_path,
                                validity_sample=validity_sample, seed=seed)
    timings["plausibility"] = time.perf_counter() - t
    meta["feature_columns"] = list(tables["real"].columns)
    return {"meta": meta, "fidelity": fidelity, "utility": utility, "privacy": privacy, "plausibility": plaus,
            "plots": plots}
