"""The records table of a report: records_metrics.compare, the definitions of the issues' goals (whole records,
DP utility), computed inside `evaluate` so that its numbers and the benchmarks' are the same numbers.

Where the rest of the report counts a visit as one patient-day with events (cohort.py), this table counts an
encounter as the visit (events without one: their day), the patient-level co-occurrence over the 40 most common
codes held by 5-95% of patients, record shape as KS distances of per-patient counts, numeric trajectories, and
value kinds (records_metrics.py has the full definitions). With a holdout, the holdout is the reference cohort
(what the synthetic patients are compared with) and the training patients against it are the ceiling; without
one, the training patients are the reference and there is no ceiling.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from fhirsynth.records_metrics import Records, compare
from fhirsynth.timeline.io import read_timelines

# (label, key, ideal, summary kind); value-kind mismatches enter as a share of the synthetic observations
RECORD_ROWS = [
    ("Patient prevalence R² (records)", "prevalence_r2", 1.0, "agreement"),
    ("Patient co-occurrence R², top 40 codes (records)", "patient_cooc_r2", 1.0, "agreement"),
    ("Within-encounter co-occurrence R² (records)", "within_visit_cooc_r2", 1.0, "agreement"),
    ("Encounter-to-encounter transition R² (records)", "transition_r2", 1.0, "agreement"),
    ("Events per patient KS (records)", "events_ks", 0.0, "distance"),
    ("Days with events per patient KS (records)", "days_ks", 0.0, "distance"),
    ("Encounters per patient KS (records)", "visits_ks", 0.0, "distance"),
    ("Max gap of lag-1 value correlation, top 10 numeric codes (records)", "traj_corr_maxdiff", 0.0, "distance"),
    ("Max relative gap of age-band value means (records)", "traj_band_mean_max_rel_diff", 0.0, "distance"),
    ("Observations with a value kind real never has (share, records)", "value_kind_mismatch_share", None, "rate"),
    ("Age at the first encounter KS (records)", "first_visit_age_ks", 0.0, "distance"),
]


class RecordsReference:
    """The reference cohort flattened, and the ceiling compared, once per report: every synthetic cohort (the main
    one and each --compare peer) is measured against the same ones."""

    def __init__(self, real_dir: Path, holdout_dir: Path | None) -> None:
        self.real_dir, self.holdout_dir = real_dir, holdout_dir

    @cached_property
    def cohort(self) -> Records:
        return Records(list(read_timelines(self.holdout_dir if self.holdout_dir is not None else self.real_dir)))

    @cached_property
    def ceiling(self) -> dict | None:
        """compare(holdout, real), or None without a holdout."""
        if self.holdout_dir is None:
            return None
        return compare(self.cohort, Records(list(read_timelines(self.real_dir))))

    def table(self, synthetic_dir: Path) -> dict:
        """{"reference", "synthetic": compare(reference, synthetic), "ceiling"}."""
        return {"reference": "holdout" if self.holdout_dir is not None else "real (no holdout)",
                "visit_definition": "an encounter (events without one: their calendar day)",
                "synthetic": compare(self.cohort, Records(list(read_timelines(synthetic_dir)))),
                "ceiling": self.ceiling}
