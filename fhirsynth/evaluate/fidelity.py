"""Fidelity: how closely a cohort's statistics match the real cohort's (HALO-style code statistics,
distributions, numeric values, ordering, multivariate Hellinger, classifier detection)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from fhirsynth.evaluate.cohort import Cohort
from fhirsynth.evaluate.tables import DAYS_PER_YEAR

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- vector comparisons
def r2_identity(real: np.ndarray, other: np.ndarray) -> float | None:
    """Coefficient of determination of `other` as a predictor of `real` (the y = x line, as in HALO's plots):
    1 means identical; 0 means no better than the mean; negative is worse."""
    real = np.asarray(real, float)
    other = np.asarray(other, float)
    ss_tot = float(((real - real.mean()) ** 2).sum())
    if len(real) < 2 or ss_tot == 0.0:
        return None
    return 1.0 - float(((real - other) ** 2).sum()) / ss_tot


def compare_vectors(real: pd.Series, other: pd.Series) -> dict:
    """Align two statistics on the union of keys (missing = 0) and compare."""
    keys = real.index.union(other.index)
    r = real.reindex(keys).fillna(0.0).to_numpy(float)
    o = other.reindex(keys).fillna(0.0).to_numpy(float)
    pearson = None
    if len(r) > 1 and r.std() > 0 and o.std() > 0:
        pearson = float(np.corrcoef(r, o)[0, 1] ** 2)
    return {"r2": r2_identity(r, o), "pearson_r2": pearson, "n_keys": int(len(keys)),
            "n_only_real": int((~real.index.isin(other.index)).sum()),
            "n_only_other": int((~other.index.isin(real.index)).sum()),
            "mean_abs_diff": float(np.abs(r - o).mean()) if len(r) else None}


# ---------------------------------------------------------------- HALO code statistics
def prevalence(cohort: Cohort, kind: str) -> pd.Series:
    """Share of patients with each token of a kind at least once."""
    ev = cohort.events[cohort.events["kind"] == kind]
    per = ev.drop_duplicates(["pidx", "token"])["token"].astype(str).value_counts()
    return per / max(cohort.n, 1)


def top_visit_tokens(cohort: Cohort, k: int) -> list[str]:
    ev = cohort.events[cohort.events["kind"].isin(["condition", "observation"])]
    counts = ev.drop_duplicates(["visit", "token"])["token"].astype(str).value_counts()
    return list(counts.index[:k])


def visit_matrix(cohort: Cohort, tokens: list[str]) -> sp.csr_matrix:
    """visits x tokens binary matrix (rows = visit ids in order)."""
    col = {t: i for i, t in enumerate(tokens)}
    ev = cohort.events
    j = ev["token"].astype(str).map(col)
    keep = j.notna().to_numpy()
    n_vis = int(ev["visit"].max()) + 1 if len(ev) else 0
    m = sp.csr_matrix((np.ones(int(keep.sum())), (ev["visit"].to_numpy()[keep], j[keep].astype(int).to_numpy())),
                      shape=(n_vis, len(tokens)))
    m.data[:] = 1.0  # duplicates were summed; presence only
    return m


def cooccurrence(cohort: Cohort, tokens: list[str]) -> pd.Series:
    """Share of visits containing each unordered token pair (i < j)."""
    m = visit_matrix(cohort, tokens)
    if m.shape[0] == 0:
        return pd.Series(dtype=float)
    c = (m.T @ m).toarray() / m.shape[0]
    iu = np.triu_indices(len(tokens), 1)
    names = [f"{tokens[a]}~{tokens[b]}" for a, b in zip(*iu)]
    return pd.Series(c[iu], index=names)


def transitions(cohort: Cohort, tokens: list[str]) -> pd.Series:
    """Share of consecutive visit pairs (same patient) where token a is in the first and b in the next."""
    m = visit_matrix(cohort, tokens)
    vis = cohort.visits
    if len(vis) < 2:
        return pd.Series(dtype=float)
    pid = vis["pidx"].to_numpy()
    has_next = np.r_[pid[1:] == pid[:-1], False]
    a = np.flatnonzero(has_next)
    if len(a) == 0:
        return pd.Series(dtype=float)
    t = (m[a].T @ m[a + 1]).toarray() / len(a)
    names = [f"{x}>{y}" for x in tokens for y in tokens]
    return pd.Series(t.ravel(), index=names)


def marginal_divergence(real: Cohort, other: Cohort, kind: str, alpha: float = 0.5) -> dict:
    """KL(real || other) of event-token frequencies (additive smoothing alpha), and Jensen-Shannon (bits)."""
    r = real.events.loc[real.events["kind"] == kind, "token"].astype(str).value_counts()
    o = other.events.loc[other.events["kind"] == kind, "token"].astype(str).value_counts()
    keys = r.index.union(o.index)
    if len(keys) == 0:
        return {"kl": None, "js": None, "n_codes": 0}
    p = r.reindex(keys).fillna(0).to_numpy(float) + alpha
    q = o.reindex(keys).fillna(0).to_numpy(float) + alpha
    p /= p.sum()
    q /= q.sum()
    mix = (p + q) / 2
    js = 0.5 * (stats.entropy(p, mix, base=2) + stats.entropy(q, mix, base=2))
    return {"kl": float(stats.entropy(p, q)), "js": float(js), "n_codes": int(len(keys))}


# ---------------------------------------------------------------- distributions
def per_patient_quantities(cohort: Cohort) -> dict[str, np.ndarray]:
    ev = cohort.events
    idx = cohort.patients.index
    age_first = ((cohort.first_day - cohort.patients["birth_day"]) / DAYS_PER_YEAR).to_numpy()
    vis = cohort.visits
    days = vis["iday"].to_numpy()
    pid = vis["pidx"].to_numpy()
    same = pid[1:] == pid[:-1]
    gaps = (days[1:] - days[:-1])[same].astype(float)
    return {
        "age_at_first_event_years": age_first[np.isfinite(age_first)],
        "events_per_patient": ev.groupby("pidx").size().reindex(idx).fillna(0).to_numpy(float),
        "visits_per_patient": vis.groupby("pidx").size().reindex(idx).fillna(0).to_numpy(float),
        "days_between_visits": gaps,
    }


def compare_samples(real: np.ndarray, other: np.ndarray) -> dict:
    real = np.asarray(real, float)
    other = np.asarray(other, float)
    real = real[np.isfinite(real)]
    other = other[np.isfinite(other)]
    if len(real) == 0 or len(other) == 0:
        return {"ks": None, "ks_pvalue": None, "wasserstein": None, "n_real": len(real), "n_other": len(other)}
    ks = stats.ks_2samp(real, other, method="asymp")  # exact mode is slow for large samples
    sd = float(real.std())
    w = float(stats.wasserstein_distance(real, other))
    return {"ks": float(ks.statistic), "ks_pvalue": float(ks.pvalue), "wasserstein": w,
            "wasserstein_over_sd": w / sd if sd > 0 else None,
            "mean_real": float(real.mean()), "mean_other": float(other.mean()),
            "n_real": int(len(real)), "n_other": int(len(other))}


def total_variation(real: pd.Series, other: pd.Series) -> float:
    keys = real.index.union(other.index)
    p = real.reindex(keys).fillna(0).to_numpy(float)
    q = other.reindex(keys).fillna(0).to_numpy(float)
    p = p / p.sum() if p.sum() else p
    q = q / q.sum() if q.sum() else q
    return float(0.5 * np.abs(p - q).sum())


def numeric_values(cohort: Cohort, token: str) -> np.ndarray:
    ev = cohort.events
    sel = (ev["token"] == token).to_numpy() & ev["value"].notna().to_numpy()
    return ev.loc[sel, "value"].to_numpy(float)


# ---------------------------------------------------------------- ordering
def first_onset_matrix(cohort: Cohort, tokens: list[str]) -> np.ndarray:
    ev = cohort.events
    sub = ev[ev["token"].astype(str).isin(tokens).to_numpy()]
    first = sub.groupby(["pidx", sub["token"].astype(str)])["day"].min().unstack()
    return first.reindex(index=cohort.patients.index, columns=tokens).to_numpy(float)


def order_shares(cohort: Cohort, tokens: list[str], min_both: int = 5) -> pd.Series:
    """For each token pair, the share of patients having both whose first a precedes first b (ties half)."""
    f = first_onset_matrix(cohort, tokens)
    out = {}
    for i in range(len(tokens)):
        for j in range(i + 1, len(tokens)):
            both = np.isfinite(f[:, i]) & np.isfinite(f[:, j])
            if both.sum() < min_both:
                continue
            a, b = f[both, i], f[both, j]
            out[f"{tokens[i]}<{tokens[j]}"] = float(((a < b) + 0.5 * (a == b)).mean())
    return pd.Series(out, dtype=float)


# ---------------------------------------------------------------- multivariate
def _copula_scores(real_col: np.ndarray, col: np.ndarray) -> np.ndarray:
    """Normal scores of col under real's empirical CDF (mid-ranks for ties, +0.5 continuity)."""
    srt = np.sort(real_col)
    lo = np.searchsorted(srt, col, side="left")
    hi = np.searchsorted(srt, col, side="right")
    u = (lo + hi) / 2.0 + 0.5
    return stats.norm.ppf(u / (len(srt) + 1))


def gaussian_copula_hellinger(real: pd.DataFrame, other: pd.DataFrame, ridge: float = 1e-3) -> float | None:
    """Hellinger distance between Gaussians fitted to both tables after mapping every column through the real
    column's empirical CDF to normal scores (closed form; 0 = same, 1 = disjoint)."""
    cols = [c for c in real.columns if real[c].notna().any()]
    if not cols or len(real) < 3 or len(other) < 3:
        return None
    zr, zo = [], []
    for c in cols:
        r = real[c].to_numpy(float)
        fill = np.nanmedian(r)
        r = np.where(np.isnan(r), fill, r)
        o = other[c].to_numpy(float) if c in other.columns else np.full(len(other), fill)
        o = np.where(np.isnan(o), fill, o)
        zr.append(_copula_scores(r, r))
        zo.append(_copula_scores(r, o))
    zr_a = np.column_stack(zr)
    zo_a = np.column_stack(zo)
    m1, m2 = zr_a.mean(0), zo_a.mean(0)
    eye = ridge * np.eye(len(cols))
    s1 = np.atleast_2d(np.cov(zr_a, rowvar=False)) + eye
    s2 = np.atleast_2d(np.cov(zo_a, rowvar=False)) + eye
    s = (s1 + s2) / 2
    _, ld1 = np.linalg.slogdet(s1)
    _, ld2 = np.linalg.slogdet(s2)
    _, ld = np.linalg.slogdet(s)
    d = m1 - m2
    maha = float(d @ np.linalg.solve(s, d))
    log_bc = 0.25 * ld1 + 0.25 * ld2 - 0.5 * ld - maha / 8.0
    h2 = max(0.0, 1.0 - float(np.exp(log_bc)))
    return float(np.sqrt(h2))


def detection_auc(real: pd.DataFrame, other: pd.DataFrame, *, seed: int = 0, folds: int = 5,
                  max_rows: int = 2000) -> dict:
    """Cross-validated AUC of a gradient-boosted classifier telling real rows from other rows (0.5 = cannot)."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict

    rng = np.random.default_rng(seed)
    n = min(len(real), len(other), max_rows)
    if n < 2 * folds:
        return {"auc": None, "reason": f"too few rows ({n}) for {folds}-fold detection"}
    r = real.iloc[rng.choice(len(real), n, replace=False)]
    o = other.reindex(columns=real.columns).iloc[rng.choice(len(other), n, replace=False)]
    x = np.vstack([r.to_numpy(float), o.to_numpy(float)])
    y = np.r_[np.zeros(n), np.ones(n)]
    # Identical rows share a fold: otherwise a copied record is "detected" through its twin's opposite label
    # in the training fold, and a perfect copy would score AUC ~0 instead of 0.5.
    groups = pd.util.hash_pandas_object(pd.DataFrame(x).round(9), index=False).to_numpy()
    clf = HistGradientBoostingClassifier(max_iter=100, max_leaf_nodes=15, learning_rate=0.1, random_state=seed)
    cv = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    proba = cross_val_predict(clf, x, y, groups=groups, cv=cv, method="predict_proba")[:, 1]
    return {"auc": float(roc_auc_score(y, proba)), "n_per_class": int(n), "folds": folds,
            "classifier": "HistGradientBoosting"}


# ---------------------------------------------------------------- orchestration
def _scatter(real: pd.Series, other: pd.Series, limit: int = 400) -> list[list[float]]:
    keys = real.index.union(other.index)
    r = real.reindex(keys).fillna(0.0)
    o = other.reindex(keys).fillna(0.0)
    order = np.argsort(-(r.to_numpy() + o.to_numpy()))[:limit]
    return [[float(r.iloc[i]), float(o.iloc[i])] for i in order]


def fidelity_report(real: Cohort, other: Cohort, *, real_table: pd.DataFrame, other_table: pd.DataFrame,
                    n_pair_tokens: int = 60, n_value_codes: int = 10, n_order_codes: int = 15,
                    seed: int = 0) -> tuple[dict, dict]:
    """All fidelity metrics of `other` against `real`; returns (metrics, plot data)."""
    out: dict = {}
    plots: dict = {}
    prev = {}
    for kind in ("condition", "observation"):
        pr, po = prevalence(real, kind), prevalence(other, kind)
        prev[kind] = compare_vectors(pr, po)
        plots[f"prevalence_{kind}"] = _scatter(pr, po)
    out["prevalence"] = prev
    tokens = top_visit_tokens(real, n_pair_tokens)
    cr, co = cooccurrence(real, tokens), cooccurrence(other, tokens)
    out["cooccurrence"] = {**compare_vectors(cr, co), "n_tokens": len(tokens)}
    plots["cooccurrence"] = _scatter(cr, co)
    tr, to = transitions(real, tokens), transitions(other, tokens)
    out["transitions"] = {**compare_vectors(tr, to), "n_tokens": len(tokens)}
    plots["transitions"] = _scatter(tr, to)
    out["marginal"] = {k: marginal_divergence(real, other, k) for k in ("condition", "observation", "encounter")}

    qr, qo = per_patient_quantities(real), per_patient_quantities(other)
    dist = {name: compare_samples(qr[name], qo[name]) for name in qr}
    sex_r = real.patients["sex"].value_counts()
    sex_o = other.patients["sex"].value_counts()
    dist["sex"] = {"tvd": total_variation(sex_r, sex_o),
                   "real": {k: float(v / sex_r.sum()) for k, v in sex_r.items()},
                   "other": {k: float(v / max(sex_o.sum(), 1)) for k, v in sex_o.items()}}
    dist["deceased"] = {"real": float(real.patients["deceased"].mean()) if real.n else None,
                        "other": float(other.patients["deceased"].mean()) if other.n else None}
    out["distributions"] = dist
    plots["distributions"] = {name: {"real": _hist_sample(qr[name]), "other": _hist_sample(qo[name])} for name in qr}

    from fhirsynth.evaluate.tables import top_tokens

    values = {}
    for tok in top_tokens(real, "observation", n_value_codes, numeric=True):
        vr, vo = numeric_values(real, tok), numeric_values(other, tok)
        values[tok] = {"label": real.displays.get(tok, tok), **compare_samples(vr, vo)}
    out["numeric_values"] = values
    ks_vals = [v["ks"] for v in values.values() if v["ks"] is not None]
    out["numeric_values_mean_ks"] = float(np.mean(ks_vals)) if ks_vals else None

    cond_tokens = top_tokens(real, "condition", n_order_codes)
    orr = order_shares(real, cond_tokens)
    oro = order_shares(other, cond_tokens)
    common = orr.index.intersection(oro.index)
    out["ordering"] = {
        "pairs_real": int(len(orr)), "pairs_compared": int(len(common)),
        "mean_abs_diff": float(np.abs(orr[common] - oro[common]).mean()) if len(common) else None,
        "sign_agreement": float(((orr[common] - 0.5) * (oro[common] - 0.5) >= 0).mean()) if len(common) else None,
    }
    out["hellinger_copula"] = gaussian_copula_hellinger(real_table, other_table)
    out["detection"] = detection_auc(real_table, other_table, seed=seed)
    return out, plots


def _hist_sample(values: np.ndarray, limit: int = 3000) -> list[float]:
    """A bounded, deterministic sample of values for the HTML histograms."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) > limit:
        v = np.sort(v)[np.linspace(0, len(v) - 1, limit).astype(int)]
    return [round(float(x), 4) for x in v]
