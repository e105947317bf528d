"""Privacy: the formal guarantee, membership inference (model likelihood, code-set distance), distance to
closest record, exact copies, attribute inference. Members = the real (training) cohort; non-members = holdout."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from fhirsynth.evaluate.cohort import Cohort

log = logging.getLogger(__name__)

# Sensitive conditions for attribute inference (SNOMED CT); first present with enough cases wins.
SENSITIVE = ("370143000", "35489007", "36923009", "86406008", "7200002", "5602001", "55680006", "66590003",
             "6525002", "191736004", "197480006", "706893006")
MAX_ROWS = 2000


# ---------------------------------------------------------------- attack scoring
def attack_metrics(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict:
    """AUC and TPR at 1% FPR of a score where higher means 'member'."""
    from sklearn.metrics import roc_auc_score, roc_curve

    m = np.asarray(member_scores, float)
    n = np.asarray(nonmember_scores, float)
    dropped = int((~np.isfinite(m)).sum() + (~np.isfinite(n)).sum())  # e.g. NaN NLL: not tokenizable
    m, n = m[np.isfinite(m)], n[np.isfinite(n)]
    if len(m) == 0 or len(n) == 0:
        return {"auc": None, "tpr_at_1pct_fpr": None, "reason": "no members or no non-members"}
    y = np.r_[np.ones(len(m)), np.zeros(len(n))]
    s = np.r_[m, n]
    fpr, tpr, _ = roc_curve(y, s)
    return {"auc": float(roc_auc_score(y, s)), "tpr_at_1pct_fpr": float(np.interp(0.01, fpr, tpr)),
            "n_members": int(len(m)), "n_nonmembers": int(len(n)), "n_unscored": dropped}


# ---------------------------------------------------------------- code sets and distances
def code_sets(cohorts: list[Cohort], kinds: tuple[str, ...] = ("condition", "observation")) -> list[sp.csr_matrix]:
    """Binary patient x token matrices over the union vocabulary of the given cohorts."""
    vocab: dict[str, int] = {}
    per = []
    for c in cohorts:
        ev = c.events[c.events["kind"].isin(kinds).to_numpy()].drop_duplicates(["pidx", "token"])
        toks = ev["token"].astype(str).to_numpy()
        for t in pd.unique(toks):
            vocab.setdefault(t, len(vocab))
        per.append((ev["pidx"].to_numpy(), toks, c.n))
    out = []
    for pidx, toks, n in per:
        cols = np.fromiter((vocab[t] for t in toks), dtype=np.int64, count=len(toks))
        out.append(sp.csr_matrix((np.ones(len(cols), np.float32), (pidx, cols)), shape=(n, len(vocab))))
    return out


def min_hamming(a: sp.csr_matrix, b: sp.csr_matrix, chunk: int = 1024) -> np.ndarray:
    """For each row of a, the Hamming distance to its nearest row of b: |x| + |y| - 2 x.y (dense blocks)."""
    if b.shape[0] == 0:
        return np.full(a.shape[0], np.inf)
    na = np.asarray(a.sum(1)).ravel()
    nb = np.asarray(b.sum(1)).ravel()
    bt = b.T.tocsc()
    out = np.empty(a.shape[0])
    for s in range(0, a.shape[0], chunk):
        dot = (a[s:s + chunk] @ bt).toarray()
        d = na[s:s + chunk, None] + nb[None, :] - 2 * dot
        out[s:s + chunk] = d.min(1)
    return out


def _sample(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, k, replace=False)) if n > k else np.arange(n)


def distance_attack(members: sp.csr_matrix, nonmembers: sp.csr_matrix, synthetic: sp.csr_matrix) -> dict:
    """Score = minus the Hamming distance to the closest synthetic code set (members should be closer)."""
    return attack_metrics(-min_hamming(members, synthetic), -min_hamming(nonmembers, synthetic))


def dcr_overfitting(synthetic: sp.csr_matrix, train: sp.csr_matrix, holdout: sp.csr_matrix,
                    rng: np.random.Generator) -> dict:
    """SDMetrics DCROverfittingProtection on code sets: share of synthetic patients closer to a training patient
    than to any holdout patient (training subsampled to the holdout's size; ties count half; 0.5 is ideal).
    score = min(1, 2 * (1 - share)) as SDMetrics reports it (1 best)."""
    k = min(train.shape[0], holdout.shape[0])
    if k == 0 or synthetic.shape[0] == 0:
        return {"share_closer_to_training": None, "reason": "empty training, holdout or synthetic set"}
    tr = train[_sample(train.shape[0], k, rng)]
    ho = holdout[_sample(holdout.shape[0], k, rng)]
    d_tr = min_hamming(synthetic, tr)
    d_ho = min_hamming(synthetic, ho)
    share = float(((d_tr < d_ho) + 0.5 * (d_tr == d_ho)).mean())
    return {"share_closer_to_training": share, "score": min(1.0, 2 * (1 - share)),
            "ties": float((d_tr == d_ho).mean()), "median_dcr_training": float(np.median(d_tr)),
            "median_dcr_holdout": float(np.median(d_ho)), "n_per_set": int(k), "distance": "Hamming on code sets"}


# ---------------------------------------------------------------- exact copies
def trajectory_signatures(cohort: Cohort) -> pd.Series:
    """Per-patient order-insensitive hash of (token, value, day offset from first event): equal iff the whole
    trajectory is equal (up to a shift in calendar time), barring 64-bit collisions."""
    ev = cohort.events
    if ev.empty:
        return pd.Series(dtype="uint64")
    offset = ev["iday"] - ev.groupby("pidx")["iday"].transform("min")
    rows = pd.DataFrame({"t": ev["token"].astype(str), "v": ev["value"].round(3), "o": offset})
    h = pd.util.hash_pandas_object(rows, index=False).to_numpy()
    sig = pd.Series(h, index=ev["pidx"].to_numpy()).groupby(level=0).sum()  # wraps mod 2^64: a multiset hash
    return sig.reindex(cohort.patients.index)


def codeset_signatures(cohort: Cohort) -> pd.Series:
    ev = cohort.events.drop_duplicates(["pidx", "token"])
    h = pd.util.hash_pandas_object(ev["token"].astype(str), index=False).to_numpy()
    return pd.Series(h, index=ev["pidx"].to_numpy()).groupby(level=0).sum().reindex(cohort.patients.index)


def copy_rates(train: Cohort, synthetic: Cohort, holdout: Cohort | None) -> dict:
    tr_t, tr_c = set(trajectory_signatures(train).dropna()), set(codeset_signatures(train).dropna())
    out = {"synthetic_trajectory_copy_rate": float(trajectory_signatures(synthetic).isin(tr_t).mean()),
           "synthetic_codeset_copy_rate": float(codeset_signatures(synthetic).isin(tr_c).mean())}
    if holdout is not None:
        out["holdout_trajectory_copy_rate"] = float(trajectory_signatures(holdout).isin(tr_t).mean())
        out["holdout_codeset_copy_rate"] = float(codeset_signatures(holdout).isin(tr_c).mean())
    return out


# ---------------------------------------------------------------- attribute inference
def quasi_identifiers(cohort: Cohort) -> pd.DataFrame:
    """Age band (10 years, at last event), sex, visit-count band (powers of two)."""
    age = (cohort.last_day - cohort.patients["birth_day"]) / 365.25
    n_vis = cohort.visits.groupby("pidx").size().reindex(cohort.patients.index).fillna(0)
    return pd.DataFrame({"age_band": np.floor(age.fillna(-10) / 10),
                         "female": (cohort.patients["sex"] == "female").astype(float),
                         "visit_band": np.floor(np.log2(n_vis + 1))}, index=cohort.patients.index)


def has_token(cohort: Cohort, token: str) -> np.ndarray:
    ev = cohort.events
    pids = np.unique(ev.loc[(ev["token"] == token).to_numpy(), "pidx"].to_numpy())
    return np.isin(cohort.patients.index.to_numpy(), pids).astype(int)


def choose_sensitive(real: Cohort, min_cases: int = 10) -> str | None:
    ev = real.events[real.events["kind"] == "condition"]
    prev = ev.drop_duplicates(["pidx", "token"])["token"].astype(str).value_counts()
    codes = prev.index.str.rsplit("|", n=1).str[-1]
    for code in SENSITIVE:
        hit = prev[codes == code]
        if len(hit) and hit.iloc[0] >= min_cases and hit.iloc[0] <= real.n - min_cases:
            return str(hit.index[0])
    # fallback: the condition whose prevalence is closest to 15%
    share = prev / max(real.n, 1)
    if share.empty:
        return None
    return str((share - 0.15).abs().idxmin())


def _fit_predict(x_train: pd.DataFrame, y_train: np.ndarray, x_test: pd.DataFrame, seed: int) -> np.ndarray | None:
    from sklearn.ensemble import HistGradientBoostingClassifier

    if y_train.sum() == 0 or y_train.sum() == len(y_train):
        return None
    clf = HistGradientBoostingClassifier(max_iter=100, max_leaf_nodes=8, learning_rate=0.05, random_state=seed)
    clf.fit(x_train.to_numpy(float), y_train)
    return clf.predict_proba(x_test.to_numpy(float))[:, 1]


def attribute_inference(train: Cohort, synthetic: Cohort, holdout: Cohort | None, seed: int = 0) -> dict:
    """Predict a sensitive condition of training patients from quasi-identifiers with a model fitted on the
    synthetic data, vs the same model fitted on other real patients (holdout, or half of the real cohort):
    the excess is what the synthetic data reveals beyond population statistics."""
    from sklearn.metrics import roc_auc_score

    token = choose_sensitive(train)
    if token is None:
        return {"computable": False, "reason": "no condition in the real cohort"}
    targets = train
    if holdout is not None:
        base_src, base_name = holdout, "holdout"
    else:
        rng = np.random.default_rng(seed)
        perm = rng.permutation(train.n)
        targets, base_src = train.subset(perm[: train.n // 2]), train.subset(perm[train.n // 2:])
        base_name = "other half of the real cohort"
    y = has_token(targets, token)
    if y.sum() == 0 or y.sum() == len(y):
        return {"computable": False, "reason": f"{token} is present in all or none of the target patients"}
    qx = quasi_identifiers(targets)
    out = {"sensitive": token, "label": train.displays.get(token, token), "baseline_source": base_name,
           "prevalence_targets": float(y.mean())}
    for name, src in (("synthetic", synthetic), ("baseline", base_src)):
        p = _fit_predict(quasi_identifiers(src), has_token(src, token), qx, seed)
        out[f"{name}_auc"] = float(roc_auc_score(y, p)) if p is not None else None
        if p is None:
            out[f"{name}_reason"] = f"{name} data has no variation in {token}"
    if out["synthetic_auc"] is not None and out["baseline_auc"] is not None:
        out["excess_auc"] = out["synthetic_auc"] - out["baseline_auc"]
    out["computable"] = out["synthetic_auc"] is not None
    return out


# ---------------------------------------------------------------- formal guarantee and likelihood attack
def formal_guarantee(model_dir: Path | None) -> dict:
    if model_dir is None:
        return {"available": False, "reason": "no --model given"}
    try:
        from fhirsynth.model.checkpoint import read_privacy_report  # lazy: helper MODEL's module
        report = read_privacy_report(model_dir)
    except ImportError:
        path = Path(model_dir) / "privacy.json"
        if not path.is_file():
            return {"available": False, "reason": f"{path} not found"}
        report = json.loads(path.read_text())
    return {"available": True, **report}


def likelihood_attack(model_dir: Path | None, train_dir: Path, holdout_dir: Path | None,
                      members: np.ndarray, nonmembers: np.ndarray) -> dict:
    """Score = minus the model's per-patient mean NLL (training patients should be more likely)."""
    if model_dir is None or holdout_dir is None:
        return {"computable": False, "reason": "needs --model and --holdout"}
    try:
        from fhirsynth.model.scoring import sequence_nll  # lazy: helper MODEL's module
    except ImportError as exc:
        return {"computable": False, "reason": f"fhirsynth.model.scoring.sequence_nll unavailable ({exc})"}
    from fhirsynth.timeline.io import read_timelines

    # cohort pidx follows patients.parquet order, as read_timelines does
    want_m, want_n = set(members.tolist()), set(nonmembers.tolist())
    mem = [t for i, t in enumerate(read_timelines(train_dir)) if i in want_m]
    non = [t for i, t in enumerate(read_timelines(holdout_dir)) if i in want_n]
    nll_m = np.asarray(sequence_nll(model_dir, mem), float)
    nll_n = np.asarray(sequence_nll(model_dir, non), float)
    return {"computable": True, **attack_metrics(-nll_m, -nll_n),
            "mean_nll_members": float(np.nanmean(nll_m)), "mean_nll_nonmembers": float(np.nanmean(nll_n))}


# ---------------------------------------------------------------- orchestration
def privacy_report(train: Cohort, synthetic: Cohort, holdout: Cohort | None, *, train_dir: Path,
                   holdout_dir: Path | None, model_dir: Path | None, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out: dict = {"formal": formal_guarantee(model_dir)}
    if holdout is not None:
        k = min(train.n, holdout.n, MAX_ROWS)
        mem_idx, non_idx = _sample(train.n, k, rng), _sample(holdout.n, k, rng)
        tr_m, ho_m, sy_m = code_sets([train, holdout, synthetic])
        syn_idx = _sample(synthetic.n, MAX_ROWS, rng)
        out["mia_distance"] = distance_attack(tr_m[mem_idx], ho_m[non_idx], sy_m[syn_idx])
        out["dcr"] = dcr_overfitting(sy_m[syn_idx], tr_m, ho_m, rng)
        try:
            out["mia_likelihood"] = likelihood_attack(model_dir, train_dir, holdout_dir, mem_idx, non_idx)
        except Exception as exc:  # noqa: BLE001 - another helper's scorer failing must not sink the report
            log.warning("likelihood attack failed: %s", exc)
            out["mia_likelihood"] = {"computable": False, "reason": f"{type(exc).__name__}: {exc}"}
    else:
        reason = "needs --holdout (non-members)"
        out["mia_distance"] = {"computable": False, "reason": reason}
        out["dcr"] = {"share_closer_to_training": None, "reason": reason}
        out["mia_likelihood"] = {"computable": False, "reason": reason}
    out["copies"] = copy_rates(train, synthetic, holdout)
    out["attribute_inference"] = attribute_inference(train, synthetic, holdout, seed)
    return out
