"""Whole-records fidelity (issue 14): does a cohort look like the real one patient by patient, visit by visit?

In the package (not only in benchmarks/) because `fhirsynth demo` reports the same numbers for its small cohort
that benchmarks/bench_records.py measured on the 800-patient benchmark, so the two can be read side by side.
CLI: benchmarks/records_metrics.py.

A "code" is (kind, system, code) of a condition or observation event. A "visit" is the events of a patient sharing
an encounter_id, or, for events without one, a calendar day (UTC). records_table(real, other) computes, with
R² = fhirsynth.evaluate.fidelity.r2_identity (other as a predictor of real, y = x line):
  prevalence_r2          per-code patient prevalence over the codes held by >= 1% of the real patients;
  patient_cooc_r2        share of patients with both codes, every unordered pair of the 40 most common real codes
                         held by 5%..95% of the real patients;
  events_ks / _median_*  condition + observation events per patient (two-sample KS statistic, medians);
  days_ks / _median_*    distinct calendar days with condition / observation events per patient;
  visits_ks / _median_*  visits per patient: distinct encounter_ids over all events + days of events without one;
  within_visit_cooc_r2   share of visits containing both codes, pairs of the 40 codes with the highest visit share
                         in real (visits = those with at least one condition / observation event);
  transition_r2          share of consecutive visit pairs of a patient (time order) with code a in the first and
                         b in the next, ordered pairs of the same 40 codes (a = b included);
  traj_corr_maxdiff      the 10 most common numeric observation codes of real: Pearson r of consecutive values of
                         one patient (lag 1, pairs pooled over patients), max |r_other - r_real| (per code too);
  traj_band_mean_max_rel_diff  max |mean_other - mean_real| / |mean_real| over those codes and the 10-year age
                         bands (age at the event) with >= 20 real values (bands other lacks: traj_band_missing);
  value_kind_mismatch    other's observation events whose value kind (quantity with its unit, coded, none) never
                         occurs in real for that code (codes real has as observations), value_kind_codes the codes
                         with any (value_kind_mismatch_share: as a share of other's observation events);
                         novel_obs_code_events counts other's observation events of codes real lacks;
  value_withheld         other's observation events written with dataAbsentReason "masked" (a value the DP
                         release withheld) of codes real records with numbers: not mismatches, counted apart;
  first_visit_age_ks     age at the first visit (days from the birth date to the visit's start: its encounter's
                         start, else its earliest event), patients with a birth date and an event;
  birth_week_visits_*    share of patients with a visit starting in the first 7 days of life (real or other): the
                         newest-first sampler, out of time before birth, once piled visits there;
  deceased_share_*, n_*.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime, timezone
from functools import cached_property

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from fhirsynth.evaluate.fidelity import r2_identity
from fhirsynth.timeline.types import DATA_ABSENT_SYSTEM, VALUE_WITHHELD, Timeline

log = logging.getLogger(__name__)

CODE_KINDS = ("condition", "observation")
MIN_PREVALENCE = 0.01
COOC_BAND = (0.05, 0.95)
TOP_PAIRS = 40
TOP_NUMERIC = 10
BAND_YEARS = 10
MIN_BAND_VALUES = 20
_DAY_S = 86_400.0
_YEAR_S = 365.25 * _DAY_S


# ---------------------------------------------------------------- flattening
class Records:
    """One cohort flattened once: `events` (one row per event: pidx, ts (UTC seconds), day (UTC calendar day),
    kind, token, value, unit, value_code, visit (per-cohort visit id)) and `patients` (index pidx: birth_ts,
    deceased)."""

    def __init__(self, timelines: list[Timeline]):
        self.n = len(timelines)
        pairs = [(i, e) for i, tl in enumerate(timelines) for e in tl.events]
        evs = [e for _, e in pairs]
        ev = pd.DataFrame({
            "pidx": np.fromiter((i for i, _ in pairs), np.int64, len(pairs)),
            "ts": np.fromiter((_ts(e.time) for e in evs), float, len(evs)),
            "kind": [e.kind for e in evs],
            "token": [f"{e.kind}|{e.system}|{e.code}" for e in evs],
            "value": np.array([math.nan if e.value is None else e.value for e in evs], float),
            "unit": [e.unit for e in evs],
            "value_code": [e.value_code for e in evs],
            # dataAbsentReason of an observation without a value (the generator's "masked": a withheld value)
            "absent": [e.value_code if e.value_system == DATA_ABSENT_SYSTEM else None for e in evs],
            "enc": [e.encounter_id for e in evs],
        })
        ev["day"] = np.floor(ev["ts"].to_numpy() / _DAY_S).astype(np.int64)
        # visit key: the encounter id when there is one, else the calendar day (negative keys, never clash)
        enc_codes, _ = pd.factorize(ev["enc"])
        vkey = np.where(enc_codes >= 0, enc_codes, -(ev["day"].to_numpy() + 10_000_000) - 1)
        ev["visit"] = pd.factorize(ev["pidx"].to_numpy() * 100_000_000 + (vkey + 50_000_000))[0]
        self.events = ev
        self.coded = ev[ev["kind"].isin(CODE_KINDS)]
        self.patients = pd.DataFrame({
            "birth_ts": [_birth_ts(tl.patient.birth_date) for tl in timelines],
            "deceased": [bool(tl.patient.deceased or tl.patient.death_date is not None) for tl in timelines],
        })

    # per-patient quantities (every patient, zeros included)
    def per_patient(self, counts: pd.Series) -> np.ndarray:
        return counts.reindex(np.arange(self.n), fill_value=0).to_numpy(float)

    def prevalence(self) -> pd.Series:
        return self.coded.drop_duplicates(["pidx", "token"])["token"].value_counts() / max(self.n, 1)

    @cached_property
    def visit_starts(self) -> pd.DataFrame:
        """Every visit: pidx, days (its start in days since the birth date: its encounter's start, else its earliest
        event). Cached: compare reads it twice, and benchmarks compare one real cohort with many."""
        ev = self.events
        enc = ev[ev["kind"] == "encounter"].groupby("visit")["ts"].min()
        first = ev.groupby("visit").agg(pidx=("pidx", "first"), ts=("ts", "min"))
        ts = enc.reindex(first.index).fillna(first["ts"])
        birth = self.patients["birth_ts"].reindex(first["pidx"]).to_numpy()
        return pd.DataFrame({"pidx": first["pidx"].to_numpy(), "days": (ts.to_numpy() - birth) / _DAY_S})

    def visit_table(self) -> pd.DataFrame:
        """Visits with at least one condition / observation event, in (patient, time) order: visit, pidx, ts."""
        v = self.coded.groupby("visit", sort=False).agg(pidx=("pidx", "first"), ts=("ts", "min")).reset_index()
        return v.sort_values(["pidx", "ts", "visit"], kind="stable").reset_index(drop=True)


def _ts(dt: datetime) -> float:
    return (dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)).timestamp()


def _birth_ts(d) -> float:
    if d is None:
        return math.nan
    return datetime(d.year, d.month, d.day, tzinfo=timezone.utc).timestamp()


def _binary(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    m = sp.csr_matrix((np.ones(len(rows), np.float64), (rows, cols)), shape=shape)
    m.data[:] = 1.0  # duplicates summed: back to presence
    return m


def _membership(df: pd.DataFrame, row_col: str, row_index: pd.Index, codes: list[str]) -> sp.csr_matrix:
    """rows of row_index x codes: 1 where some event of the row has the code."""
    col_of = pd.Series(np.arange(len(codes)), index=codes)
    sub = df[df["token"].isin(codes)]
    rows = row_index.get_indexer(sub[row_col].to_numpy())
    keep = rows >= 0
    return _binary(rows[keep], col_of.loc[sub["token"].to_numpy()].to_numpy()[keep], (len(row_index), len(codes)))


def _r2(real: np.ndarray, other: np.ndarray) -> float:
    if len(real) < 2:
        return math.nan
    value = r2_identity(real, other)
    return math.nan if value is None else value


def _ks(real: np.ndarray, other: np.ndarray) -> float:
    if not len(real) or not len(other):
        return math.nan
    return float(stats.ks_2samp(real, other).statistic)


def _median(x: np.ndarray) -> float:
    return float(np.median(x)) if len(x) else math.nan


# ---------------------------------------------------------------- the metrics
def _patient_pairs(rec: Records, codes: list[str]) -> np.ndarray:
    m = _membership(rec.coded, "pidx", pd.RangeIndex(rec.n), codes)
    c = (m.T @ m).toarray() / max(rec.n, 1)
    return c[np.triu_indices(len(codes), 1)]


def _visit_stats(rec: Records, codes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(within-visit pair shares over unordered pairs, consecutive-visit transition shares over ordered pairs)."""
    vt = rec.visit_table()
    m = _membership(rec.coded, "visit", pd.Index(vt["visit"].to_numpy()), codes)
    k = len(codes)
    within = (m.T @ m).toarray() / max(len(vt), 1)
    pidx = vt["pidx"].to_numpy()
    first = np.flatnonzero(pidx[:-1] == pidx[1:]) if len(pidx) > 1 else np.zeros(0, np.int64)
    trans = (m[first].T @ m[first + 1]).toarray() / max(len(first), 1)
    return within[np.triu_indices(k, 1)], trans.ravel()


