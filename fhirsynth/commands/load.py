"""`fhirsynth load EXPORT_DIR --url BASE`: POST transaction Bundles (or NDJSON, type by type) into another FHIR
server."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from fhirsynth.errors import LoadError

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("load", help="POST an export's transaction Bundles (or NDJSON) to a FHIR server")
    p.add_argument("export_dir", type=Path, metavar="EXPORT",
                   help="a `generate` export (any --format), a Bulk Data NDJSON directory, or a directory or file of "
                        "FHIR Bundles (transaction, batch, collection, searchset, document)")
    p.add_argument("--url", required=True, metavar="FHIR_BASE_URL", help="the server's FHIR base URL")
    p.add_argument("--concurrency", type=int, default=4, help="Bundles in flight at once (default 4)")
    p.add_argument("--retries", type=int, default=5, help="retries per Bundle on 429/5xx/network errors (default 5)")
    p.add_argument("--token", default=None,
                   help="bearer token (default: $FHIRSYNTH_TOKEN); sent as Authorization: Bearer ...")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--max-entries", type=int, default=None,
                   help="entries per transaction (default 50, the strictest common server limit; 8 with --ids "
                        "conditional, as servers cap serializable transactions lower): a larger patient "
                        "Bundle is split into consecutive transactions, Patient first and Provenance last, each "
                        "reference pointing at something already stored or in the same transaction")
    p.add_argument("--ids", choices=("client", "server", "conditional"), default="client",
                   help="client (default): PUT Type/id with the export's ids, idempotent, needs the right to choose "
                        "ids; server: POST and let the server assign ids, references rewritten to them (a reload "
                        "duplicates); conditional: POST with If-None-Exist on each resource's identifier, so a "
                        "reload stores nothing twice without the right to choose ids")
    p.add_argument("--batch", action="store_true",
                   help="for servers without transaction support: post batch Bundles (entries processed one by one, "
                        "references as Type/id, every entry's status still checked)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from fhirsynth.export.loader import load_export

    token = args.token or os.environ.get("FHIRSYNTH_TOKEN") or None
    report = load_export(args.export_dir, args.url, concurrency=args.concurrency, retries=args.retries,
                         token=token, timeout=args.timeout, max_entries=args.max_entries,
                         batch=args.batch, ids=args.ids)
    log.info("loaded %d bundle(s), failed %d, %d retries, %.1fs (ids: %s)", report.loaded, report.failed,
             report.retries, report.seconds, args.ids)
    if report.unconditional:
        log.warning("%d resource(s) had no identifier to match on and were created unconditionally: a reload would "
                    "store them twice", report.unconditional)
    for rtype, outcomes in report.by_type().items():
        log.info("  %s: %s", rtype, ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    if report.failed:
        first = report.failures[0]
        skipped = f", {report.not_attempted} not sent after it" if report.not_attempted else ""
        raise LoadError(
            f"{report.failed} of {report.failed + report.loaded} bundle(s) failed{skipped}; first: {first['message']}",
            where=str(args.export_dir if args.export_dir.is_file() else args.export_dir / first["file"]),
        )
    return 0
