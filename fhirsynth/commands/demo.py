"""`fhirsynth demo`: the main job end to end on the bundled sample cohort (fixtures/sample, shipped in the package).

ingest -> hold out a share of the patients -> DP training of a small model on CPU, and a no-DP reference model ->
generate synthetic patients from both -> evaluate both against the held-out patients -> explain the numbers ->
serve on 127.0.0.1. Every step is the same code the individual commands run; outputs land in --out.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from fhirsynth.errors import UsageError

if TYPE_CHECKING:
    from fhirsynth.timeline.types import Timeline

log = logging.getLogger(__name__)

REFERENCE_LABEL = "no DP (reference)"  # the reference model's column in the report

# package data (a link to fixtures/sample in a source checkout), so the demo runs after a plain `pip install`
SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "sample"
PREFACE_FILE = "report-preface.txt"
STEPS = 8
# The reference model's batch: on the 64 demo patients, 5 epochs at batch 16 (20 steps) reached prevalence R² 0.60
# against the holdout and sampled its 100 patients in 23 s; at the default batch 64 (5 steps) 0.16 and 53 s, for
# about the same training time (measured on this 2-core machine, shared).
REFERENCE_BATCH = 16

EXAMPLE_QUERIES = (
    "metadata",
    "Patient?_count=5",
    "Patient?gender=female&birthdate=ge1970",
    "Condition?code=http://snomed.info/sct|44054006&_include=Condition:patient",
    "Observation?code=http://loinc.org|8480-6&value-quantity=gt140&_sort=-date",
    "Patient/{pid}/$everything",
    "$privacy-report",
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo", help="run ingest -> DP train -> generate -> evaluate -> serve on the bundled sample",
        description="The whole job on the bundled sample: ingest it, hold out a share of its patients, train a DP "
        "model and a no-DP reference model on the rest, generate from both, evaluate both against the held-out "
        "patients, explain the numbers (OUT/report-preface.txt) and serve the DP model's synthetic patients.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sample", type=Path, default=SAMPLE_DIR, metavar="DIR",
                   help="input cohort (FHIR bulk NDJSON or Bundles); the default is the bundled 80-patient sample")
    p.add_argument("--out", type=Path, default=Path("demo-out"), metavar="DIR",
                   help="working directory for every stage's output")
    p.add_argument("--epsilon", type=float, default=8.0, help="privacy budget of the DP model")
    p.add_argument("--epochs", type=int, default=10, help="training epochs of the DP model")
    p.add_argument("-n", type=int, default=100, help="synthetic patients to generate (each model)")
    p.add_argument("--holdout-frac", type=float, default=0.2, metavar="F",
                   help="share of the sample's patients held out from training, to evaluate against")
    p.add_argument("--reference-epochs", type=int, default=5, metavar="E",
                   help="epochs of the no-DP reference model (0: no reference model)")
    p.add_argument("--seed", type=int, default=1, help="seed of the holdout split, model initialisation and sampling")
    p.add_argument("--host", default="127.0.0.1", help="address the FHIR server listens on")
    p.add_argument("--port", type=int, default=8080, help="port the FHIR server listens on")
    p.add_argument("--no-serve", action="store_true", help="stop after generating and evaluating")
    p.add_argument("--no-evaluate", action="store_true", help="skip the evaluation reports")
    p.set_defaults(func=run)
    return p


def _check(args: argparse.Namespace) -> None:
    if not args.sample.exists():
        raise UsageError("sample cohort not found (pass --sample DIR)", where=str(args.sample))
    if args.n < 1:
        raise UsageError("must be at least 1", where="-n")
    if args.epochs < 1:
        raise UsageError("must be at least 1", where="--epochs")
    if args.reference_epochs < 0:
        raise UsageError("must be 0 (no reference model) or more", where="--reference-epochs")
    if not 0.0 < args.holdout_frac <= 0.5:
        raise UsageError(f"must be in (0, 0.5], got {args.holdout_frac}", where="--holdout-frac")


def run(args: argparse.Namespace) -> int:
    from fhirsynth.demo.split import split_holdout
    from fhirsynth.timeline.adapter import ingest

    _check(args)
    out: Path = args.out
    real_dir, train_dir, holdout_dir = out / "timelines", out / "real" / "train", out / "real" / "holdout"
    model_dir, ref_dir = out / "model", out / "reference-model"

    log.info("1/%d ingest %s -> %s", STEPS, args.sample, real_dir)
    report = ingest([args.sample], real_dir, mapping="us-core")
    log.info("    %s", _ingest_summary(report))

    log.info("2/%d hold out %.0f%% of the patients (seed %d) -> %s, %s", STEPS, 100 * args.holdout_frac, args.seed,
             train_dir, holdout_dir)
    n_train, n_hold = split_holdout(real_dir, train_dir, holdout_dir, args.holdout_frac, args.seed)
    if n_train < 2 or n_hold < 1:
        raise UsageError(f"the sample is too small to hold patients out ({n_train} train, {n_hold} held out)",
                         where=str(args.sample))
    log.info("    %d patients for training, %d held out (training never sees them)", n_train, n_hold)

    log.info("3/%d DP training (epsilon=%s, %d epochs) -> %s", STEPS, args.epsilon, args.epochs, model_dir)
    privacy = _train(train_dir, model_dir, dp=True, epsilon=args.epsilon, epochs=args.epochs, seed=args.seed)
    log.info("    privacy: epsilon_total=%s (delta=%s, unit=%s)", privacy.get("epsilon_total"), privacy.get("delta"),
             privacy.get("unit"))
    if args.reference_epochs:
        log.info("4/%d reference model without DP (epsilon=inf, %d epochs, batch %d; for comparison only) -> %s",
                 STEPS, args.reference_epochs, REFERENCE_BATCH, ref_dir)
        _train(train_dir, ref_dir, dp=False, epsilon=None, epochs=args.reference_epochs, seed=args.seed,
               batch_size=REFERENCE_BATCH)
    else:
        log.info("4/%d reference model: skipped (--reference-epochs 0)", STEPS)

    export_dir, ref_synth_dir = out / "export", out / "reference-synthetic"
    log.info("5/%d generate %d synthetic patients -> %s", STEPS, args.n, export_dir)
    synthetic = _generate_export(model_dir, export_dir, args.n, args.seed)
    reference = None
    if args.reference_epochs:
        log.info("    and %d from the reference model -> %s", args.n, ref_synth_dir)
        reference = _generate_timelines(ref_dir, ref_synth_dir, args.n, args.seed)

    report_dir = None
    if not args.no_evaluate:
        report_dir = out / "report"
        _evaluate_and_explain(args, out, train_dir, holdout_dir, export_dir, model_dir, synthetic, ref_synth_dir,
                              ref_dir, reference, n_train, n_hold)

    if args.no_serve:
        return 0
    from fhirsynth.commands.serve import serve_export

    base = f"http://{args.host}:{args.port}"
    log.info("%d/%d serving %s at %s (Ctrl-C to stop). Try:", STEPS, STEPS, export_dir, base)
    for line in example_commands(base, _first_patient_id(export_dir)):
        log.info("    %s", line)
    serve_export(export_dir, db=out / "fhirsynth.sqlite", host=args.host, port=args.port, model_dir=model_dir,
                 report_dir=report_dir)
    return 0


def _train(timelines: Path, model_dir: Path, *, dp: bool, epsilon: float | None, epochs: int, seed: int,
           batch_size: int | None = None) -> dict:
    """train_model with the trainer's own settings, except what the demo chooses (None: the trainer's default)."""
    from fhirsynth.model.train import train_model

    extra = {"batch_size": batch_size} if batch_size is not None else {}
    return train_model(timelines, model_dir, epsilon=epsilon if dp else 8.0, dp=dp, epochs=epochs, device="cpu",
                       seed=seed, **extra)


def _generate_export(model_dir: Path, export_dir: Path, n: int, seed: int) -> list[Timeline]:
    """Sample n patients, write them as the NDJSON export the server serves; the timelines are kept for metrics."""
    from fhirsynth.export.writer import write_export
    from fhirsynth.model.checkpoint import guaranteed_privacy, model_hash, read_privacy_report
    from fhirsynth.model.sampler import sample_timelines
    from fhirsynth.timeline.assembler import GeneratorInfo

    from fhirsynth import __version__

    epsilon, delta = guaranteed_privacy(read_privacy_report(model_dir))
    generator = GeneratorInfo(model_hash=model_hash(model_dir), epsilon=epsilon, delta=delta,
                              fhirsynth_version=__version__)
    timelines = list(sample_timelines(model_dir, n, seed=seed, device="cpu"))
    summary = write_export(timelines, export_dir, fmt="ndjson", profile="us-core", seed=seed, generator=generator)
    log.info("    %s", summary)
    return timelines


def _generate_timelines(model_dir: Path, out_dir: Path, n: int, seed: int) -> list[Timeline]:
    """The reference model's patients as a timelines dir: only measured, never served, so no FHIR export."""
    from fhirsynth.model.sampler import sample_timelines
    from fhirsynth.timeline.io import TimelineWriter

    timelines = list(sample_timelines(model_dir, n, seed=seed, device="cpu"))
    with TimelineWriter(out_dir) as w:
        for tl in timelines:
            w.add(tl)
    return timelines