def _visit_share(rec: Records) -> pd.Series:
    n_visits = max(rec.coded["visit"].nunique(), 1)
    return rec.coded.drop_duplicates(["visit", "token"])["token"].value_counts() / n_visits


def _numeric(rec: Records, token: str) -> pd.DataFrame:
    ev = rec.coded
    sub = ev[(ev["token"] == token) & ev["value"].notna()]
    return sub.sort_values(["pidx", "ts"], kind="stable")[["pidx", "ts", "value"]]


def _lag1_corr(sub: pd.DataFrame) -> float:
    pidx, x = sub["pidx"].to_numpy(), sub["value"].to_numpy(float)
    same = np.flatnonzero(pidx[:-1] == pidx[1:]) if len(pidx) > 1 else np.zeros(0, np.int64)
    a, b = x[same], x[same + 1]
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def _band_means(rec: Records, sub: pd.DataFrame) -> pd.DataFrame:
    birth = rec.patients["birth_ts"].to_numpy()[sub["pidx"].to_numpy()]
    age = (sub["ts"].to_numpy() - birth) / _YEAR_S
    ok = np.isfinite(age)
    band = np.floor(age[ok] / BAND_YEARS).astype(np.int64) * BAND_YEARS
    return pd.DataFrame({"band": band, "value": sub["value"].to_numpy()[ok]}).groupby("band")["value"].agg(
        ["mean", "size"])


