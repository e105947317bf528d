"""Plausibility: how often a cohort breaks rules any real record should obey (temporal order, physiologic
ranges, sex-specific codes, FHIR validity), reported as rates so synthetic and real can be compared."""

from __future__ import annotations

import gzip
import json
import logging
import tempfile
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd

from fhirsynth.errors import FhirsynthError, UsageError
from fhirsynth.evaluate.cohort import Cohort
from fhirsynth.logs import progress

log = logging.getLogger(__name__)

# LOINC code -> (low, high) outside which a value is physiologically impossible in the usual UCUM unit.
# Deliberately wide: this flags generator nonsense, not abnormal results.
BUILTIN_RANGES: dict[str, tuple[float, float]] = {
    "8867-4": (20, 300),      # heart rate /min
    "9279-1": (2, 80),        # respiratory rate /min
    "8310-5": (25, 45),       # body temperature Cel
    "8480-6": (40, 300),      # systolic BP mm[Hg]
    "8462-4": (15, 200),      # diastolic BP mm[Hg]
    "39156-5": (7, 120),      # BMI kg/m2
    "29463-7": (0.2, 400),    # body weight kg
    "8302-2": (20, 260),      # body height cm
    "2708-6": (40, 100),      # oxygen saturation %
    "59408-5": (40, 100),     # oxygen saturation by pulse oximetry %
    "2339-0": (10, 2000),     # glucose mg/dL
    "4548-4": (2, 25),        # HbA1c %
    "2093-3": (30, 1000),     # total cholesterol mg/dL
    "2085-9": (5, 250),       # HDL mg/dL
    "18262-6": (5, 800),      # LDL mg/dL
    "2571-8": (10, 5000),     # triglycerides mg/dL
    "2160-0": (0.1, 25),      # creatinine mg/dL
    "6299-2": (1, 200),       # urea nitrogen mg/dL
    "2951-2": (90, 200),      # sodium mmol/L
    "2823-3": (1, 10),        # potassium mmol/L
    "718-7": (2, 25),         # hemoglobin g/dL
    "72514-3": (0, 10),       # pain severity 0-10
}
# Unit a range is stated in (from constraints.toml); values recorded in another unit are not range-checked.
RANGE_UNITS: dict[str, str] = {}
# Codes that only make sense for one administrative sex (SNOMED CT conditions, LOINC observations).
FEMALE_ONLY = {"72892002", "19169002", "156073000", "79586000", "398254007", "47200007", "198992004",
               "15938005", "363354003", "254838004", "271903000", "2106-3", "19080-1", "82810-3"}
MALE_ONLY = {"126906006", "254900004", "92691004", "266569009", "2857-1", "10886-0"}


Ranges = dict[str, tuple[float, float]]


def load_constraints(mappings_dir: Path | None = None) -> tuple[Ranges, set[str], set[str], str]:
    """Physiologic ranges and sex-specific codes from mappings/constraints.toml ([[value_range]] min/max,
    [[sex_specific]] codes) merged over the built-in tables. Returns (ranges, female_only, male_only, source).
    reference-ranges.toml holds *normal* ranges, which real patients leave all the time, so it is not used."""
    if mappings_dir is None:
        from fhirsynth.mapping.loader import builtin_dir

        mappings_dir = builtin_dir()
    path = mappings_dir / "constraints.toml"
    ranges, female, male = dict(BUILTIN_RANGES), set(FEMALE_ONLY), set(MALE_ONLY)
    if not path.is_file():
        return ranges, female, male, "built-in"
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        log.warning("cannot read %s (%s); using built-in constraints", path, exc)
        return ranges, female, male, "built-in"
    for entry in data.get("value_range", []):
        code, lo, hi = entry.get("code"), entry.get("min"), entry.get("max")
        if isinstance(code, str) and isinstance(lo, int | float) and isinstance(hi, int | float):
            ranges[code] = (float(lo), float(hi))
            if isinstance(entry.get("unit"), str):
                RANGE_UNITS[code] = entry["unit"]
    for entry in data.get("sex_specific", []):
        target = female if entry.get("sex") == "female" else male if entry.get("sex") == "male" else None
        if target is not None:
            target.update(str(c) for c in entry.get("codes", []))
    return ranges, female, male, f"{path.name} + built-in"


def _code(tokens: pd.Series) -> pd.Series:
    return tokens.astype(str).str.rsplit("|", n=1).str[-1]


