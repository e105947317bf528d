"""The summary table of a report: one row per headline metric, with its kind (how within/near/far is judged, see
verdict.py), the holdout's value as the only reference, other figures (delta, real-data rates, expected shares)
in `extras`, and the fallback a verdict uses when there is no holdout."""

from __future__ import annotations

from fhirsynth.evaluate.verdict import add_verdicts

# (label, path into a fidelity dict, ideal, kind)
HEADLINE_FIDELITY = [
    ("Condition prevalence R²", ("prevalence", "condition", "r2"), 1.0, "agreement"),
    ("Observation-code prevalence R²", ("prevalence", "observation", "r2"), 1.0, "agreement"),
    ("Within-visit co-occurrence R²", ("cooccurrence", "r2"), 1.0, "agreement"),
    ("Consecutive-visit transition R²", ("transitions", "r2"), 1.0, "agreement"),
    ("Condition code KL (real‖other)", ("marginal", "condition", "kl"), 0.0, "distance"),
    ("Age at first event KS", ("distributions", "age_at_first_event_years", "ks"), 0.0, "distance"),
    ("Events per patient KS", ("distributions", "events_per_patient", "ks"), 0.0, "distance"),
    ("Visits per patient KS", ("distributions", "visits_per_patient", "ks"), 0.0, "distance"),
    ("Days between visits KS", ("distributions", "days_between_visits", "ks"), 0.0, "distance"),
    ("Sex total variation", ("distributions", "sex", "tvd"), 0.0, "distance"),
    ("Numeric values mean KS (top LOINC)", ("numeric_values_mean_ks",), 0.0, "distance"),
    ("Ordering |Δ share a-before-b|", ("ordering", "mean_abs_diff"), 0.0, "distance"),
    ("1-way marginal TVD (flat table)", ("marginal_1way", "tvd"), 0.0, "distance"),
    ("2-way marginal TVD (flat table)", ("marginal_2way", "tvd"), 0.0, "distance"),
    ("Detection AUC", ("detection", "auc"), 0.5, "auc"),
]

# holdout_use: "value" = the metric itself needs non-members; "reference" = the holdout supplies the reference
CHANCE = "chance"


def get(d: object, *keys: str) -> object:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _fallback(name: str, value: object) -> dict | None:
    return {"name": name, "value": value} if isinstance(value, int | float) and not isinstance(value, bool) else None


# issue 18's rows, shown only where the real cohort has these kinds (fidelity.rest_of_patient)
REST_FIDELITY = [
    ("Medication prevalence R²", ("rest_of_patient", "prevalence", "medication", "r2"), 1.0, "agreement"),
    ("Immunization prevalence R²", ("rest_of_patient", "prevalence", "immunization", "r2"), 1.0, "agreement"),
    ("Procedure prevalence R²", ("rest_of_patient", "prevalence", "procedure", "r2"), 1.0, "agreement"),
    ("Allergy prevalence R²", ("rest_of_patient", "prevalence", "allergy", "r2"), 1.0, "agreement"),
    ("Drug-for-disease co-occurrence R²", ("rest_of_patient", "drug_for_disease", "r2"), 1.0, "agreement"),
    ("Vaccine age-band max |Δ share| (points)", ("rest_of_patient", "vaccine_age_bands", "max_diff_points"), 0.0,
     "distance"),
]


def _fidelity_rows(fid: dict) -> list[dict]:
    rows = []
    rest = [r for r in REST_FIDELITY if get(fid.get("synthetic", {}), *r[1][:-1]) is not None]
    for label, path, ideal, kind in HEADLINE_FIDELITY + rest:
        head = get(fid.get("synthetic", {}), *path[:-1])
        head = head if isinstance(head, dict) else {}
        null = head.get("null")
        note, fallback = None, None
        if isinstance(null, dict) and all(isinstance(null.get(k), int | float) for k in ("median", "lo", "hi")):
            # real vs real at these sample sizes: how far another sample of real patients is
            note = (f"real-vs-real null {null['median']:.3f} [{null['lo']:.3f}, {null['hi']:.3f}]: "
                    f"{head.get('vs_null')}")
            fallback = {"name": "real-vs-real null", "value": null["median"], "range": [null["lo"], null["hi"]]}
        rows.append({"group": "fidelity", "metric": label, "kind": kind,
                     "synthetic": get(fid.get("synthetic", {}), *path), "interval": head.get("ci") or
                     head.get(f"{path[-1]}_ci95"), "reference": get(fid.get("holdout", {}), *path), "ideal": ideal,
                     "extras": {}, "fallback": fallback, "holdout_use": "reference", "note": note})
    return rows


