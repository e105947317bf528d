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
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from fhirsynth import __version__
from fhirsynth.errors import UsageError
from fhirsynth.evaluate.cohort import Cohort, load_cohort
from fhirsynth.evaluate.fidelity import fidelity_report
from fhirsynth.evaluate.plausibility import plausibility_report
from fhirsynth.evaluate.privacy import formal_guarantee, privacy_report
from fhirsynth.evaluate.records import RecordsReference
from fhirsynth.evaluate.summary import claimed_epsilon, summary_rows  # noqa: F401 - re-exported
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


def evaluate(real_dir: str | Path, synthetic: str | Path, *, holdout: str | Path | None = None,
             model: str | Path | None = None, out_dir: str | Path, seed: int = 0,
             audit_canaries: int = 0, audit_kwargs: dict | None = None, html: bool = True,
             validity_sample: int = 200, compare: Sequence[tuple[str, str | Path]] = (),
             preface: Sequence[str] = ()) -> dict:
    """Compare synthetic timelines (or an export dir, ingested first) with the real timelines they were trained
    on; write out_dir/report.json and report.html; return the report dict.

    compare: (label, timelines or export dir) of other generators (a peer, a second model) evaluated the same
    way; each becomes a column of the summary. preface: plain-text paragraphs shown under the report's title.

    Native thread pools are limited to FHIRSYNTH_EVAL_THREADS (default 1): the classifiers fit small tables,
    and OpenMP spin-waiting on busy shared cores made them 3-7x slower than one thread (measured)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=int(os.environ.get("FHIRSYNTH_EVAL_THREADS", "1"))):
        return _evaluate(real_dir, synthetic, holdout=holdout, model=model, out_dir=out_dir, seed=seed,
                         audit_canaries=audit_canaries, audit_kwargs=audit_kwargs, html=html,
                         validity_sample=validity_sample, compare=compare, preface=preface)


RESERVED_LABELS = frozenset({"real", "synthetic", "holdout", "reference"})


def check_compare(compare: Sequence[tuple[str, str | Path]]) -> list[tuple[str, Path]]:
    """Validated (label, dir) pairs: each an existing timelines or export dir, labels unique and not reserved."""
    out: list[tuple[str, Path]] = []
    for label, path in compare:
        path = Path(path)
        if not label.strip():
            raise UsageError("--compare needs a non-empty label (LABEL=DIR)", where=str(path))
        if label in RESERVED_LABELS or label in {seen for seen, _ in out}:
            raise UsageError(f"--compare label {label!r} is already used; give another with LABEL=DIR",
                             where=str(path))
        if not (path.is_dir() and (is_timelines_dir(path) or is_export_dir(path))):
            raise UsageError("--compare must be a timelines dir (events.parquet) or an export dir "
                             "(manifest.json or *.ndjson)", where=str(path))
        out.append((label, path))
    return out


def export_epsilon(export_dir: Path | None) -> float | None:
    """The epsilon an export's manifest says its generator had (None when unknown or not an export)."""
    if export_dir is None or not (export_dir / "manifest.json").is_file():
        return None
    try:
        manifest = json.loads((export_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    eps = ((manifest.get("extension") or {}).get("fhirsynth") or {}).get("epsilon")
    return float(eps) if isinstance(eps, int | float) and not isinstance(eps, bool) else None


def _synthetic_timelines(path: Path, work: Path, flag: str) -> tuple[Path, Path | None]:
    """(timelines dir, export dir or None) for a --synthetic / --compare input."""
    if not path.is_dir():
        raise UsageError(f"{flag} must be a timelines dir or an export dir", where=str(path))
    if is_timelines_dir(path):
        return path, None
    if is_export_dir(path):
        return _ingest_export(path, work / f"ingest-{len(list(work.iterdir()))}"), path
    raise UsageError(f"{flag} is neither a timelines dir (events.parquet) nor an export dir "
                     "(manifest.json or *.ndjson)", where=str(path))


def _evaluate(real_dir: str | Path, synthetic: str | Path, *, holdout: str | Path | None,
              model: str | Path | None, out_dir: str | Path, seed: int, audit_canaries: int,
              audit_kwargs: dict | None, html: bool, validity_sample: int = 200,
              compare: Sequence[tuple[str, str | Path]] = (), preface: Sequence[str] = ()) -> dict:
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
    peers = check_compare(compare)  # before minutes of metrics, like the model dir
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="fhirsynth-eval-"))
    try:
        t = time.perf_counter()
        synth_path, export_dir = _synthetic_timelines(synth_in, work, "--synthetic")
        if export_dir is not None:
            timings["ingest_synthetic"] = time.perf_counter() - t
        t = time.perf_counter()
        real = load_cohort(real_path, "real")
        synth = load_cohort(synth_path, "synthetic")
        hold = load_cohort(holdout_path, "holdout") if holdout_path else None
        records_ref = RecordsReference(real_path, holdout_path)  # the records table's reference, read once
        timings["load"] = time.perf_counter() - t
        if real.n == 0 or synth.n == 0:
            raise UsageError(f"nothing to compare: real has {real.n} patients, synthetic has {synth.n}")
        report = _run_all(real, synth, hold, real_path=real_path, holdout_path=holdout_path, model_path=model_path,
                          export_dir=export_dir, synth_input=synth_in, synth_timelines=synth_path,
                          records_ref=records_ref, seed=seed, timings=timings,
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
        report["meta"]["synthetic"]["epsilon"] = _epsilon(report["privacy"].get("formal", {}), export_dir)
        report["compare"] = {}
        for label, peer_in in peers:
            t = time.perf_counter()
            peer_path, peer_export = _synthetic_timelines(peer_in, work, "--compare")
            peer = load_cohort(peer_path, label)
            if peer.n == 0:
                raise UsageError("--compare has no patients", where=str(peer_in))
            peer_report = _run_all(real, peer, hold, real_path=real_path, holdout_path=holdout_path,
                                   model_path=None, export_dir=peer_export, synth_input=peer_in,
                                   synth_timelines=peer_path, records_ref=records_ref, seed=seed,
                                   timings={}, validity_sample=validity_sample,
                                   holdout_fidelity=(report["fidelity"]["holdout"], report["plots"]["holdout"])
                                   if hold is not None else None)
            report["compare"][label] = {"meta": {**peer_report["meta"]["synthetic"],
                                                 "epsilon": export_epsilon(peer_export)},
                                        "summary": summary_rows(peer_report)}
            timings[f"compare {label}"] = time.perf_counter() - t
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["summary"] = summary_rows(report)
    report["meta"]["preface"] = [str(p) for p in preface]
    timings["total"] = time.perf_counter() - t_start
    report["meta"]["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    report = clean_json(report)
    atomic_write_text(out / REPORT_JSON, json.dumps(report, indent=1, allow_nan=False))
    if html:
        from fhirsynth.evaluate.html import render_html

        atomic_write_text(out / REPORT_HTML, render_html(report, preface=preface))
    log.info("wrote %s and %s in %.1fs", out / REPORT_JSON, out / REPORT_HTML, timings["total"])
    return report


def add_preface(report: dict, out_dir: str | Path, preface: Sequence[str]) -> None:
    """Put paragraphs at the top of a written report (report.json's meta and report.html), without re-measuring:
    for text that can only be written once the numbers are known (the demo's explanation)."""
    from fhirsynth.evaluate.html import render_html

    out = Path(out_dir)
    report["meta"]["preface"] = [str(p) for p in preface]
    atomic_write_text(out / REPORT_JSON, json.dumps(report, indent=1, allow_nan=False))
    atomic_write_text(out / REPORT_HTML, render_html(report, preface=preface))


def _epsilon(formal: dict, export_dir: Path | None) -> float | str | None:
    """The generator's epsilon: the model's claim, "inf" for a model trained without DP, else the export's."""
    if formal.get("dp") is False:
        return "inf"
    claimed = claimed_epsilon(formal)
    return claimed if claimed is not None else export_epsilon(export_dir)


def _run_all(real: Cohort, synth: Cohort, hold: Cohort | None, *, real_path: Path, holdout_path: Path | None,
             model_path: Path | None, export_dir: Path | None, synth_input: Path, synth_timelines: Path,
             records_ref: RecordsReference, seed: int, timings: dict, validity_sample: int = 200,
             holdout_fidelity: tuple[dict, dict] | None = None) -> dict:
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
        if name == "holdout" and holdout_fidelity is not None:
            fidelity[name], plots[name] = holdout_fidelity  # same real, holdout and seed: same result
            continue
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
    t = time.perf_counter()
    records = records_ref.table(synth_timelines)
    timings["records"] = time.perf_counter() - t
    meta["feature_columns"] = list(tables["real"].columns)
    return {"meta": meta, "fidelity": fidelity, "utility": utility, "privacy": privacy, "plausibility": plaus,
            "records": records, "plots": plots}
