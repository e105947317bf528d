"""`fhirsynth ingest INPUT... --out DIR [--mapping us-core|ips|PATH] [--strict]`: FHIR -> timelines."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "ingest",
        help="read FHIR Bundles / bulk NDJSON into patient timelines (events.parquet, patients.parquet, report)",
        description="Read FHIR R4 input (Bundles, NDJSON, .gz, directories, bulk-export manifest.json) and write "
        "events.parquet, patients.parquet and ingest-report.json into --out.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, directories or manifest.json")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="timelines directory to write")
    p.add_argument("--mapping", default="us-core", metavar="NAME|PATH",
                   help="us-core (default), ips, or a mapping TOML file")
    p.add_argument("--strict", action="store_true", help="exit 2 if any resource is skipped")
    p.add_argument("--max-examples", type=int, default=5, metavar="N", help="examples per skip reason in the report")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from fhirsynth.errors import UsageError
    from fhirsynth.timeline.adapter import ingest

    if args.max_examples < 0:
        raise UsageError("--max-examples must be >= 0", where="--max-examples")
    report = ingest(args.inputs, args.out, mapping=args.mapping, strict=args.strict, max_examples=args.max_examples)
    t = report["totals"]
    reasons = ", ".join(f"{k} {v['count']}" for k, v in report["skipped"].items()) or "none"
    log.info(
        "ingested %d resources from %d file(s): %d used, %d skipped (%s); %d patients, %d events -> %s",
        t["read"], report["files"], t["used"], t["skipped"], reasons, report["patients"]["kept"],
        report["events"]["total"], args.out,
    )
    return 0
