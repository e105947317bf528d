"""`fhirsynth demo`: the main job end to end on the sample cohort shipped in fixtures/sample.

ingest -> DP training of a small model on CPU -> generate synthetic patients -> evaluate -> serve on 127.0.0.1.
Every step is the same code the individual commands run; outputs land in --out so they can be inspected.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fhirsynth.errors import UsageError

log = logging.getLogger(__name__)

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "sample"

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
    p = sub.add_parser("demo", help="run ingest -> DP train -> generate -> evaluate -> serve on the bundled sample")
    p.add_argument("--sample", type=Path, default=SAMPLE_DIR, help="input cohort (default: fixtures/sample)")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="working directory for every stage's output")
    p.add_argument("--epsilon", type=float, default=8.0, help="privacy budget for training (default 8)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the trainer's demo setting)")
    p.add_argument("-n", type=int, default=100, help="synthetic patients to generate (default 100)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--no-serve", action="store_true", help="stop after generating and evaluating")
    p.add_argument("--no-evaluate", action="store_true", help="skip the evaluation report")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from fhirsynth.export.writer import write_export
    from fhirsynth.model.checkpoint import guaranteed_privacy, model_hash, read_privacy_report
    from fhirsynth.model.sampler import sample_timelines
    from fhirsynth.model.train import train_model
    from fhirsynth.timeline.adapter import ingest
    from fhirsynth.timeline.assembler import GeneratorInfo

    from fhirsynth import __version__

    if not args.sample.exists():
        raise UsageError("sample cohort not found", where=str(args.sample))
    if args.n < 1:
        raise UsageError("must be at least 1", where="-n")
    out: Path = args.out
    timelines_dir, model_dir, export_dir = out / "timelines", out / "model", out / "export"

    log.info("1/5 ingest %s -> %s", args.sample, timelines_dir)
    report = ingest([args.sample], timelines_dir, mapping="us-core")
    log.info("    %s", _ingest_summary(report))

    log.info("2/5 DP training (epsilon=%s) -> %s", args.epsilon, model_dir)
    train_kwargs = {"epsilon": args.epsilon, "dp": True, "device": "cpu", "seed": args.seed}
    if args.epochs is not None:
        train_kwargs["epochs"] = args.epochs
    privacy = train_model(timelines_dir, model_dir, **train_kwargs)
    log.info("    privacy: epsilon_total=%s (delta=%s, unit=%s)", privacy.get("epsilon_total"), privacy.get("delta"),
             privacy.get("unit"))

    log.info("3/5 generate %d synthetic patients -> %s", args.n, export_dir)
    epsilon, delta = guaranteed_privacy(read_privacy_report(model_dir))
    generator = GeneratorInfo(model_hash=model_hash(model_dir), epsilon=epsilon, delta=delta,
                              fhirsynth_version=__version__)
    summary = write_export(sample_timelines(model_dir, args.n, seed=args.seed, device="cpu"), export_dir,
                           fmt="ndjson", profile="us-core", seed=args.seed, generator=generator)
    log.info("    %s", summary)

    if not args.no_evaluate:
        from fhirsynth.evaluate.report import evaluate

        log.info("4/5 evaluate -> %s", out / "report")
        evaluate(timelines_dir, export_dir, model=model_dir, out_dir=out / "report")
        log.info("    open %s", (out / "report" / "report.html").resolve())

    if args.no_serve:
        return 0
    from fhirsynth.commands.serve import serve_export

    base = f"http://{args.host}:{args.port}"
    log.info("5/5 serving %s at %s (Ctrl-C to stop). Try:", export_dir, base)
    pid = _first_patient_id(export_dir)
    for q in EXAMPLE_QUERIES:
        log.info("    curl '%s/%s'", base, q.replace("{pid}", pid))
    report_dir = None if args.no_evaluate else out / "report"
    serve_export(export_dir, db=out / "fhirsynth.sqlite", host=args.host, port=args.port, model_dir=model_dir,
                 report_dir=report_dir)
    return 0


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
