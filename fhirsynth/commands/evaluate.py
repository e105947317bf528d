"""`fhirsynth evaluate`: fidelity, utility, privacy and plausibility of synthetic data against real data."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from fhirsynth.errors import UsageError

log = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate", help="compare synthetic with real timelines; write report.json and report.html",
        description="Every metric is computed for synthetic-vs-real and, with --holdout, holdout-vs-real as the "
                    "reference a perfect generator would reach.")
    p.add_argument("--real", required=True, type=Path, metavar="TIMELINES_DIR",
                   help="the real timelines the model was trained on")
    p.add_argument("--synthetic", required=True, type=Path, metavar="EXPORT_DIR|TIMELINES_DIR",
                   help="synthetic timelines, or an NDJSON export dir (ingested with the us-core mapping)")
    p.add_argument("--holdout", type=Path, metavar="TIMELINES_DIR",
                   help="real patients NOT used in training (reference row, membership-inference non-members)")
    p.add_argument("--model", type=Path, metavar="MODEL_DIR", help="model dir: formal guarantee, likelihood attack")
    p.add_argument("--out", required=True, type=Path, metavar="REPORT_DIR")
    p.add_argument("--seed", type=int, default=0, help="seed for subsampling and classifiers (default 0)")
    p.add_argument("--audit-canaries", type=int, default=0, metavar="M",
                   help="also retrain with M canary patients (each in with probability 1/2) and report the one-run "
                        "epsilon lower bound (Steinke et al. 2023); slow: one extra training run")
    p.add_argument("--audit-epsilon", type=float, default=None,
                   help="epsilon for the audit training run (default: the model's claimed epsilon, else 8)")
    p.add_argument("--audit-epochs", type=int, default=None, help="epochs for the audit training run")
    p.add_argument("--audit-guesses", type=int, default=None, metavar="K",
                   help="guesses the auditor makes, half 'in' (top scores), half 'out' (default M/5); fix it "
                        "before seeing scores: trying several and keeping the best inflates the bound")
    p.add_argument("--validity-sample", type=int, default=200, metavar="N",
                   help="patients of a timelines dir assembled into FHIR and validated (per_type cap 1000; "
                        "0 skips; an export dir's own resources are validated instead; default 200)")
    p.add_argument("--compare", action="append", default=[], metavar="[LABEL=]DIR",
                   help="another generator's synthetic timelines or export dir (a peer, a second model), evaluated "
                        "the same way and shown as its own column named LABEL (default: the dir's name); repeatable")
    p.add_argument("--preface-file", type=Path, metavar="TEXT_FILE",
                   help="plain text shown under the report's title; paragraphs separated by blank lines")
    p.add_argument("--no-html", action="store_true", help="write report.json only")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from fhirsynth.evaluate.report import REPORT_HTML, REPORT_JSON, evaluate

    if args.audit_canaries < 0:
        raise UsageError(f"--audit-canaries must be >= 0, got {args.audit_canaries}")
    if args.validity_sample < 0:
        raise UsageError(f"--validity-sample must be >= 0, got {args.validity_sample}")
    audit_kwargs: dict = {}
    if args.audit_epsilon is not None:
        audit_kwargs["epsilon"] = args.audit_epsilon
    if args.audit_guesses is not None:
        if not 0 < args.audit_guesses <= args.audit_canaries:
            raise UsageError(f"--audit-guesses must be in 1..--audit-canaries ({args.audit_canaries}), "
                             f"got {args.audit_guesses}")
        audit_kwargs["k_guesses"] = args.audit_guesses
    if args.audit_epochs is not None:
        audit_kwargs["train_kwargs"] = {"epochs": args.audit_epochs}
    compare = [parse_compare(c) for c in args.compare]
    preface = read_preface(args.preface_file) if args.preface_file else []
    report = evaluate(args.real, args.synthetic, holdout=args.holdout, model=args.model, out_dir=args.out,
                      seed=args.seed, audit_canaries=args.audit_canaries, audit_kwargs=audit_kwargs,
                      html=not args.no_html, validity_sample=args.validity_sample, compare=compare, preface=preface)
    files = REPORT_JSON if args.no_html else f"{REPORT_JSON} and {REPORT_HTML}"
    log.info("evaluation done in %.1fs: %s in %s", report["meta"]["timings_s"]["total"], files, args.out)
    return 0


def parse_compare(value: str) -> tuple[str, Path]:
    """LABEL=DIR, or DIR labelled by its name. A DIR that exists is taken whole even if its name has '='."""
    label, sep, path = value.partition("=")
    if not sep or Path(value).exists():
        path = value
        label = Path(value).name or value
    return label.strip(), Path(path)


def read_preface(path: Path) -> list[str]:
    """Paragraphs of a plain-text file (separated by blank lines; lines within a paragraph joined by spaces)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"--preface-file cannot be read: {reason}", where=str(path)) from exc
    paragraphs = [" ".join(line.strip() for line in block.splitlines() if line.strip())
                  for block in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))]
    return [p for p in paragraphs if p]