def temporal_and_range(cohort: Cohort, ranges: dict[str, tuple[float, float]], female_only: set[str],
                       male_only: set[str]) -> dict:
    ev = cohort.events
    pats = cohort.patients
    n_ev = max(len(ev), 1)
    pidx = ev["pidx"].to_numpy()
    birth = pats["birth_day"].to_numpy()[pidx]
    death = pats["death_day"].to_numpy()[pidx]
    day = ev["day"].to_numpy()
    before_birth = day < np.floor(birth)  # birth is a date: anything on the birth day is fine
    after_death = day > death + 1.0  # one day's slack for records closed on the day after death
    cond = (ev["kind"] == "condition").to_numpy()
    end = ev["end_day"].to_numpy()
    abate_before = cond & (end < day)
    # a medication course (or a procedure's period) that runs on after the death (issue 18)
    course = ev["kind"].isin(["medication", "procedure"]).to_numpy() & np.isfinite(end)
    course_after_death = course & (end > death + 1.0)
    codes = _code(ev["token"])
    lo = codes.map({k: v[0] for k, v in ranges.items()}).to_numpy(float)
    hi = codes.map({k: v[1] for k, v in ranges.items()}).to_numpy(float)
    val = ev["value"].to_numpy(float)
    want_unit = codes.map(RANGE_UNITS)
    unit_ok = (want_unit.isna() | ev["unit"].isna() | (ev["unit"] == want_unit)).to_numpy()
    checked = np.isfinite(lo) & np.isfinite(val) & unit_ok
    out_range = checked & ((val < lo) | (val > hi))
    female = (pats["sex"] == "female").to_numpy()[pidx]
    male = (pats["sex"] == "male").to_numpy()[pidx]
    sex_bad = (codes.isin(female_only).to_numpy() & male) | (codes.isin(male_only).to_numpy() & female)

    def rate(mask: np.ndarray, denom: int) -> dict:
        pats_hit = len(np.unique(pidx[mask]))
        return {"events": int(mask.sum()), "event_rate": float(mask.sum() / max(denom, 1)),
                "patient_rate": float(pats_hit / max(cohort.n, 1))}

    return {
        "events_before_birth": rate(before_birth, n_ev),
        "events_after_death": rate(after_death, n_ev),
        "abatement_before_onset": rate(abate_before, int(cond.sum())),
        "course_end_after_death": rate(course_after_death, int(course.sum())),
        "physiologic_range": {**rate(out_range, int(checked.sum())), "values_checked": int(checked.sum())},
        "sex_specific_code": rate(sex_bad, n_ev),
    }


# Held-out rules: physiology the sampler does NOT enforce (its constraints are mappings/constraints.toml), so a
# synthetic rate of 0 is earned, not built in. Each is checked on values recorded the same day in the usual unit.
SYSTOLIC, DIASTOLIC = "8480-6", "8462-4"
BMI, WEIGHT, HEIGHT = "39156-5", "29463-7", "8302-2"
BMI_TOLERANCE = 0.10  # relative: BMI vs weight / height^2 of the same day (rounding in records stays far below)
CHILD_HEIGHT_DROP_CM = 3.0  # a child's recorded height falling by more than this between two visits
CHILD_YEARS = 16


def _same_day_values(cohort: Cohort, codes: list[str]) -> pd.DataFrame:
    """One row per (patient, day) with the mean value of each code recorded that day (NaN where absent)."""
    ev = cohort.events
    codes_col = _code(ev["token"])
    sel = ev[codes_col.isin(codes).to_numpy() & np.isfinite(ev["value"].to_numpy(float))]
    if sel.empty:
        return pd.DataFrame({"pidx": np.array([], np.int64), "iday": np.array([], float),
                             **{c: np.array([], float) for c in codes}})
    wide = (sel.assign(code=_code(sel["token"])).groupby(["pidx", "iday", "code"])["value"].mean()
            .unstack("code").reindex(columns=codes))
    return wide.reset_index()


