"""`fhirsynth generate MODEL_DIR -n N --out EXPORT_DIR`: sample synthetic timelines and export them as FHIR."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from fhirsynth.errors import UsageError

DEFAULT_POOL_FACTOR = 5  # calibrate.DEFAULT_POOL_FACTOR (kept here: the CLI must not import numpy/scipy to parse)

log = logging.getLogger(__name__)

FORMATS = ("ndjson", "transaction", "collection", "document")
PROFILES = ("us-core", "ips")
SEXES = ("female", "male", "other", "unknown")
_AGE = re.compile(r"^\s*(\d{1,3})\s*-\s*(\d{1,3})\s*$")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="sample synthetic patients from a model and write them as FHIR")
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="a model directory made by `fhirsynth train`")
    p.add_argument("-n", type=int, required=True, help="number of synthetic patients")
    p.add_argument("--out", type=Path, required=True, metavar="EXPORT_DIR", help="export directory (created)")
    p.add_argument("--seed", type=int, default=1, help="sampling seed; same seed, same patients and ids (default 1)")
    p.add_argument("--format", dest="fmt", default="ndjson", help=f"{' | '.join(FORMATS)} (default ndjson)")
    p.add_argument("--profile", default="us-core", help=f"{' | '.join(PROFILES)} (default us-core)")
    p.add_argument("--sex", default=None, help=f"only patients of this administrative gender ({', '.join(SEXES)})")
    p.add_argument("--age", default=None, metavar="MIN-MAX", help="only patients aged MIN-MAX years, e.g. 40-60")
    p.add_argument("--condition", default=None, metavar="SYSTEM|CODE",
                   help="only patients with this condition, e.g. 'http://snomed.info/sct|44054006'")
    p.add_argument("--gzip", action="store_true", help="gzip every output file")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--batch-size", type=int, default=256, help="patients sampled per batch (default 256)")
    p.add_argument("--workers", type=int, default=1,
                   help="CPU sampling processes; the output is identical for any value (default 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1.0)")
    p.add_argument("--record-start", action=argparse.BooleanOptionalAction, default=True,
                   help="visit models trained with measurements: keep each record going back to a start age drawn "
                        "from the DP first-visit-age histogram (default on; --no-record-start lets the model alone "
                        "decide where each record begins, see BENCHMARKS.md)")
    p.add_argument("--no-calibrate", action="store_true",
                   help="skip calibration: output the model's samples as drawn, even when the model holds DP "
                        "measurements (measurements.json)")
    p.add_argument("--no-repair", action="store_true",
                   help="calibrate by reweighting only: do not move code histories between patients of the same sex "
                        "and age band to bring each code's share to its measured one")
    p.add_argument("--pool-factor", type=int, default=DEFAULT_POOL_FACTOR, metavar="K",
                   help=f"calibration draws the output from K x the requested patients (default {DEFAULT_POOL_FACTOR})")
    p.add_argument("--validate", action="store_true",
                   help="validate every resource with fhir.resources and the FHIR JSON schema (slow)")
    p.add_argument("--force", action="store_true", help="write into a non-empty export directory")
    p.set_defaults(func=run)
    return p


def parse_age(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = _AGE.match(text)
    if not m:
        raise UsageError(f"expected MIN-MAX in years (e.g. 40-60), got {text!r}", where="--age")
    lo, hi = int(m.group(1)), int(m.group(2))
    if lo > hi:
        raise UsageError(f"minimum {lo} is above maximum {hi}", where="--age")
    if hi > 130:
        raise UsageError(f"maximum {hi} is not a plausible age", where="--age")
    return lo, hi


def parse_condition(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    system, sep, code = text.partition("|")
    if not sep or not system.strip() or not code.strip() or "|" in code:
        raise UsageError(f"expected SYSTEM|CODE (e.g. http://snomed.info/sct|44054006), got {text!r}",
                         where="--condition")
    return system.strip(), code.strip()


def check_args(args: argparse.Namespace) -> dict:
    """Validate every flag before any heavy import; returns the sampler's constraint kwargs."""
    if args.n < 1:
        raise UsageError(f"must be at least 1, got {args.n}", where="-n")
    if args.fmt not in FORMATS:
        raise UsageError(f"unknown format {args.fmt!r} (choose from {', '.join(FORMATS)})", where="--format")
    if args.profile not in PROFILES:
        raise UsageError(f"unknown profile {args.profile!r} (choose from {', '.join(PROFILES)})", where="--profile")
    if args.sex is not None and args.sex not in SEXES:
        raise UsageError(f"unknown sex {args.sex!r} (choose from {', '.join(SEXES)})", where="--sex")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        raise UsageError(f"unknown device {args.device!r} (auto, cpu or cuda)", where="--device")
    if args.batch_size < 1:
        raise UsageError(f"must be at least 1, got {args.batch_size}", where="--batch-size")
    if args.workers < 1:
        raise UsageError(f"must be at least 1, got {args.workers}", where="--workers")
    if not args.temperature > 0:
        raise UsageError(f"must be > 0, got {args.temperature}", where="--temperature")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"must be in (0, 1], got {args.top_p}", where="--top-p")
    if not 2 <= args.pool_factor <= 100:
        raise UsageError(f"must be between 2 and 100, got {args.pool_factor}", where="--pool-factor")
    if not args.model_dir.is_dir():
        raise UsageError("model directory does not exist", where=str(args.model_dir))
    return {"sex": args.sex, "age": parse_age(args.age), "condition": parse_condition(args.condition)}


def run(args: argparse.Namespace) -> int:
    constraints = check_args(args)
    from fhirsynth import __version__
    from fhirsynth.export.writer import write_export
    from fhirsynth.model.checkpoint import guaranteed_privacy, model_hash, read_privacy_report
    from fhirsynth.model.calibrate import generated_timelines
    from fhirsynth.timeline.assembler import GeneratorInfo

    epsilon, delta = guaranteed_privacy(read_privacy_report(args.model_dir))
    generator = GeneratorInfo(model_hash=model_hash(args.model_dir), epsilon=epsilon, delta=delta,
                              fhirsynth_version=__version__)
    sample = dict(seed=args.seed, batch_size=args.batch_size, device=args.device, temperature=args.temperature,
                  top_p=args.top_p, workers=args.workers, record_start=args.record_start, **constraints)
    timelines = generated_timelines(args.model_dir, args.n, sample, pool_factor=args.pool_factor,
                                    calibrate=not args.no_calibrate, repair=not args.no_repair)
    summary = write_export(
        timelines,
        args.out,
        fmt=args.fmt,
        profile=args.profile,
        seed=args.seed,
        generator=generator,
        gzip=args.gzip,
        validate=args.validate,
        overwrite=args.force,
        total=args.n,
    )
    total = sum(summary["resources"].values())
    log.info("generated %d patients, %d resources (%s) in %s", summary["patients"], total,
             ", ".join(f"{k} {v}" for k, v in sorted(summary["resources"].items())), args.out)
    if summary["patients"] < args.n:
        log.warning("only %d of %d requested patients were generated (constraints too narrow?)",
                    summary["patients"], args.n)
    return 0