def _label(token: str, tokens: list[str]) -> str:
    """The code alone when it is unambiguous among tokens, else system|code."""
    _, system, code = token.split("|", 2)
    return code if sum(t.rsplit("|", 1)[-1] == code for t in tokens) == 1 else f"{system}|{code}"


def _value_kinds(rec: Records) -> pd.DataFrame:
    """Value kind per observation event: q:<unit>, coded, none, or withheld (dataAbsentReason VALUE_WITHHELD)."""
    obs = rec.coded[rec.coded["kind"] == "observation"]
    absent = obs["absent"].to_numpy(object)
    has_value = obs["value"].notna().to_numpy()
    has_code = obs["value_code"].notna().to_numpy() & pd.isna(absent)
    vk = np.where(has_value, "q:" + obs["unit"].fillna("").astype(str),
                  np.where(has_code, "coded", np.where(absent == VALUE_WITHHELD, "withheld", "none")))
    return pd.DataFrame({"token": obs["token"].to_numpy(), "vk": vk})


def compare(real: Records, other: Records) -> dict[str, float]:
    """records_table on already flattened cohorts (flatten real once when comparing it with several)."""
    out: dict[str, float] = {"n_real": float(real.n), "n_other": float(other.n)}

    # 1. prevalence
    prev_r, prev_o = real.prevalence(), other.prevalence()
    codes = prev_r.index[prev_r >= MIN_PREVALENCE]
    out["prevalence_r2"] = _r2(prev_r.loc[codes].to_numpy(), prev_o.reindex(codes, fill_value=0.0).to_numpy())
    out["prevalence_codes"] = float(len(codes))

    # 2. patient-level co-occurrence
    band = prev_r[(prev_r >= COOC_BAND[0]) & (prev_r <= COOC_BAND[1])]
    top = band.sort_values(ascending=False, kind="stable").index[:TOP_PAIRS].tolist()
    out["patient_cooc_r2"] = _r2(_patient_pairs(real, top), _patient_pairs(other, top))

    # 3-5. record shape per patient
    for name, fn in (("events", lambda r: r.coded.groupby("pidx").size()),
                     ("days", lambda r: r.coded.groupby("pidx")["day"].nunique()),
                     ("visits", lambda r: r.events.groupby("pidx")["visit"].nunique())):
        a, b = real.per_patient(fn(real)), other.per_patient(fn(other))
        out[f"{name}_ks"] = _ks(a, b)
        out[f"{name}_median_real"] = _median(a)
        out[f"{name}_median_other"] = _median(b)

    # 6-7. within-visit co-occurrence and consecutive-visit transitions
    vtop = _visit_share(real).sort_values(ascending=False, kind="stable").index[:TOP_PAIRS].tolist()
    w_r, t_r = _visit_stats(real, vtop)
    w_o, t_o = _visit_stats(other, vtop)
    out["within_visit_cooc_r2"] = _r2(w_r, w_o)
    out["transition_r2"] = _r2(t_r, t_o)

    # 8. numeric trajectories
    num = real.coded[(real.coded["kind"] == "observation") & real.coded["value"].notna()]
    ntop = num["token"].value_counts().sort_values(ascending=False, kind="stable").index[:TOP_NUMERIC].tolist()
    diffs, rel, missing = [], [], 0
    per_code: dict[str, float] = {}
    for token in ntop:
        sub_r, sub_o = _numeric(real, token), _numeric(other, token)
        r_r, r_o = _lag1_corr(sub_r), _lag1_corr(sub_o)
        label = _label(token, ntop)
        per_code[f"traj_corr_real[{label}]"] = r_r
        per_code[f"traj_corr_other[{label}]"] = r_o
        diffs.append(abs(r_o - r_r))
        m_r, m_o = _band_means(real, sub_r), _band_means(other, sub_o)
        for b, row in m_r[m_r["size"] >= MIN_BAND_VALUES].iterrows():
            if b not in m_o.index:
                missing += 1
            elif row["mean"] != 0:
                rel.append((abs(m_o.loc[b, "mean"] - row["mean"]) / abs(row["mean"]), label, int(b)))
    finite = [d for d in diffs if math.isfinite(d)]
    out["traj_corr_maxdiff"] = max(finite) if finite else math.nan
    out["traj_band_mean_max_rel_diff"] = max(rel)[0] if rel else math.nan
    if rel:
        log.info("largest age-band mean gap: %s, ages %d-%d (%.3g)", max(rel)[1], max(rel)[2],
                 max(rel)[2] + BAND_YEARS - 1, max(rel)[0])
    out["traj_band_missing"] = float(missing)

    # 9. value kinds
    vk_r, vk_o = _value_kinds(real), _value_kinds(other)
    known = vk_o["token"].isin(set(vk_r["token"]))
    seen = pd.MultiIndex.from_frame(vk_r.drop_duplicates())
    bad = known.to_numpy() & ~pd.MultiIndex.from_frame(vk_o).isin(seen)
    # a withheld value is the generator saying "a number, not released": a mismatch only for a code real never
    # records with a number
    numeric = set(vk_r.loc[vk_r["vk"].str.startswith("q:"), "token"])
    withheld = (vk_o["vk"] == "withheld").to_numpy() & vk_o["token"].isin(numeric).to_numpy()
    bad &= ~withheld
    out["value_withheld"] = float(withheld.sum())
    out["value_kind_mismatch"] = float(bad.sum())
    out["value_kind_mismatch_share"] = float(bad.mean()) if len(bad) else 0.0
    out["value_kind_codes"] = float(vk_o.loc[bad, "token"].nunique())
    out["novel_obs_code_events"] = float((~known).sum())

    # 10. where records begin
    f_r, f_o = _first_visit_days(real), _first_visit_days(other)
    out["first_visit_age_ks"] = _ks(f_r.dropna().to_numpy(), f_o.dropna().to_numpy())
    out["birth_week_visits_real"] = _birth_week_share(real)
    out["birth_week_visits_other"] = _birth_week_share(other)

    # 11. deaths
    out["deceased_share_real"] = float(real.patients["deceased"].mean()) if real.n else math.nan
    out["deceased_share_other"] = float(other.patients["deceased"].mean()) if other.n else math.nan
    out.update(per_code)
    return out


