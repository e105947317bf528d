"""Load a timelines directory into flat pandas tables the metrics share (vectorised; no per-event Python).

A "token" is kind|system|code; a "visit" is one patient-day with events (robust to synthetic timelines that
carry no encounter ids, and the same rule for real and synthetic so the statistics compare like with like).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from fhirsynth.timeline.io import read_events_table, read_patients_table

log = logging.getLogger(__name__)

_EVENT_COLS = ["patient_id", "time", "kind", "system", "code", "display", "value", "unit", "end_time", "category"]
_DAY_NS = 86_400 * 10**9


def _days(series: pd.Series) -> np.ndarray:
    """Datetime series (tz-aware or naive) -> float days since 1970 (NaN for missing)."""
    s = pd.to_datetime(series, utc=True)
    out = np.full(len(s), np.nan)
    ok = s.notna().to_numpy()
    out[ok] = s[ok].dt.tz_convert(None).astype("datetime64[ns]").astype("int64").to_numpy() / _DAY_NS
    return out


@dataclass
class Cohort:
    """events: one row per event with pidx (0..n-1), day (float days since epoch), iday (int day), token, kind,
    value, end_day, visit (global visit id, ordered by patient then day), vrank (visit number within patient).
    patients: one row per patient (index pidx) with sex, birth_day, death_day, deceased."""

    name: str
    events: pd.DataFrame
    patients: pd.DataFrame
    displays: dict[str, str] = field(default_factory=dict)
    dropped_events: int = 0

    @property
    def n(self) -> int:
        return len(self.patients)

    @cached_property
    def visits(self) -> pd.DataFrame:
        """One row per visit: pidx, iday, vrank (index = visit id)."""
        v = self.events[["visit", "pidx", "iday", "vrank"]].drop_duplicates("visit").set_index("visit").sort_index()
        return v

    @cached_property
    def first_day(self) -> pd.Series:
        return self.events.groupby("pidx")["day"].min().reindex(self.patients.index)

    @cached_property
    def last_day(self) -> pd.Series:
        return self.events.groupby("pidx")["day"].max().reindex(self.patients.index)

    def subset(self, pidx: np.ndarray, name: str | None = None) -> Cohort:
        """A cohort restricted to some patients (re-indexed 0..k-1)."""
        pidx = np.asarray(pidx)
        remap = pd.Series(np.arange(len(pidx)), index=pidx)
        pats = self.patients.loc[pidx].copy()
        pats.index = np.arange(len(pidx))
        ev = self.events[self.events["pidx"].isin(pidx)].copy()
        ev["pidx"] = remap.loc[ev["pidx"].to_numpy()].to_numpy()
        ev = _with_visits(ev.drop(columns=["visit", "vrank"]))
        return Cohort(name or self.name, ev, pats, self.displays, 0)


def _with_visits(ev: pd.DataFrame) -> pd.DataFrame:
    ev = ev.sort_values(["pidx", "day", "kind"], kind="stable").reset_index(drop=True)
    key = ev["pidx"].to_numpy().astype(np.int64) * 10_000_000 + (ev["iday"].to_numpy() + 3_000_000)
    new = np.r_[True, key[1:] != key[:-1]] if len(key) else np.zeros(0, bool)
    ev["visit"] = np.cumsum(new) - 1
    first_visit = ev.groupby("pidx")["visit"].transform("min")
    ev["vrank"] = (ev["visit"] - first_visit).astype(np.int64)
    return ev


def load_cohort(timelines_dir: str | Path, name: str = "cohort") -> Cohort:
    """Read events.parquet + patients.parquet into a Cohort."""
    pt = read_patients_table(timelines_dir).to_pandas(date_as_object=False)
    et = read_events_table(timelines_dir).select(_EVENT_COLS).to_pandas()
    pt = pt.drop_duplicates("patient_id").reset_index(drop=True)
    index = pd.Series(np.arange(len(pt)), index=pt["patient_id"].to_numpy())
    pidx = et["patient_id"].map(index)
    dropped = int(pidx.isna().sum())
    if dropped:
        log.warning("%s: %d events belong to no patient in patients.parquet; ignored", timelines_dir, dropped)
    ev = et[pidx.notna()].copy()
    ev["pidx"] = pidx[pidx.notna()].astype(np.int64).to_numpy()
    ev["day"] = _days(ev["time"])
    ev = ev[np.isfinite(ev["day"].to_numpy())]
    ev["iday"] = np.floor(ev["day"].to_numpy()).astype(np.int64)
    ev["end_day"] = _days(ev["end_time"])
    for col in ("kind", "system", "code"):
        ev[col] = ev[col].fillna("")
    ev["token"] = (ev["kind"] + "|" + ev["system"] + "|" + ev["code"]).astype("category")
    disp = ev.dropna(subset=["display"]).drop_duplicates("token")
    displays = dict(zip(disp["token"].astype(str), disp["display"].astype(str)))
    ev["kind"] = ev["kind"].astype("category")
    ev = _with_visits(ev.drop(columns=["patient_id", "time", "end_time", "system", "code", "display"]))

    pats = pd.DataFrame(index=np.arange(len(pt)))
    pats["patient_id"] = pt["patient_id"].to_numpy()
    pats["sex"] = pt["sex"].fillna("unknown").to_numpy()
    pats["birth_day"] = _days(pt["birth_date"])
    pats["death_day"] = _days(pt["death_date"])
    flagged = pt["deceased"].fillna(False).to_numpy().astype(bool)
    pats["deceased"] = flagged | np.isfinite(pats["death_day"].to_numpy())
    return Cohort(name, ev, pats, displays, dropped)


def token_label(token: str, displays: dict[str, str]) -> str:
    code = token.rsplit("|", 1)[-1]
    disp = displays.get(token)
    return f"{code} {disp}" if disp else code
