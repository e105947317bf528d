"""Flatten timelines into one row per patient (the table used by Hellinger, detection, utility and baselines).

Columns are chosen from the real cohort (FeatureSpec) and applied unchanged to every other cohort, so tables
line up column for column. An optional per-patient cutoff day keeps only history strictly before it (utility
tasks must not see the future).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fhirsynth.evaluate.cohort import Cohort

DAYS_PER_YEAR = 365.25


@dataclass(frozen=True)
class FeatureSpec:
    conditions: tuple[str, ...]
    observations: tuple[str, ...]
    numeric: tuple[str, ...]


def top_tokens(cohort: Cohort, kind: str, k: int, *, numeric: bool = False) -> list[str]:
    """The k tokens of a kind held by most patients (numeric: only tokens with values)."""
    ev = cohort.events
    ev = ev[ev["kind"] == kind]
    if numeric:
        ev = ev[ev["value"].notna()]
    counts = ev.drop_duplicates(["pidx", "token"])["token"].astype(str).value_counts()
    return list(counts.index[:k])


def feature_spec(real: Cohort, *, n_conditions: int = 30, n_observations: int = 15, n_numeric: int = 8) -> FeatureSpec:
    return FeatureSpec(
        conditions=tuple(top_tokens(real, "condition", n_conditions)),
        observations=tuple(top_tokens(real, "observation", n_observations)),
        numeric=tuple(top_tokens(real, "observation", n_numeric, numeric=True)),
    )


def _column_name(token: str, prefix: str) -> str:
    return f"{prefix}:{token.rsplit('|', 1)[-1]}"


def flatten(cohort: Cohort, spec: FeatureSpec, cutoff_day: pd.Series | None = None) -> pd.DataFrame:
    """One row per patient (index pidx). With cutoff_day (indexed by pidx) only events before it count and
    age is taken at the cutoff; patients missing from cutoff_day are dropped."""
    pats = cohort.patients
    ev = cohort.events
    index = pats.index
    if cutoff_day is not None:
        index = cutoff_day.index
        cut = cutoff_day.reindex(ev["pidx"].to_numpy()).to_numpy()
        ev = ev[ev["day"].to_numpy() < cut]
    out = pd.DataFrame(index=index)
    birth = pats["birth_day"].reindex(index)
    first = ev.groupby("pidx")["day"].min().reindex(index)
    last = ev.groupby("pidx")["day"].max().reindex(index)
    ref = cutoff_day if cutoff_day is not None else first
    out["age"] = ((ref - birth) / DAYS_PER_YEAR).astype(float)
    out["female"] = (pats["sex"].reindex(index) == "female").astype(float)
    if cutoff_day is None:
        out["deceased"] = pats["deceased"].reindex(index).astype(float)
    out["n_events"] = ev.groupby("pidx").size().reindex(index).fillna(0).astype(float)
    out["n_visits"] = ev.groupby("pidx")["visit"].nunique().reindex(index).fillna(0).astype(float)
    out["span_years"] = ((last - first) / DAYS_PER_YEAR).fillna(0).astype(float)
    # token -> column position; per-patient counts and value sums by bincount (crosstab is pure Python)
    row = pd.Series(np.arange(len(index)), index=index).reindex(ev["pidx"].to_numpy()).to_numpy()
    tok = ev["token"].astype(str).to_numpy()
    counts = _per_patient(row, tok, list(spec.conditions) + list(spec.observations), len(index), None)
    for j, t in enumerate(spec.conditions):
        out[_column_name(t, "cond")] = (counts[:, j] > 0).astype(float)
    for j, t in enumerate(spec.observations):
        out[_column_name(t, "nobs")] = counts[:, len(spec.conditions) + j]
    values = ev["value"].to_numpy(float)
    n_num = _per_patient(row, tok, list(spec.numeric), len(index), np.isfinite(values), None)
    s_num = _per_patient(row, tok, list(spec.numeric), len(index), np.isfinite(values), values)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(n_num > 0, s_num / np.maximum(n_num, 1), np.nan)
    for j, t in enumerate(spec.numeric):
        out[_column_name(t, "mean")] = means[:, j]
    return out


def _per_patient(row: np.ndarray, tok: np.ndarray, tokens: list[str], n_rows: int, mask: np.ndarray | None,
                 weights: np.ndarray | None = None) -> np.ndarray:
    """n_rows x len(tokens) matrix of event counts (or sums of weights) per patient row and token."""
    out = np.zeros((n_rows, len(tokens)))
    if not tokens or len(tok) == 0:
        return out
    col = pd.Series(np.arange(len(tokens)), index=tokens).reindex(tok).to_numpy()
    keep = np.isfinite(col) & np.isfinite(row.astype(float))
    if mask is not None:
        keep &= mask
    flat = row[keep].astype(np.int64) * len(tokens) + col[keep].astype(np.int64)
    w = None if weights is None else weights[keep]
    out += np.bincount(flat, weights=w, minlength=n_rows * len(tokens)).reshape(n_rows, len(tokens))
    return out