def held_out_rules(cohort: Cohort) -> dict:
    """Violation rates of rules the sampler does not enforce: diastolic >= systolic blood pressure on one day,
    BMI inconsistent with that day's weight and height, a child's height falling between visits."""
    def rate(bad: np.ndarray, pidx: np.ndarray) -> dict:
        return {"checked": int(len(bad)), "violations": int(bad.sum()),
                "rate": float(bad.mean()) if len(bad) else None,
                "patient_rate": float(len(np.unique(pidx[bad])) / max(cohort.n, 1))}

    bp = _same_day_values(cohort, [SYSTOLIC, DIASTOLIC]).dropna()
    bp_bad = (bp[DIASTOLIC] >= bp[SYSTOLIC]).to_numpy()
    body = _same_day_values(cohort, [BMI, WEIGHT, HEIGHT]).dropna()
    height_m = body[HEIGHT].to_numpy(float) / 100.0
    implied = body[WEIGHT].to_numpy(float) / np.maximum(height_m, 1e-6) ** 2
    bmi_bad = np.abs(body[BMI].to_numpy(float) - implied) > BMI_TOLERANCE * body[BMI].to_numpy(float)
    heights = _same_day_values(cohort, [HEIGHT]).dropna().sort_values(["pidx", "iday"])
    h_pidx = heights["pidx"].to_numpy(dtype=np.int64)
    birth = cohort.patients["birth_day"].reindex(h_pidx).to_numpy(float)
    age_years = (heights["iday"].to_numpy(float) - birth) / 365.25
    drop = -heights.groupby("pidx")[HEIGHT].diff().to_numpy(float)  # positive when the height fell since last visit
    prev_child = pd.Series(age_years < CHILD_YEARS).groupby(h_pidx).shift(1).fillna(False).to_numpy(bool)
    checked = np.isfinite(drop) & prev_child
    return {
        "enforced_by_sampler": False,
        "diastolic_not_below_systolic": rate(bp_bad, bp["pidx"].to_numpy(dtype=np.int64)),
        "bmi_inconsistent_with_weight_height": {**rate(bmi_bad, body["pidx"].to_numpy(dtype=np.int64)),
                                                "tolerance": BMI_TOLERANCE},
        "child_height_decrease": {**rate(drop[checked] > CHILD_HEIGHT_DROP_CM, h_pidx[checked]),
                                  "threshold_cm": CHILD_HEIGHT_DROP_CM, "under_years": CHILD_YEARS},
    }


def _ndjson_files(export_dir: Path) -> list[Path]:
    return sorted(p for p in export_dir.iterdir() if p.name.endswith((".ndjson", ".ndjson.gz")))


class _ValidityTally:
    """Validation counts per resource type, at most per_type checked each (the rest counted as skipped), and the
    first 10 problems with where they were found."""

    def __init__(self, validate, per_type: int) -> None:  # noqa: ANN001 - fhirsynth.fhir.validate.validate_resource
        self.validate, self.per_type = validate, per_type
        self.per: dict[str, dict] = {}
        self.examples: list[str] = []

    def check(self, res: dict, where: str) -> bool:
        """Validate one resource; False when its type's cap was already reached (not checked)."""
        rtype = res.get("resourceType", "?")
        st = self.per.setdefault(rtype, {"checked": 0, "invalid": 0, "skipped_over_cap": 0})
        if st["checked"] >= self.per_type:
            st["skipped_over_cap"] += 1
            return False
        problems = self.validate(res)
        st["checked"] += 1
        if problems:
            st["invalid"] += 1
            if len(self.examples) < 10:
                self.examples.append(f"{where} {rtype}/{res.get('id')}: {problems[0]}")
        return True

    def totals(self) -> tuple[int, int]:
        return sum(s["checked"] for s in self.per.values()), sum(s["invalid"] for s in self.per.values())


def fhir_validity(export_dir: Path, per_type: int = 500) -> dict:
    """Validate up to per_type resources of each type in an export dir with fhirsynth.fhir.validate."""
    try:
        from fhirsynth.fhir.validate import validate_resource  # lazy: helper ASSEMBLE's module
    except ImportError as exc:
        return {"computable": False, "reason": f"fhirsynth.fhir.validate unavailable ({exc})"}
    tally = _ValidityTally(validate_resource, per_type)
    for path in _ndjson_files(export_dir):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                if not tally.check(json.loads(line), f"{path.name}:{lineno}"):
                    break  # one type per file: the cap for this file's type is reached
    per, examples = tally.per, tally.examples
    checked, invalid = tally.totals()
    return {"computable": checked > 0, "checked": checked,
            "valid_rate": float(1 - invalid / checked) if checked else None, "by_type": per,
            "examples": examples, **({} if checked else {"reason": "no resources found"})}


