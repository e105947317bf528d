"""Utility: train on synthetic, test on real (TSTR) against train on real (TRTR) and an age-only baseline.

Prediction tasks with a horizon, on landmark index dates (the same rule for every cohort):
- index dates: each patient gets D_k = base + k * step (k >= 1; base = the day of the patient's first event;
  step = the horizon), while the patient is alive at D_k and D_k + horizon is within the cohort's follow-up
  (a calendar day shared by the cohort, not the patient's own last event). Nothing about a patient's future
  chooses the dates, and the windows [D_k, D_k + horizon) of one patient do not overlap, so an onset or a death
  is a positive at most once.
- features: only events strictly before D (the columns of tables.flatten, age at D).
- label: the event within [D, D + horizon): first onset of a condition (rows whose patient already had it are
  left out), or death.
- targets: conditions chosen on the REAL data. Eligible: >= MIN_POSITIVES positives and negatives in both the
  real training set and the test set (the holdout, or a patient split of real), and not near-universal
  (all-time prevalence <= MAX_PREVALENCE). The eligible ones are screened on the real training data alone (a
  patient split of it, logistic regression on all features vs age bins and sex): up to N_TARGETS with the
  largest gain over age are chosen (duplicates, codes recorded together, skipped); plus death within the horizon.
- each task reports TRTR, TSTR and AGE-ONLY (the same classifier on age and sex, trained on real); a task whose
  age-only AUROC reaches TRTR within AGE_MARGIN is flagged measures_age: TSTR on it says little about the codes.
- intervals: patient-level bootstrap of the test set over fixed predictions (the models are not refitted).
- summary: the mean TSTR/TRTR ratio over computable tasks that do not merely measure age and whose TRTR beats
  chance (lower end of its interval above 0.5), with an interval from the same bootstrap draws.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np
import pandas as pd

from fhirsynth.evaluate.cohort import Cohort
from fhirsynth.evaluate.tables import DAYS_PER_YEAR, FeatureSpec, _column_name

log = logging.getLogger(__name__)

MIN_POSITIVES = 20  # fewest positives (and negatives) in the real training and test sets for a target to be chosen
MIN_TRAIN_CLASS = 10  # fewest positives (and negatives) to fit a classifier on (synthetic sets included)
MIN_TEST_CLASS = 10  # fewest positives (and negatives) in the test set for an AUROC to be reported at all
MAX_PREVALENCE = 0.5  # a condition most real patients eventually get is about timing, not who: not a target
N_TARGETS = 4  # condition targets (plus mortality)
AGE_MARGIN = 0.02  # age-only AUROC >= TRTR - AGE_MARGIN: the task measures age
BOOTSTRAP = 200  # patient-level bootstrap draws of the test set for the intervals
MAX_TRAIN_ROWS = 60_000  # training rows above this are subsampled uniformly (independent of labels)
FOLLOW_UP_QUANTILE = 0.9  # the cohort's end of follow-up: this quantile of the last event day of living patients
AGE_COLUMNS = ("age", "female")
SCREEN_MAX = 60  # eligible targets (most test positives first) screened on the real training data
SCREEN_NEGATIVES = 2000  # negatives kept per screening fit (all positives kept)
MAX_OVERLAP = 0.8  # a target whose positive rows overlap a chosen one's this much (Jaccard) is a duplicate
SCREEN_MIN_AUROC = 0.6  # a screened target with less than this on the real training data has no usable signal


@dataclass
class Landmarks:
    """Index dates of one cohort: rows (pidx, k, day) and their features x (same RangeIndex)."""

    rows: pd.DataFrame
    x: pd.DataFrame
    per_patient: pd.Series  # number of index dates per patient (index pidx, all patients)
    base: pd.Series  # floor of each patient's first event day (NaN without events)
    step: int
    end_day: float


# ------------------------------------------------------------------------------------------ index dates, features
def follow_up_end(cohort: Cohort) -> float:
    """The day up to which the cohort is observed: a high quantile of the last event day of patients not known
    to be dead (a calendar day shared by all patients; NaN for an empty cohort)."""
    last = cohort.last_day.to_numpy(float)
    alive = ~cohort.patients["deceased"].to_numpy(bool)
    vals = last[alive & np.isfinite(last)]
    if len(vals) == 0:
        vals = last[np.isfinite(last)]
    return float(np.quantile(vals, FOLLOW_UP_QUANTILE)) if len(vals) else float("nan")


def landmark_rows(cohort: Cohort, step: int, window: float, end_day: float) -> tuple[pd.DataFrame, pd.Series,
                                                                                     pd.Series]:
    """Index dates base + k*step (k >= 1) with the patient alive at them and date + window <= end_day."""
    base = np.floor(cohort.first_day.to_numpy(float))
    death = cohort.patients["death_day"].to_numpy(float)
    with np.errstate(invalid="ignore"):
        k_end = np.floor((end_day - window - base) / step)
        k_death = np.where(np.isfinite(death), np.floor((death - base) / step), np.inf)
    k_max = np.minimum(k_end, k_death)
    k_max = np.where(np.isfinite(k_max), np.clip(k_max, 0, None), 0).astype(np.int64)
    pidx = np.repeat(cohort.patients.index.to_numpy(), k_max)
    offsets = np.repeat(np.cumsum(k_max) - k_max, k_max)
    k = np.arange(len(pidx)) - offsets + 1
    day = base[pidx] + k * step if len(pidx) else np.zeros(0)
    rows = pd.DataFrame({"pidx": pidx.astype(np.int64), "k": k.astype(np.int64), "day": day.astype(np.int64)})
    return (rows, pd.Series(k_max, index=cohort.patients.index),
            pd.Series(base, index=cohort.patients.index))


def landmark_features(cohort: Cohort, spec: FeatureSpec, pidx: np.ndarray, day: np.ndarray) -> pd.DataFrame:
    """The columns of tables.flatten(cohort, spec, cutoff) for many (patient, integer index day) rows at once:
    only events with day < index day count; age is taken at the index day."""
    pidx = np.asarray(pidx, np.int64)
    day = np.asarray(day, np.int64)
    ev = cohort.events
    pats = cohort.patients
    e_p = ev["pidx"].to_numpy(np.int64)
    e_d = ev["iday"].to_numpy(np.int64)
    dmin = int(min(e_d.min(initial=0), day.min(initial=0))) - 1
    span = int(max(e_d.max(initial=0), day.max(initial=0))) - dmin + 2
    e_key = e_p * span + (e_d - dmin)
    order = np.argsort(e_key, kind="stable")
    e_key = e_key[order]
    r_key = pidx * span + (day - dmin)
    r_start = pidx * span
    out = pd.DataFrame(index=pd.RangeIndex(len(pidx)))
    birth = pats["birth_day"].to_numpy(float)[pidx] if len(pidx) else np.zeros(0)
    out["age"] = (day - birth) / DAYS_PER_YEAR
    out["female"] = (pats["sex"].to_numpy()[pidx] == "female").astype(float) if len(pidx) else np.zeros(0)
    hi = np.searchsorted(e_key, r_key, "left")
    lo = np.searchsorted(e_key, r_start, "left")
    n_ev = hi - lo
    out["n_events"] = n_ev.astype(float)
    v = cohort.visits
    v_key = np.sort(v["pidx"].to_numpy(np.int64) * span + (v["iday"].to_numpy(np.int64) - dmin))
    out["n_visits"] = (np.searchsorted(v_key, r_key, "left") - np.searchsorted(v_key, r_start, "left")).astype(float)
    e_day = ev["day"].to_numpy(float)[order]
    has = n_ev > 0
    first = np.where(has, e_day[np.minimum(lo, len(e_day) - 1)] if len(e_day) else 0.0, np.nan)
    last = np.where(has, e_day[np.maximum(hi - 1, 0)] if len(e_day) else 0.0, np.nan)
    out["span_years"] = np.nan_to_num((last - first) / DAYS_PER_YEAR, nan=0.0)

    cat = ev["token"].astype("category")
    tok = cat.cat.codes.to_numpy()[order]
    code_of = pd.Series(np.arange(len(cat.cat.categories)), index=cat.cat.categories.astype(str))
    values = ev["value"].to_numpy(float)[order]

    def counts(token: str, finite_only: bool) -> tuple[np.ndarray, np.ndarray]:
        m = tok == code_of.get(token, -2)
        if finite_only:
            m &= np.isfinite(values)
        keys = e_key[m]
        a = np.searchsorted(keys, r_start, "left")
        b = np.searchsorted(keys, r_key, "left")
        sums = np.r_[0.0, np.cumsum(values[m])] if finite_only else None
        return b - a, (sums[b] - sums[a]) if finite_only else np.zeros(0)

    cols: dict[str, np.ndarray] = {}
    for t in spec.conditions:
        cols[_column_name(t, "cond")] = (counts(t, False)[0] > 0).astype(float)
    for t in spec.observations:
        cols[_column_name(t, "nobs")] = counts(t, False)[0].astype(float)
    for t in spec.numeric:
        n, s = counts(t, True)
        with np.errstate(invalid="ignore", divide="ignore"):
            cols[_column_name(t, "mean")] = np.where(n > 0, s / np.maximum(n, 1), np.nan)
    if cols:
        out = pd.concat([out, pd.DataFrame(cols, index=out.index)], axis=1)
    return out


def build_landmarks(cohort: Cohort, spec: FeatureSpec, step: int, window: float) -> Landmarks:
    end = follow_up_end(cohort)
    rows, per_patient, base = landmark_rows(cohort, step, window, end)
    x = landmark_features(cohort, spec, rows["pidx"].to_numpy(), rows["day"].to_numpy())
    return Landmarks(rows, x, per_patient, base, step, end)


def _subset(lm: Landmarks, mask: np.ndarray) -> Landmarks:
    rows = lm.rows[mask].reset_index(drop=True)
    x = lm.x[mask].reset_index(drop=True)
    return Landmarks(rows, x, lm.per_patient, lm.base, lm.step, lm.end_day)


# ----------------------------------------------------------------------------------------------------- labels
def first_onsets(cohort: Cohort, kind: str = "condition") -> pd.DataFrame:
    """pidx, token, day of each patient's first event of each token of a kind."""
    ev = cohort.events[(cohort.events["kind"] == kind).to_numpy()]
    first = ev.groupby(["pidx", ev["token"].astype(str)], observed=True)["day"].min()
    return first.rename_axis(["pidx", "token"]).reset_index()