def _first_visit_days(rec: Records) -> pd.Series:
    return rec.visit_starts.groupby("pidx")["days"].min()


def _birth_week_share(rec: Records) -> float:
    v = rec.visit_starts
    with_birth = rec.patients["birth_ts"].notna().sum()
    return float(v.loc[v["days"] < 7, "pidx"].nunique() / with_birth) if with_birth else math.nan


def records_table(real: list[Timeline], other: list[Timeline]) -> dict[str, float]:
    """Whole-records fidelity of `other` against `real` (see the module docstring for each key)."""
    return compare(Records(real), Records(other))


# ---------------------------------------------------------------- table
def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if float(x).is_integer() and abs(x) >= 1:
        return str(int(x))
    return f"{x:.4g}"


def markdown(columns: dict[str, dict[str, float]]) -> str:
    names = list(columns)
    keys: list[str] = []
    for col in columns.values():
        keys += [k for k in col if k not in keys]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {k} | " + " | ".join(_fmt(columns[n].get(k, math.nan)) for n in names) + " |" for k in keys]
    return "\n".join(lines)


# ---------------------------------------------------------------- the rest of the patient (issue 18)
# Medications, immunizations, procedures and allergies: per-kind code prevalence, drug-for-disease co-occurrence
# and vaccine timing. Kept apart from compare() so its columns (issue 14's table) stay what they were.
REST_KINDS = ("medication", "immunization", "procedure", "allergy")
TOP_COOC = 20  # conditions and medications of real in the drug-for-disease pairs
# Age bands of a vaccine (years at the immunization): infancy schedule, childhood, school age, adolescence,
# adults, older adults.
VACCINE_AGE_EDGES = (0.0, 1.0, 2.0, 5.0, 12.0, 18.0, 65.0, math.inf)