def _records_rows(rec: dict | None) -> list[dict]:
    """records.py's table: the synthetic value, the training patients against the holdout as the reference."""
    from fhirsynth.evaluate.records import RECORD_ROWS

    if not rec:
        return []
    rows = []
    for label, key, ideal, kind in RECORD_ROWS:
        ceiling = get(rec, "ceiling", key)
        rows.append({"group": "fidelity", "metric": label, "kind": kind, "synthetic": get(rec, "synthetic", key),
                     "interval": None, "reference": ceiling, "ideal": ideal, "extras": {},
                     "fallback": None, "holdout_use": "reference",
                     "note": "against the holdout; reference: the training patients against it"
                     if ceiling is not None else "against the training patients (no holdout)"})
    return rows


def _utility_rows(util: dict) -> list[dict]:
    us = util.get("summary") or {}
    rows = [{"group": "utility", "metric": "Mean TSTR/TRTR AUROC ratio (tasks beyond age)", "kind": "auroc",
             "synthetic": us.get("mean_ratio"), "interval": us.get("mean_ratio_ci"), "reference": None, "ideal": 1.0,
             "extras": {}, "fallback": _fallback("TRTR (ratio 1)", 1.0), "holdout_use": None,
             "note": us.get("reason") or f"tasks: {', '.join(us.get('tasks_used') or []) or 'none'}"}]
    for t in (util.get("tasks") or {}).values():
        note = t.get("reason")
        if t.get("measures_age"):
            note = f"measures age: age alone reaches {t.get('age_only_auroc'):.3f}"
        # TRTR (trained on real training data) is what a perfect generator reaches; it is not a holdout value
        rows.append({"group": "utility", "metric": f"{t.get('description') or t.get('label')} AUROC (TSTR vs TRTR)",
                     "kind": "auroc", "synthetic": t.get("tstr_auroc"), "interval": t.get("tstr_ci"),
                     "reference": None, "ideal": None, "extras": {"TRTR AUROC": t.get("trtr_auroc")},
                     "fallback": _fallback("TRTR", t.get("trtr_auroc")), "holdout_use": None, "note": note})
    return rows


def _privacy_rows(pr: dict) -> list[dict]:
    copies = pr.get("copies") or {}
    near_base = copies.get("near_copy_baseline")
    near_base_value = copies.get("baseline_near_copy_rate")
    dcr_expected = get(pr, "dcr", "expected_share")
    rows = []
    # (label, path, kind, ideal, reference path (a holdout value), extras, fallback, holdout_use, interval path)
    for label, path, kind, ideal, ref, extras, fallback, use, ci in [
        ("MIA likelihood AUC", ("mia_likelihood", "auc"), "auc", 0.5, None, {}, _fallback(CHANCE, 0.5), "value",
         ("mia_likelihood", "auc_ci95")),
        ("MIA likelihood TPR@1%FPR", ("mia_likelihood", "tpr_at_1pct_fpr"), "rate", 0.01, None, {},
         _fallback(CHANCE, 0.01), "value", None),
        ("MIA record-distance AUC", ("mia_record_distance", "auc"), "auc", 0.5, None, {}, _fallback(CHANCE, 0.5),
         "value", ("mia_record_distance", "auc_ci95")),
        ("MIA code-set distance AUC", ("mia_distance", "auc"), "auc", 0.5, None, {}, _fallback(CHANCE, 0.5), "value",
         ("mia_distance", "auc_ci95")),
        ("DCR share closer to training", ("dcr", "share_closer_to_training"), "share", None, None,
         {"expected share (no memorisation)": dcr_expected}, _fallback("expected share", dcr_expected), "value",
         ("dcr", "share_ci95")),
        ("Near-copy rate", ("copies", "synthetic_near_copy_rate"), "rate", None,
         ("copies", "baseline_near_copy_rate") if near_base == "holdout" else None,
         {} if near_base == "holdout" else {f"baseline ({near_base})": near_base_value},
         _fallback(f"baseline ({near_base})", near_base_value), "reference",
         ("copies", "synthetic_near_copy_rate_ci95")),
        ("Code-set copy rate", ("copies", "synthetic_codeset_copy_rate"), "rate", None,
         ("copies", "holdout_codeset_copy_rate"), {}, None, "reference",
         ("copies", "synthetic_codeset_copy_rate_ci95")),
        ("Exact trajectory copies", ("copies", "synthetic_trajectory_copy_rate"), "rate", 0.0,
         ("copies", "holdout_trajectory_copy_rate"), {}, _fallback("ideal", 0.0), "reference", None),
        ("Attribute inference advantage (members - non-members)", ("attribute_inference", "advantage"), "share", 0.0,
         None, {}, _fallback(CHANCE, 0.0), "value", ("attribute_inference", "advantage_ci95")),
        ("Attribute inference success (members)", ("attribute_inference", "member_success"), "share", None,
         ("attribute_inference", "nonmember_success"), {}, None, "value", None),
    ]:
        rows.append({"group": "privacy", "metric": label, "kind": kind, "synthetic": get(pr, *path),
                     "interval": get(pr, *ci) if ci else None, "reference": get(pr, *ref) if ref else None,
                     "ideal": ideal, "extras": extras, "fallback": fallback, "holdout_use": use,
                     "note": get(pr, path[0], "reason")})
    formal = pr.get("formal", {})
    rows.append({"group": "privacy", "metric": "Formal ε (δ)", "kind": None, "synthetic": claimed_epsilon(formal),
                 "interval": None, "reference": None, "ideal": None, "extras": {"δ": formal.get("delta")},
                 "fallback": None, "holdout_use": None,
                 "note": None if formal.get("available", True) else formal.get("reason")})
    return rows