def onset_labels(cohort: Cohort, lm: Landmarks, token: str, horizon: float,
                 onsets: pd.DataFrame | None = None) -> tuple[np.ndarray, np.ndarray]:
    """keep (rows whose patient had no onset of token before the index day) and label (onset within horizon);
    onsets: first_onsets(cohort), when already computed."""
    onsets = first_onsets(cohort) if onsets is None else onsets
    o = onsets[onsets["token"] == token].set_index("pidx")["day"]
    d = lm.rows["day"].to_numpy(float)
    on = o.reindex(lm.rows["pidx"].to_numpy()).to_numpy(float)
    keep = ~(on < d)
    y = (on >= d) & (on < d + horizon)
    return keep, y[keep].astype(int)


def mortality_labels(cohort: Cohort, lm: Landmarks, horizon: float) -> tuple[np.ndarray, np.ndarray]:
    d = lm.rows["day"].to_numpy(float)
    death = cohort.patients["death_day"].to_numpy(float)[lm.rows["pidx"].to_numpy()] if len(d) else np.zeros(0)
    keep = ~(death < d)
    y = (death >= d) & (death < d + horizon)
    return keep, y[keep].astype(int)


def onset_counts(cohort: Cohort, lm: Landmarks, patients: np.ndarray | None = None) -> pd.DataFrame:
    """Per condition token: positives and negatives over the landmark rows of the given patients (all when None)
    and the share of those patients with the token at any time. Counts the rows onset_labels would make
    (step = horizon: each onset falls in at most one window)."""
    pats = cohort.patients.index.to_numpy() if patients is None else np.asarray(patients)
    k_max = lm.per_patient.reindex(pats).fillna(0).to_numpy(np.int64)
    total_rows = int(k_max.sum())
    onsets = first_onsets(cohort)
    onsets = onsets[np.isin(onsets["pidx"].to_numpy(), pats)]
    if onsets.empty:
        return pd.DataFrame(columns=["positives", "negatives", "prevalence"], dtype=float)
    base = lm.base.reindex(onsets["pidx"].to_numpy()).to_numpy(float)
    kp = lm.per_patient.reindex(onsets["pidx"].to_numpy()).to_numpy(np.int64)
    k_on = np.floor((onsets["day"].to_numpy(float) - base) / lm.step)
    pos = (k_on >= 1) & (k_on <= kp)
    neg_rows = np.clip(np.minimum(k_on - 1, kp), 0, None)  # rows before the onset window
    df = pd.DataFrame({"token": onsets["token"].to_numpy(), "pos": pos.astype(int), "neg": neg_rows,
                       "all": kp})
    g = df.groupby("token")
    out = pd.DataFrame({"positives": g["pos"].sum(),
                        # patients without the token keep all their rows; those with it, the rows before onset
                        "negatives": total_rows - g["all"].sum() + g["neg"].sum(),
                        "prevalence": g.size() / max(len(pats), 1)})
    return out


