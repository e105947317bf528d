"""Evaluation of synthetic timelines against real ones: fidelity, utility, privacy, plausibility.

Entry point: fhirsynth.evaluate.report.evaluate(real_dir, synthetic, *, holdout=None, model=None, out_dir).
Modules: cohort (load parquet into flat tables), tables (per-patient features), fidelity, utility, privacy,
audit (one-run DP audit with canaries), plausibility, html (self-contained report), toy (test cohorts).
"""