def _plausibility_rows(pl: dict) -> list[dict]:
    rows = []
    checks = [(key, f"{label} (event rate)", (key, "event_rate")) for key, label in [
        ("events_before_birth", "Events before birth"), ("events_after_death", "Events after death"),
        ("abatement_before_onset", "Abatement before onset"), ("physiologic_range", "Physiologic range violations"),
        ("sex_specific_code", "Sex-specific code violations")]]
    checks += [(key, f"{label} (held-out rule, rate)", ("held_out_rules", key, "rate")) for key, label in [
        ("diastolic_not_below_systolic", "Diastolic ≥ systolic BP"),
        ("bmi_inconsistent_with_weight_height", "BMI ≠ weight / height²"),
        ("child_height_decrease", "Child height decreases")]]
    for _key, label, path in checks:
        real = get(pl, "real", *path)
        rows.append({"group": "plausibility", "metric": label, "kind": "rate", "synthetic": get(pl, "synthetic", *path),
                     "interval": None, "reference": get(pl, "holdout", *path), "ideal": 0.0,
                     "extras": {"real data": real}, "fallback": _fallback("real data", real),
                     "holdout_use": "reference", "note": None})
    real_valid = get(pl, "fhir_validity_real", "valid_rate")
    rows.append({"group": "validity", "metric": "FHIR validity rate", "kind": "validity",
                 "synthetic": get(pl, "fhir_validity_synthetic", "valid_rate"), "interval": None, "reference": None,
                 "ideal": 1.0, "extras": {"real data": real_valid}, "fallback": _fallback("real data", real_valid),
                 "holdout_use": None, "note": get(pl, "fhir_validity_synthetic", "reason")})
    return rows


def claimed_epsilon(formal: dict) -> float | None:
    """The total epsilon of a privacy report (MODEL writes epsilon_total; plain `epsilon` also accepted);
    None for a model trained without DP or with replayable noise (--reproducible-noise: no guarantee)."""
    if formal.get("dp") is False or formal.get("reproducible_noise"):
        return None
    eps = formal.get("epsilon_total", formal.get("epsilon"))
    return float(eps) if isinstance(eps, int | float) else None


def summary_rows(report: dict) -> list[dict]:
    """The headline rows of a report (fidelity, utility, privacy, plausibility, validity), each with a verdict."""
    rows = (_fidelity_rows(report.get("fidelity", {})) + _records_rows(report.get("records"))
            + _utility_rows(report.get("utility", {}))
            + _privacy_rows(report.get("privacy", {})) + _plausibility_rows(report.get("plausibility", {})))
    add_verdicts(rows)
    return rows