# ------------------------------------------------------------------------------------------------ target choice
def eligible_targets(train_counts: pd.DataFrame, test_counts: pd.DataFrame, prevalence: pd.Series, *,
                     min_positives: int = MIN_POSITIVES, max_prevalence: float = MAX_PREVALENCE) -> pd.DataFrame:
    """Every condition with its counts, sorted by test positives (ties: training positives); `reason` says why a
    target is not eligible (None: >= min_positives positives and negatives in both the real training and the
    test set, and an all-time prevalence <= max_prevalence in the real data)."""
    toks = train_counts.index.union(test_counts.index)
    c = pd.DataFrame({
        "train_pos": train_counts["positives"].reindex(toks).fillna(0).astype(int),
        "train_neg": train_counts["negatives"].reindex(toks).fillna(0).astype(int),
        "test_pos": test_counts["positives"].reindex(toks).fillna(0).astype(int),
        "test_neg": test_counts["negatives"].reindex(toks).fillna(0).astype(int),
        "prevalence": prevalence.reindex(toks).fillna(0.0).astype(float)}, index=toks)
    c = c.sort_values(["test_pos", "train_pos"], ascending=False, kind="stable")
    reasons = []
    for r in c.itertuples():
        if r.prevalence > max_prevalence:
            reasons.append(f"near-universal (prevalence {r.prevalence:.2f} > {max_prevalence})")
        elif min(r.train_pos, r.train_neg) < min_positives:
            reasons.append(f"real training set: {r.train_pos} positives, {r.train_neg} negatives "
                           f"(need >= {min_positives})")
        elif min(r.test_pos, r.test_neg) < min_positives:
            reasons.append(f"test set: {r.test_pos} positives, {r.test_neg} negatives (need >= {min_positives})")
        else:
            reasons.append(None)
    c["reason"] = pd.Series(reasons, index=c.index, dtype=object)  # None where eligible (not NaN)
    return c