def kind_prevalence(rec: Records, kind: str) -> pd.Series:
    """Share of patients holding each code (token) of one event kind."""
    ev = rec.events[rec.events["kind"] == kind]
    return ev.drop_duplicates(["pidx", "token"])["token"].value_counts() / max(rec.n, 1)


def kind_prevalence_r2(real: Records, other: Records, kind: str,
                       min_prevalence: float = MIN_PREVALENCE) -> tuple[float, int]:
    """(R² of other's per-code patient prevalence against real's, over real's codes of `kind` held by at least
    min_prevalence of its patients; the number of those codes). NaN with fewer than two codes."""
    pr = kind_prevalence(real, kind)
    pr = pr[pr >= min_prevalence]
    po = kind_prevalence(other, kind).reindex(pr.index, fill_value=0.0)
    return _r2(pr.to_numpy(float), po.to_numpy(float)), int(len(pr))


def _top(rec: Records, kind: str, n: int) -> list[str]:
    p = kind_prevalence(rec, kind)
    return sorted(p.index, key=lambda t: (-p[t], t))[:n]


def condition_medication_shares(rec: Records, conditions: list[str], medications: list[str]) -> np.ndarray:
    """[len(conditions) x len(medications)] share of patients holding both the condition and the medication."""
    if not conditions or not medications:
        return np.zeros((len(conditions), len(medications)))
    pats = pd.RangeIndex(rec.n)
    c = _membership(rec.events, "pidx", pats, conditions)
    m = _membership(rec.events, "pidx", pats, medications)
    return (c.T @ m).toarray() / max(rec.n, 1)