def sample_timelines_dir(timelines_dir: Path, n: int, seed: int) -> list:
    """Up to n patients' timelines, drawn uniformly without replacement (seeded), in file order.
    Only the sampled patients' rows are turned into Event objects: a large cohort is not materialised."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from fhirsynth.timeline.io import EVENTS_FILE, PATIENTS_FILE, read_events_table, read_patients_table, \
        read_timelines

    patients = read_patients_table(timelines_dir)
    if patients.num_rows > n:
        keep = np.sort(np.random.default_rng(seed).choice(patients.num_rows, n, replace=False))
        patients = patients.take(pa.array(keep))
    events = read_events_table(timelines_dir)
    events = events.filter(pc.is_in(events.column("patient_id"), value_set=patients.column("patient_id")))
    with tempfile.TemporaryDirectory(prefix="fhirsynth-validity-") as tmp:
        pq.write_table(patients, Path(tmp) / PATIENTS_FILE)
        pq.write_table(events, Path(tmp) / EVENTS_FILE)
        return list(read_timelines(tmp))


def fhir_validity_timelines(timelines_dir: Path, *, sample: int = 200, seed: int = 0, profile: str = "us-core",
                            per_type: int = 1000) -> dict:
    """FHIR validity of what an export of these timelines would contain: a seeded sample of up to `sample`
    patients is assembled with fhirsynth.timeline.assembler.assemble_patient (as `fhirsynth export` does) and
    their resources are checked with fhirsynth.fhir.validate, at most per_type per resource type (validation
    costs ~2 ms a resource; real patients have ~1,000). The rate covers the timelines plus the assembler."""
    try:  # lazy: helper ASSEMBLE's modules
        from fhirsynth.fhir.validate import validate_resource
        from fhirsynth.timeline.assembler import GeneratorInfo, assemble_patient
    except ImportError as exc:
        return {"computable": False, "reason": f"assembler/validator unavailable ({exc})"}
    if sample < 1:
        raise UsageError(f"FHIR validity sample must be >= 1 patient, got {sample}")
    timelines = sample_timelines_dir(timelines_dir, sample, seed)
    generator = GeneratorInfo(model_hash="evaluation", epsilon=None, delta=None)
    tally = _ValidityTally(validate_resource, per_type)
    examples = tally.examples
    failed_patients: list[str] = []
    for index, tl in enumerate(progress(timelines, desc="FHIR validity", unit="patient")):
        try:
            resources = assemble_patient(tl, profile=profile, seed=seed, index=index, generator=generator)
        except FhirsynthError as exc:  # a timeline the assembler refuses counts as invalid, with its reason
            failed_patients.append(tl.patient.patient_id)
            if len(examples) < 10:
                examples.append(f"patient {tl.patient.patient_id}: not assembled: {exc}")
            continue
        for res in resources:
            tally.check(res, f"patient {tl.patient.patient_id}")
    per = tally.per
    checked, invalid = tally.totals()
    if failed_patients:  # a patient that cannot be exported at all is one invalid item, not silently dropped
        checked += len(failed_patients)
        invalid += len(failed_patients)
    out = {"computable": checked > 0, "source": f"timelines assembled with the {profile} profile",
           "patients_sampled": len(timelines), "patients_not_assembled": len(failed_patients),
           "per_type_cap": per_type,
           "checked": checked, "invalid": invalid,
           "valid_rate": float(1 - invalid / checked) if checked else None, "by_type": per, "examples": examples}
    if not checked:
        out["reason"] = "no resources assembled"
    return out


def plausibility_report(cohorts: dict[str, Cohort], export_dir: Path | None, *,
                        synthetic_dir: Path | None = None, real_dir: Path | None = None,
                        validity_sample: int = 200, seed: int = 0) -> dict:
    """Rule-violation rates per cohort, and the FHIR validity rate of the synthetic data: the export's own
    resources when it is an export dir, else an assembled sample of `validity_sample` synthetic timelines.
    With real_dir, the same sample size of real timelines assembled the same way is the reference rate.
    validity_sample=0 skips the timelines validity check."""
    ranges, female, male, source = load_constraints()
    out: dict = {"constraints_source": source}
    out["note"] = ("the rules of each cohort's first block are the sampler's own constraints (a synthetic rate of 0 "
                   "holds by construction; the real rate is the reference: source-data errors such as unit "
                   "mislabels); held_out_rules are physiology the sampler does not enforce")
    for name, c in cohorts.items():
        out[name] = {**temporal_and_range(c, ranges, female, male), "enforced_by_sampler": True,
                     "held_out_rules": held_out_rules(c)}
    if export_dir is not None:
        out["fhir_validity_synthetic"] = {"source": "export dir resources", **fhir_validity(export_dir)}
    elif synthetic_dir is not None and validity_sample > 0:
        out["fhir_validity_synthetic"] = fhir_validity_timelines(synthetic_dir, sample=validity_sample, seed=seed)
    else:
        out["fhir_validity_synthetic"] = {"computable": False, "reason": "skipped (validity sample 0)"
                                          if synthetic_dir is not None else "no synthetic timelines dir given"}
    if real_dir is not None and validity_sample > 0:
        out["fhir_validity_real"] = fhir_validity_timelines(real_dir, sample=validity_sample, seed=seed)
    else:
        out["fhir_validity_real"] = {"computable": False, "reason": "skipped (validity sample 0)"
                                     if real_dir is not None else "no real timelines dir given"}
    return out