def _evaluate_and_explain(args: argparse.Namespace, out: Path, train_dir: Path, holdout_dir: Path,
                          export_dir: Path, model_dir: Path, synthetic: list[Timeline], ref_synth_dir: Path,
                          ref_dir: Path, reference: list[Timeline] | None, n_train: int, n_hold: int) -> None:
    from fhirsynth.demo.benchmark import load_benchmark
    from fhirsynth.demo.explain import DemoRun, preface, write_preface
    from fhirsynth.evaluate.report import add_preface, evaluate
    from fhirsynth.records_metrics import Records, compare
    from fhirsynth.timeline.io import read_timelines

    log.info("6/%d evaluate against the %d held-out patients -> %s", STEPS, n_hold, out / "report")
    # the reference model is a second column of the same report, beside the DP model and the holdout reference
    peers = [(REFERENCE_LABEL, ref_synth_dir)] if reference is not None else []
    dp_report = evaluate(train_dir, export_dir, holdout=holdout_dir, model=model_dir, out_dir=out / "report",
                         seed=args.seed, compare=peers)

    log.info("7/%d what the numbers mean -> %s", STEPS, out / PREFACE_FILE)
    held = Records(list(read_timelines(holdout_dir)))
    run = DemoRun(
        n_train=n_train, n_holdout=n_hold, epsilon=args.epsilon, epochs=args.epochs, n_synthetic=args.n,
        dp=compare(held, Records(synthetic)), real_vs_real=compare(held, Records(list(read_timelines(train_dir)))),
        reference=compare(held, Records(reference)) if reference is not None else None,
        reference_epochs=args.reference_epochs or None,
        report_rows=_prevalence_rows(dp_report))
    paragraphs = preface(run, load_benchmark())
    write_preface(paragraphs, out / PREFACE_FILE)
    add_preface(dp_report, out / "report", paragraphs)  # the explanation leads the report
    for para in paragraphs:
        log.info("    %s", para)
    log.info("    open %s", (out / "report" / "report.html").resolve())


