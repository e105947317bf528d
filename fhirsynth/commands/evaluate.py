"""`fhirsynth evaluate`: fidelity, utility, privacy and plausibility of synthetic data against real data."""

from __future__ import annotations

import argparse
import logging
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
    p.add_argument("--no-html", action="store_true", help="write report.json only")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from fhirsynth.evaluate.report import REPORT_HTML, REPORT_JSON, evaluate

    if args.audit_canaries < 0:
        raise UsageError(f"--audit-canaries must be >= 0, got {args.audit_canaries}")
    audit_kwargs: dict = {}
    if args.audit_epsilon is not None:
        audit_kwargs["epsilon"] = args.audit_epsilon
    if args.audit_epochs is not None:
        audit_kwargs["train_kwargs"] = {"epochs": args.audit_epochs}
    report = evaluate(args.real, args.synthetic, holdout=args.holdout, model=args.model, out_dir=args.out,
                      seed=args.seed, audit_canaries=args.audit_canaries, audit_kwargs=audit_kwargs,
                      html=not args.no_html)
    files = REPORT_JSON if args.no_html else f"{REPORT_JSON} and {REPORT_HTML}"
    log.info("evaluation done in %.1fs: %s in %s", report["meta"]["timings_s"]["total"], files, args.out)
    return 0