def condition_medication_cooc_r2(real: Records, other: Records, top: int = TOP_COOC) -> tuple[float, int]:
    """Drug for disease: R² of the share of patients with both a condition and a medication, over every pair of
    real's `top` most common conditions and `top` most common medications (pairs neither cohort has count as
    zeros on both sides and so add nothing to either sum of squares; the number of pairs is returned)."""
    conds, meds = _top(real, "condition", top), _top(real, "medication", top)
    r = condition_medication_shares(real, conds, meds).ravel()
    o = condition_medication_shares(other, conds, meds).ravel()
    return _r2(r, o), int(r.size)


def _age_years(rec: Records, ev: pd.DataFrame) -> np.ndarray:
    """The patient's age at each event of ev (rows of rec.events), in years; NaN without a birth date."""
    return (ev["ts"].to_numpy() - rec.patients["birth_ts"].to_numpy()[ev["pidx"].to_numpy()]) / _YEAR_S


def vaccine_age_shares(rec: Records) -> np.ndarray:
    """Share of immunization events in each VACCINE_AGE_EDGES band of the patient's age at the event."""
    ev = rec.events[rec.events["kind"] == "immunization"]
    if not len(ev):
        return np.zeros(len(VACCINE_AGE_EDGES) - 1)
    age = _age_years(rec, ev)
    age = age[~np.isnan(age)]
    counts, _ = np.histogram(np.clip(age, 0.0, None), bins=np.array(VACCINE_AGE_EDGES))
    return counts / max(counts.sum(), 1)


def vaccine_age_band_labels() -> list[str]:
    e = VACCINE_AGE_EDGES
    return [f"{e[i]:g}-{e[i + 1]:g}y" if math.isfinite(e[i + 1]) else f"{e[i]:g}y+" for i in range(len(e) - 1)]


def first_year(rec: Records) -> dict[str, float]:
    """Where an infant's vaccines go missing: the share of patients whose record reaches the first year of life,
    and, over those first years, encounters per such patient and vaccines per encounter."""
    infant = rec.events[_age_years(rec, rec.events) < 1.0]
    reached = infant["pidx"].nunique()
    encounters = int((infant["kind"] == "encounter").sum())
    return {"first_year_reached_share": reached / max(rec.n, 1),
            "first_year_encounters_per_patient": encounters / reached if reached else math.nan,
            "first_year_vaccines_per_encounter": (int((infant["kind"] == "immunization").sum()) / encounters
                                                  if encounters else math.nan)}


def rest_compare(real: Records, other: Records) -> dict[str, float]:
    """The issue-18 columns: per-kind prevalence R², drug-for-disease co-occurrence R², vaccine timing."""
    out: dict[str, float] = {}
    for kind in REST_KINDS:
        r2, n = kind_prevalence_r2(real, other, kind)
        out[f"{kind}_prevalence_r2"], out[f"{kind}_codes"] = r2, float(n)
        # share of other's patients with any event of the kind (compare the column of real against itself)
        out[f"{kind}_patient_share"] = other.events.loc[other.events["kind"] == kind, "pidx"].nunique() / max(
            other.n, 1)
    out["condition_medication_cooc_r2"], n_pairs = condition_medication_cooc_r2(real, other)
    out["condition_medication_pairs"] = float(n_pairs)
    vr, vo = vaccine_age_shares(real), vaccine_age_shares(other)
    diff = np.abs(vr - vo) * 100.0
    out["vaccine_age_band_max_diff_points"] = float(diff.max()) if len(diff) else math.nan
    for label, share in zip(vaccine_age_band_labels(), vo, strict=True):
        out[f"vaccine_share_{label}"] = float(share)
    out.update(first_year(other))
    return out