def _prevalence_rows(report: dict) -> dict[str, tuple[float | None, float | None, float | None]]:
    """The report's own prevalence rows (found by name: the report's layout is its own business): DP model,
    reference model (its compare column), and the report's reference column (held-out vs training patients)."""
    def rows(summary: list[dict]) -> dict[str, dict]:
        return {r["metric"]: r for r in summary if "prevalence" in r.get("metric", "").lower()}

    dp = rows(report.get("summary", []))
    ref = rows(((report.get("compare") or {}).get(REFERENCE_LABEL) or {}).get("summary", []))
    return {name: (row.get("synthetic"), ref.get(name, {}).get("synthetic"), row.get("reference"))
            for name, row in dp.items()}


def example_commands(base: str, pid: str) -> list[str]:
    """curl lines for the log: searches, one patient's record, and a bulk $export (kick-off, then poll)."""
    lines = [f"curl '{base}/{q.replace('{pid}', pid)}'" for q in EXAMPLE_QUERIES]
    lines += [
        "bulk export: kick it off (202; the status URL is in the Content-Location header):",
        (f"  curl -si -H 'Accept: application/fhir+json' -H 'Prefer: respond-async' '{base}/$export?_type=Patient,"
         "Condition' | grep -i content-location"),
        ("then poll that URL until it answers 200 (202 + Retry-After while running); its output[].url are the NDJSON "
         "files:"),
        "  curl -s 'CONTENT-LOCATION-URL'",
    ]
    return lines


def _first_patient_id(export_dir: Path) -> str:
    """A real id for the $everything example (the export's first Patient)."""
    import gzip

    import orjson

    for path in sorted(export_dir.glob("Patient*.ndjson*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            line = fh.readline()
        if line.strip():
            return str(orjson.loads(line).get("id", "ID"))
    return "ID"


def _ingest_summary(report: dict) -> str:
    totals = report.get("totals", {})
    return ", ".join(f"{k}={v}" for k, v in totals.items()) or str(report)[:200]