AGE_BINS = (2, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90)  # years: the screen's age one-hot (nonlinear in age)


def _screen_design(x: pd.DataFrame, fit: np.ndarray, age_only: bool) -> np.ndarray:
    """Design matrix of the screen's logistic regression: one-hot age bins and sex, and (all features) every
    other column standardised on the fitting rows, missing values at the fitting median."""
    age = x["age"].to_numpy(float)
    bins = np.digitize(np.nan_to_num(age, nan=-1.0), AGE_BINS)
    parts = [np.eye(len(AGE_BINS) + 1)[bins], x[["female"]].to_numpy(float)]
    if not age_only:
        rest = x.drop(columns=list(AGE_COLUMNS)).to_numpy(float)
        med = np.nanmedian(np.where(np.isfinite(rest[fit]), rest[fit], np.nan), axis=0) if fit.any() else 0.0
        rest = np.where(np.isfinite(rest), rest, np.nan_to_num(med))
        mu, sd = rest[fit].mean(0), rest[fit].std(0)
        parts.append(np.clip((rest - mu) / np.where(sd > 0, sd, 1.0), -5, 5))
    return np.hstack(parts)


def screen_beyond_age(cohort: Cohort, lm: Landmarks, tokens: Sequence[str], horizon: float, seed: int,
                      patients: np.ndarray | None = None) -> pd.DataFrame:
    """On the REAL training data only (a 70/30 patient split of it; the test set is not touched): AUROC of a
    logistic regression on all features and on age bins and sex alone, per target; negatives are subsampled
    (AUROC does not depend on the class ratio). Cheap, so dozens of targets screen in about a second."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    pats = cohort.patients.index.to_numpy() if patients is None else np.asarray(patients)
    inner_test = _split_patients(pats, 0.3, seed + 3)
    rows_p = lm.rows["pidx"].to_numpy()
    mine = np.isin(rows_p, pats)
    out = []
    rng = np.random.default_rng(seed + 4)
    onsets = first_onsets(cohort)
    for tok in tokens:
        keep, y = onset_labels(cohort, lm, tok, horizon, onsets)
        rp = rows_p[keep]
        m = mine[keep]
        part = {"fit": m & ~np.isin(rp, inner_test), "eval": m & np.isin(rp, inner_test)}
        sel = {}
        for name, cap in (("fit", SCREEN_NEGATIVES), ("eval", SCREEN_NEGATIVES // 2)):
            idx = np.flatnonzero(part[name])
            neg = idx[y[idx] == 0]
            if len(neg) > cap:
                neg = rng.choice(neg, cap, replace=False)
            sel[name] = np.sort(np.r_[idx[y[idx] == 1], neg])
        yf, ye = y[sel["fit"]], y[sel["eval"]]
        res = {"token": tok, "screen_auroc": None, "screen_age_auroc": None, "screen_gain_se": None,
               "positive_rows": frozenset(np.flatnonzero(keep)[y == 1].tolist())}
        if min(yf.sum(), len(yf) - yf.sum(), ye.sum(), len(ye) - ye.sum()) >= 5:
            x = lm.x[keep].iloc[np.r_[sel["fit"], sel["eval"]]]
            fit = np.r_[np.ones(len(sel["fit"]), bool), np.zeros(len(sel["eval"]), bool)]
            for key, age_only in (("screen_auroc", False), ("screen_age_auroc", True)):
                d = _screen_design(x, fit, age_only)
                clf = LogisticRegression(C=0.5, max_iter=500).fit(d[fit], yf)
                res[key] = float(roc_auc_score(ye, clf.decision_function(d[~fit])))
            n1, n0 = int(ye.sum()), int(len(ye) - ye.sum())
            res["screen_gain_se"] = float(np.hypot(_auc_se(res["screen_auroc"], n1, n0),
                                                   _auc_se(res["screen_age_auroc"], n1, n0)))
        out.append(res)
    return pd.DataFrame(out, columns=["token", "screen_auroc", "screen_age_auroc", "screen_gain_se",
                                      "positive_rows"]).set_index("token")


def _auc_se(a: float, n1: int, n0: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUROC from n1 positives and n0 negatives."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    return float(np.sqrt(max(a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a), 0.0) / (n1 * n0)))


def _jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if (a or b) else 1.0


def choose_targets(eligible: pd.DataFrame, screen: pd.DataFrame | None = None, *,
                   n_targets: int = N_TARGETS) -> tuple[list[str], list[dict]]:
    """Among the eligible targets whose screen on the real training data shows signal beyond age (all features
    beat age and sex alone by more than AGE_MARGIN plus one standard error, and reach SCREEN_MIN_AUROC), the
    n_targets with the largest such gain; if fewer pass, the rest are filled with the eligible targets of highest
    screened AUROC above SCREEN_MIN_AUROC (they will likely be flagged measures_age); a target whose positive
    rows are mostly those of one already chosen (two codes recorded together) is skipped. Without a screen: the
    n_targets with most test positives.
    Returns the tokens and the candidates considered, with why each was or was not chosen."""
    ok = eligible[eligible["reason"].isna()]
    if screen is not None and not screen.empty:
        s = screen.reindex(ok.index)
        full, age = s["screen_auroc"].astype(float), s["screen_age_auroc"].astype(float)
        low = full - age - s["screen_gain_se"].astype(float)  # gain over age, less one standard error
        passes = (low > AGE_MARGIN) & (full >= SCREEN_MIN_AUROC)
        order = list(low[passes].sort_values(ascending=False, kind="stable").index)
        order += list(full[~passes & (full >= SCREEN_MIN_AUROC)].sort_values(ascending=False, kind="stable").index)
        chosen, duplicates = [], {}
        for tok in order:
            if len(chosen) >= n_targets:
                break
            same = next((c for c in chosen if _jaccard(s.at[tok, "positive_rows"], s.at[c, "positive_rows"])
                         > MAX_OVERLAP), None)
            if same is None:
                chosen.append(tok)
            else:
                duplicates[tok] = same
    else:
        chosen, duplicates = list(ok.index[:n_targets]), {}
    considered = []
    shown = list(eligible.index[:6]) + [t for t in (screen.index if screen is not None else []) if t in ok.index]
    for tok in dict.fromkeys(shown):
        r = eligible.loc[tok]
        row = {"token": str(tok), "positives_real_train": int(r["train_pos"]), "positives_test": int(r["test_pos"]),
               "prevalence": round(float(r["prevalence"]), 4), "chosen": tok in chosen,
               "reason": r["reason"] if isinstance(r["reason"], str) else None}
        if screen is not None and tok in screen.index:
            sa, sg = screen.loc[tok, "screen_auroc"], screen.loc[tok, "screen_age_auroc"]
            row["screen_auroc"] = None if pd.isna(sa) else round(float(sa), 4)
            row["screen_age_auroc"] = None if pd.isna(sg) else round(float(sg), 4)
            se = screen.loc[tok, "screen_gain_se"]
            row["screen_gain_se"] = None if pd.isna(se) else round(float(se), 4)
        if tok in duplicates:
            row["reason"] = f"same positives as {duplicates[tok]} (chosen)"
        elif row["reason"] is None and not row["chosen"]:
            row["reason"] = "eligible; not chosen (less signal beyond age in the screen than the chosen ones)"
        considered.append(row)
    return chosen, considered


# ------------------------------------------------------------------------------------------------- classifiers
def _fit_predict(x_train: pd.DataFrame, y_train: np.ndarray, x_test: pd.DataFrame, seed: int) -> np.ndarray:
    from sklearn.ensemble import HistGradientBoostingClassifier

    clf = HistGradientBoostingClassifier(max_iter=150, learning_rate=0.05, max_leaf_nodes=15, random_state=seed)
    clf.fit(x_train.to_numpy(float), y_train)
    return clf.predict_proba(x_test.reindex(columns=x_train.columns).to_numpy(float))[:, 1]


def _class_problem(name: str, y: np.ndarray, need: int) -> str | None:
    pos = int(y.sum())
    if pos < need or len(y) - pos < need:
        return f"{name} has {pos} positives and {len(y) - pos} negatives (need >= {need} each)"
    return None


def weighted_aucs(y: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of one score under each row of weights (B x n), ties counted half; NaN where a class is empty."""
    from scipy import sparse

    weights = np.atleast_2d(weights).astype(float)
    u, inv = np.unique(score, return_inverse=True)
    n = len(y)
    onehot = sparse.csr_matrix((np.ones(n), (np.arange(n), inv)), shape=(n, len(u)))
    pos = np.asarray((sparse.csr_matrix(weights * (y == 1)) @ onehot).todense())
    neg = np.asarray((sparse.csr_matrix(weights * (y == 0)) @ onehot).todense())
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(1)
    den = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _ci(samples: np.ndarray) -> list[float] | None:
    s = samples[np.isfinite(samples)]
    if len(s) < 20:
        return None
    lo, hi = np.percentile(s, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def _split_patients(pats: np.ndarray, frac: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return pats[rng.random(len(pats)) < frac]


def _iso(day: float) -> str | None:
    return (date(1970, 1, 1) + timedelta(days=float(day))).isoformat() if np.isfinite(day) else None


def _resolve(real: Cohort, target: str) -> str:
    """A token (kind|system|code) as given, or the real condition token whose code is target."""
    if "|" in target:
        return target
    toks = real.events.loc[(real.events["kind"] == "condition").to_numpy(), "token"].astype(str).unique()
    match = [t for t in toks if t.rsplit("|", 1)[-1] == target]
    return match[0] if match else f"condition||{target}"


# --------------------------------------------------------------------------------------------------- the report
def utility_report(real: Cohort, synthetic: Cohort, spec: FeatureSpec, *, holdout: Cohort | None = None,
                   onset_horizon_days: float = 365.0, mortality_horizon_days: float | None = None,
                   seed: int = 0, targets: Sequence[str] | None = None, n_targets: int = N_TARGETS,
                   min_positives: int = MIN_POSITIVES, bootstrap: int = BOOTSTRAP, screen: bool = True) -> dict:
    """TRTR (train real, test holdout or a 30% patient split of real), TSTR (train synthetic, same test set) and
    age-only (real, age and sex) per task; targets chosen on the real data unless given (tokens or codes);
    mortality_horizon_days None: the onset horizon."""
    step = max(1, round(onset_horizon_days))
    horizon = float(step)
    m_horizon = float(mortality_horizon_days) if mortality_horizon_days else horizon
    window = max(horizon, m_horizon)

    real_lm = build_landmarks(real, spec, step, window)
    synth_lm = build_landmarks(synthetic, spec, step, window)
    if holdout is not None:
        test_cohort, train_lm = holdout, real_lm
        test_lm = build_landmarks(holdout, spec, step, window)
        train_pats, test_pats = None, None
        test_set = "holdout"
    else:
        pats = real.patients.index.to_numpy()
        test_pats = _split_patients(pats, 0.3, seed)
        train_pats = np.setdiff1d(pats, test_pats)
        in_test = np.isin(real_lm.rows["pidx"].to_numpy(), test_pats)
        test_cohort, train_lm, test_lm = real, _subset(real_lm, ~in_test), _subset(real_lm, in_test)
        test_set = "30% patient split of real; the generator saw these patients, so TSTR is optimistic"

    # targets: chosen on the real data
    considered: list[dict] = []
    if targets is not None:
        chosen = [_resolve(real, t) for t in targets]
    else:
        train_counts = onset_counts(real, real_lm, train_pats)
        test_counts = onset_counts(test_cohort, test_lm, test_pats)
        prevalence = onset_counts(real, real_lm)["prevalence"]
        eligible = eligible_targets(train_counts, test_counts, prevalence, min_positives=min_positives)
        to_screen = list(eligible.index[eligible["reason"].isna()][:SCREEN_MAX]) if screen else []
        scr = screen_beyond_age(real, real_lm, to_screen, horizon, seed, train_pats) if to_screen else None
        chosen, considered = choose_targets(eligible, scr, n_targets=n_targets)

    # one patient-level bootstrap of the test set, shared by every task (so the mean ratio has an interval too)
    rng = np.random.default_rng(seed + 1)
    test_pidx = np.unique(test_lm.rows["pidx"].to_numpy())
    boot = rng.multinomial(len(test_pidx), np.full(len(test_pidx), 1 / max(len(test_pidx), 1)),
                           size=bootstrap) if len(test_pidx) and bootstrap else np.zeros((0, len(test_pidx)))
    test_pos = pd.Series(np.arange(len(test_pidx)), index=test_pidx)

    train_rows_cap = np.random.default_rng(seed + 2)

    def capped(lm: Landmarks) -> Landmarks:
        if len(lm.rows) <= MAX_TRAIN_ROWS:
            return lm
        keep = np.zeros(len(lm.rows), bool)
        keep[train_rows_cap.choice(len(lm.rows), MAX_TRAIN_ROWS, replace=False)] = True
        return _subset(lm, keep)

    train_fit, synth_fit = capped(train_lm), capped(synth_lm)

    onsets = {id(c): first_onsets(c) for c in (real, synthetic, test_cohort)}
    tasks: dict[str, tuple[dict, object]] = {}
    for tok in chosen:
        code = tok.rsplit("|", 1)[-1]
        name = f"onset_{code}"
        while name in tasks:
            name += "_"
        label = f"{code} {real.displays[tok]}" if tok in real.displays else code
        tasks[name] = ({"kind": "condition_onset", "target": tok, "label": label, "horizon_days": horizon,
                        "description": f"first {label} within {horizon:.0f} days after an index date (patients who "
                                       "had it before are left out)"},
                       lambda c, lm, tok=tok: onset_labels(c, lm, tok, horizon, onsets[id(c)]))
    tasks["mortality"] = ({"kind": "mortality", "target": None, "label": "death", "horizon_days": m_horizon,
                           "description": f"death within {m_horizon:.0f} days after an index date"},
                          lambda c, lm: mortality_labels(c, lm, m_horizon))

    out_tasks: dict[str, dict] = {}
    boot_ratio: dict[str, np.ndarray] = {}
    for name, (res, labels) in tasks.items():
        k_tr, y_tr = labels(real, train_fit)
        k_te, y_te = labels(test_cohort, test_lm)
        k_sy, y_sy = labels(synthetic, synth_fit)
        x_tr, x_te, x_sy = train_fit.x[k_tr], test_lm.x[k_te], synth_fit.x[k_sy]
        res = dict(res)
        res["n"] = {"real_train": len(y_tr), "test": len(y_te), "synthetic": len(y_sy)}
        res["positives"] = {"real_train": int(y_tr.sum()), "test": int(y_te.sum()), "synthetic": int(y_sy.sum())}
        why_test = _class_problem("test set", y_te, MIN_TEST_CLASS)
        why = {"trtr": why_test or _class_problem("real training set", y_tr, MIN_TRAIN_CLASS),
               "tstr": why_test or _class_problem("synthetic training set", y_sy, MIN_TRAIN_CLASS)}
        why["age_only"] = why["trtr"]
        scores: dict[str, np.ndarray] = {}
        if why["trtr"] is None:
            scores["trtr"] = _fit_predict(x_tr, y_tr, x_te, seed)
            scores["age_only"] = _fit_predict(x_tr[list(AGE_COLUMNS)], y_tr, x_te[list(AGE_COLUMNS)], seed)
        if why["tstr"] is None:
            scores["tstr"] = _fit_predict(x_sy, y_sy, x_te, seed)
        w = boot[:, test_pos.reindex(test_lm.rows["pidx"].to_numpy()[k_te]).to_numpy()] if len(boot) else None
        draws: dict[str, np.ndarray] = {}
        for key in ("trtr", "tstr", "age_only"):
            if key in scores:
                res[f"{key}_auroc"] = float(weighted_aucs(y_te, scores[key], np.ones((1, len(y_te))))[0])
                draws[key] = weighted_aucs(y_te, scores[key], w) if w is not None else np.zeros(0)
                res[f"{key}_ci"] = _ci(draws[key])
            else:
                res[f"{key}_auroc"] = None
                res[f"{key}_ci"] = None
            res[f"{key}_reason"] = why[key]
        trtr, tstr, age = res["trtr_auroc"], res["tstr_auroc"], res["age_only_auroc"]
        res["ratio"] = tstr / trtr if (trtr and tstr is not None) else None
        res["ratio_ci"] = None
        if res["ratio"] is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                boot_ratio[name] = draws["tstr"] / draws["trtr"]
            res["ratio_ci"] = _ci(boot_ratio[name])
        res["trtr_minus_age_only"] = trtr - age if (trtr is not None and age is not None) else None
        res["trtr_minus_age_only_ci"] = _ci(draws["trtr"] - draws["age_only"]) if "age_only" in draws else None
        res["measures_age"] = bool(age >= trtr - AGE_MARGIN) if (trtr is not None and age is not None) else None
        # TRTR must beat chance for the ratio to mean anything (a ratio of two coin flips is ~1)
        lo = res["trtr_ci"][0] if res["trtr_ci"] else None
        res["signal"] = (bool(lo > 0.5) if lo is not None else bool(trtr >= SCREEN_MIN_AUROC)) \
            if trtr is not None else None
        res["computable"] = trtr is not None and tstr is not None
        res["reason"] = "; ".join(f"{k.upper()}: {why[k]}" for k in ("trtr", "tstr") if why[k]) or None
        out_tasks[name] = res

    used = [n for n, r in out_tasks.items() if r["computable"] and r["measures_age"] is False and r["signal"]]
    flagged = [n for n, r in out_tasks.items() if r["measures_age"]]
    computable = [n for n, r in out_tasks.items() if r["computable"]]
    summary: dict = {
        "mean_ratio": float(np.mean([out_tasks[n]["ratio"] for n in used])) if used else None,
        "mean_ratio_ci": _ci(np.mean([boot_ratio[n] for n in used], axis=0)) if used and len(boot) else None,
        "tasks_used": used,
        "measures_age": flagged,
        "no_signal": [n for n, r in out_tasks.items() if r["signal"] is False],
        "not_computable": [n for n in out_tasks if n not in computable],
        "mean_ratio_all_computable": (float(np.mean([out_tasks[n]["ratio"] for n in computable]))
                                      if computable else None),
        "reason": None,
    }
    if not used:
        summary["reason"] = ("no computable task that does not merely measure age and whose TRTR beats chance"
                             + (f" ({len(flagged)} measure age)" if flagged else ""))

    design = {
        "index_dates": f"every {step} days from each patient's first event, while alive and while the window "
                       "ends within the cohort's follow-up; features from events before the index date",
        "horizon_days": horizon, "mortality_horizon_days": m_horizon,
        "follow_up_end": {"real": _iso(real_lm.end_day), "synthetic": _iso(synth_lm.end_day),
                          **({"holdout": _iso(test_lm.end_day)} if holdout is not None else {})},
        "classifier": "HistGradientBoosting (150 iterations, 15 leaves)",
        "age_only_features": list(AGE_COLUMNS), "measures_age_margin": AGE_MARGIN,
        "min_positives": min_positives, "max_prevalence": MAX_PREVALENCE, "n_targets": n_targets,
        "bootstrap": len(boot), "interval": "95% percentile, patient-level bootstrap of the test set",
        "training_rows_cap": MAX_TRAIN_ROWS,
    }
    return {"test_set": test_set, "design": design,
            "targets": {"chosen": chosen, "given": targets is not None, "candidates": considered},
            "tasks": out_tasks, "summary": summary}
