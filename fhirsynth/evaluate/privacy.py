"""Privacy: the formal guarantee, membership inference (model likelihood, code-set and record distance), distance to
closest record, exact / code-set / near copies, attribute inference. Members = the real (training) cohort;
non-members = holdout.

Every empirical figure comes with the value a generator that never saw the training records would get (a
real-vs-real reference) and, where it is a sample statistic, a 95% interval:

- DCR share: synthetic records closer to the FULL training set than to the holdout, against the share expected
  when the synthetic data does not depend on which real records were trained on (a permutation null over the
  train/holdout labels; it accounts for the size ratio and for ties), with a bootstrap interval.
- Near copies: a synthetic patient within the real-vs-real threshold (a low percentile of holdout-to-training
  nearest-record distances) of some training patient; the holdout's own rate at that threshold is the baseline.
- Attribute inference: Anonymeter-style nearest-neighbour inference of several conditions from everything else in
  the record, on member (training) vs non-member (holdout) targets.

The record distance (see `record_distance`) mixes the code set, the (code, day-offset bucket) set and a value /
demographic summary, so it is blind neither to values nor to timing, yet a copy with jittered or rounded values or
an event moved by a day stays a near neighbour of its source.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from fhirsynth.evaluate.cohort import Cohort
from fhirsynth.timeline.types import CLINICAL_KINDS

log = logging.getLogger(__name__)

# Sensitive conditions for attribute inference (SNOMED CT); first present with enough cases wins.
SENSITIVE = ("370143000", "35489007", "36923009", "86406008", "7200002", "5602001", "55680006", "66590003",
             "6525002", "191736004", "197480006", "706893006")
MAX_ROWS = 2000          # synthetic / holdout records scored (sampled beyond)
MAX_TRAIN = 10000        # training records searched for nearest neighbours (sampled beyond, and reported)
MAX_TARGETS = 1000       # attribute-inference / record-MIA targets per group
BUCKET_DAYS = 30         # time resolution of the (code, day offset) set
N_VALUE_TOKENS = 32      # numeric codes whose per-patient mean enters the value summary
WEIGHTS = (0.25, 0.5, 0.25)  # code-set Jaccard, (code, day bucket) Jaccard, value/demographic gap
VALUE_CLIP = 3.0         # a standardised gap counts at most this much (then scaled to [0, 1])
NEAR_COPY_QUANTILE = 0.02  # near-copy threshold: this quantile of holdout-to-training nearest distances
N_SECRETS = 8            # conditions attacked by attribute inference
N_NULL = 200             # permutations for the DCR null
N_BOOT = 1000            # bootstrap draws for intervals


def _f(x) -> float | None:
    """A JSON-safe float (None for NaN / inf / missing)."""
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None


def _interval(draws: np.ndarray) -> list[float | None]:
    draws = np.asarray(draws, float)
    draws = draws[np.isfinite(draws)]
    if len(draws) == 0:
        return [None, None]
    lo, hi = np.quantile(draws, [0.025, 0.975])
    return [float(lo), float(hi)]


def wilson_interval(k: int, n: int, z: float = 1.96) -> list[float | None]:
    """95% Wilson score interval of a binomial proportion k/n."""
    if n <= 0:
        return [None, None]
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def _boot_mean(x: np.ndarray, rng: np.random.Generator, n_boot: int = N_BOOT) -> np.ndarray:
    x = np.asarray(x, float)
    if len(x) == 0:
        return np.zeros(0)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    return x[idx].mean(1)


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
    # 95% interval of the AUC: members and non-members resampled separately (the no-attack reference is 0.5)
    rng = np.random.default_rng(0)
    draws = [roc_auc_score(y, np.r_[rng.choice(m, len(m)), rng.choice(n, len(n))]) for _ in range(200)]
    return {"auc": float(roc_auc_score(y, s)), "auc_ci95": [float(np.quantile(draws, 0.025)),
                                                            float(np.quantile(draws, 0.975))],
            "tpr_at_1pct_fpr": float(np.interp(0.01, fpr, tpr)),
            "n_members": len(m), "n_nonmembers": len(n), "n_unscored": dropped}


# ---------------------------------------------------------------- code sets and distances
# every clinical code kind: a record is as identifiable by its drugs, vaccines and procedures as by its diagnoses
CODE_SET_KINDS = CLINICAL_KINDS


def code_sets(cohorts: list[Cohort], kinds: tuple[str, ...] = CODE_SET_KINDS) -> list[sp.csr_matrix]:
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


def hamming_matrix(a: sp.csr_matrix, b: sp.csr_matrix) -> np.ndarray:
    """Dense Hamming distances between the rows of two binary matrices."""
    na = np.asarray(a.sum(1)).ravel()
    nb = np.asarray(b.sum(1)).ravel()
    return na[:, None] + nb[None, :] - 2 * (a @ b.T).toarray()


def _sample(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, k, replace=False)) if n > k else np.arange(n)


def distance_attack(members: sp.csr_matrix, nonmembers: sp.csr_matrix, synthetic: sp.csr_matrix) -> dict:
    """Score = minus the Hamming distance to the closest synthetic code set (members should be closer)."""
    return attack_metrics(-min_hamming(members, synthetic), -min_hamming(nonmembers, synthetic))


# ---------------------------------------------------------------- record features and the record distance
@dataclass
class RecordFeatures:
    """Per-patient representation for the record distance. codes: binary patient x token (every kind);
    times: binary patient x (token, day-offset bucket) with the offset from the patient's first event;
    values: standardised numeric summary (age at first event, sex, deceased, log event / visit counts, log span,
    per-patient mean of the commonest numeric codes; 0 = reference median when missing).
    vocab: token of each codes column; time_token: codes column of each times column."""

    codes: sp.csr_matrix
    times: sp.csr_matrix
    values: np.ndarray
    vocab: np.ndarray
    time_token: np.ndarray

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    def rows(self, idx: np.ndarray) -> RecordFeatures:
        idx = np.asarray(idx)
        return RecordFeatures(self.codes[idx], self.times[idx], self.values[idx], self.vocab, self.time_token)


def _binary_csr(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def _robust_scale(ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column centre (median) and scale (IQR / 1.349, else sd, else 1) of a reference matrix with NaNs."""
    k = ref.shape[1]
    centre, scale = np.zeros(k), np.ones(k)
    for j in range(k):
        col = ref[:, j][np.isfinite(ref[:, j])]
        if len(col) == 0:
            continue
        centre[j] = np.median(col)
        q1, q3 = np.quantile(col, [0.25, 0.75])
        s = (q3 - q1) / 1.349
        if not s > 0:
            s = col.std()
        scale[j] = s if s > 0 else 1.0
    return centre, scale


def record_features(cohorts: list[Cohort], *, reference: int = 0, bucket_days: int = BUCKET_DAYS,
                    n_values: int = N_VALUE_TOKENS) -> list[RecordFeatures]:
    """RecordFeatures of each cohort over one shared vocabulary; the value summary is standardised on the
    `reference` cohort (the training set)."""
    toks_per = [c.events["token"].astype(str).to_numpy() for c in cohorts]
    vocab = pd.Index(pd.unique(np.concatenate(toks_per))) if toks_per else pd.Index([])
    keys_per = []
    for c, toks in zip(cohorts, toks_per):
        ev = c.events
        tid = vocab.get_indexer(toks).astype(np.int64)
        iday = ev["iday"].to_numpy().astype(np.int64)
        first = ev.groupby("pidx")["iday"].transform("min").to_numpy().astype(np.int64)
        bucket = np.clip((iday - first) // max(int(bucket_days), 1), 0, (1 << 20) - 1)
        keys_per.append((ev["pidx"].to_numpy().astype(np.int64), tid, (tid << 20) | bucket))
    pairs = pd.Index(pd.unique(np.concatenate([k[2] for k in keys_per]))) if keys_per else pd.Index([])
    time_token = (pairs.to_numpy().astype(np.int64) >> 20) if len(pairs) else np.zeros(0, np.int64)

    # numeric codes: the most widely measured in the reference cohort
    ref = cohorts[reference].events
    num = ref[np.isfinite(ref["value"].to_numpy(float))]
    top = num.drop_duplicates(["pidx", "token"])["token"].astype(str).value_counts().index[:n_values].tolist()
    raw = []
    for c in cohorts:
        ev, pats = c.events, c.patients
        idx = pats.index
        age = ((c.first_day - pats["birth_day"]) / 365.25).reindex(idx)
        n_ev = ev.groupby("pidx").size().reindex(idx).fillna(0)
        n_vis = ev.groupby("pidx")["visit"].nunique().reindex(idx).fillna(0)
        span = (c.last_day - c.first_day).reindex(idx).fillna(0)
        cols = {"age_first": age.to_numpy(float), "log_events": np.log1p(n_ev.to_numpy(float)),
                "log_visits": np.log1p(n_vis.to_numpy(float)), "log_span": np.log1p(span.to_numpy(float).clip(0))}
        val = ev[np.isfinite(ev["value"].to_numpy(float))]
        val = val[val["token"].astype(str).isin(top).to_numpy()]
        means = (val.assign(t=val["token"].astype(str)).groupby(["pidx", "t"])["value"].mean()
                 .unstack().reindex(index=idx, columns=top))
        mat = np.column_stack([np.column_stack(list(cols.values())), means.to_numpy(float)]) if top else \
            np.column_stack(list(cols.values()))
        binary = np.column_stack([(pats["sex"] == "female").to_numpy(float),
                                  pats["deceased"].fillna(False).to_numpy().astype(float)])
        raw.append((mat, binary))
    centre, scale = _robust_scale(raw[reference][0])
    out = []
    for c, (pidx, tid, key), (mat, binary) in zip(cohorts, keys_per, raw):
        z = np.nan_to_num((mat - centre) / scale, nan=0.0, posinf=0.0, neginf=0.0)
        values = np.column_stack([z, binary]).astype(np.float32)
        codes = _binary_csr(pidx, tid, (c.n, len(vocab)))
        times = _binary_csr(pidx, pairs.get_indexer(key), (c.n, len(pairs)))
        out.append(RecordFeatures(codes, times, values, np.asarray(vocab, dtype=object), time_token))
    return out


def _row_sums(m: sp.csr_matrix) -> np.ndarray:
    return np.asarray(m.sum(1), dtype=np.float64).ravel()


def _value_gap(xa: np.ndarray, xb: np.ndarray) -> np.ndarray:
    """Mean over columns of min(|a - b|, VALUE_CLIP) / VALUE_CLIP: 0 identical, 1 far apart on everything."""
    k = xa.shape[1]
    out = np.zeros((xa.shape[0], xb.shape[0]), np.float32)
    if k == 0:
        return out
    for j in range(k):
        out += np.minimum(np.abs(xa[:, j, None] - xb[None, :, j]), VALUE_CLIP)
    return out / (VALUE_CLIP * k)


@dataclass
class _Parts:
    """Pieces of the record distance between two sets of records (dense rows-of-a x rows-of-b)."""

    ic: np.ndarray   # shared codes
    it: np.ndarray   # shared (code, bucket) pairs
    na_c: np.ndarray
    nb_c: np.ndarray
    na_t: np.ndarray
    nb_t: np.ndarray
    gap: np.ndarray  # value / demographic gap in [0, 1]


def _jaccard_distance(inter: np.ndarray, na: np.ndarray, nb: np.ndarray) -> np.ndarray:
    union = na[:, None] + nb[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 1.0 - inter / union
    return np.where(union > 0, d, 0.0)


def _parts(a: RecordFeatures, b: RecordFeatures) -> _Parts:
    return _Parts((a.codes @ b.codes.T).toarray().astype(np.float64),
                  (a.times @ b.times.T).toarray().astype(np.float64),
                  _row_sums(a.codes), _row_sums(b.codes), _row_sums(a.times), _row_sums(b.times),
                  _value_gap(a.values, b.values))


def _combine(p: _Parts) -> np.ndarray:
    wc, wt, wv = WEIGHTS
    return (wc * _jaccard_distance(p.ic, p.na_c, p.nb_c) + wt * _jaccard_distance(p.it, p.na_t, p.nb_t)
            + wv * p.gap.astype(np.float64))


def _without_token(p: _Parts, a: RecordFeatures, b: RecordFeatures, col: int) -> _Parts:
    """The parts as if token `col` (and its time pairs) were absent from every record: the attacker's view."""
    ca = a.codes[:, col].toarray().ravel().astype(np.float64)
    cb = b.codes[:, col].toarray().ravel().astype(np.float64)
    tcols = np.flatnonzero(a.time_token == col)
    if len(tcols):
        ta, tb = a.times[:, tcols], b.times[:, tcols]
        it_s = (ta @ tb.T).toarray()
        sa, sb = _row_sums(ta), _row_sums(tb)
    else:
        it_s, sa, sb = 0.0, 0.0, 0.0
    return _Parts(p.ic - np.outer(ca, cb), p.it - it_s, p.na_c - ca, p.nb_c - cb, p.na_t - sa, p.nb_t - sb, p.gap)


def record_distance(a: RecordFeatures, b: RecordFeatures) -> np.ndarray:
    """Dense distances in [0, 1] between the records of a and b:
    0.25 x Jaccard distance of the code sets + 0.5 x Jaccard distance of the (code, 30-day offset bucket) sets
    + 0.25 x mean clipped standardised gap of the value / demographic summary."""
    return _combine(_parts(a, b))


def _chunk_rows(n_b: int, k: int) -> int:
    return int(max(16, min(4096, 2_000_000 // max(1, n_b * max(1, k // 4)))))


def _dist_fn(a, b):
    """A function rows -> dense distances from those rows of a to every row of b (record or Hamming)."""
    if isinstance(a, RecordFeatures):
        return lambda s: record_distance(a.rows(s), b)
    bt = b.T.tocsc()
    na, nb = _row_sums(a), _row_sums(b)
    return lambda s: na[s, None] + nb[None, :] - 2 * (a[s] @ bt).toarray()


def _n(x) -> int:
    return x.n if isinstance(x, RecordFeatures) else x.shape[0]


def nearest_record(a, b, *, exclude_self: bool = False,
                   exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each record of a, the distance to and index of its nearest record of b (RecordFeatures: record
    distance; sparse binary matrices: Hamming). Leave one out: exclude_self (a and b are the same set) or
    exclude (for each row of a, the row of b that is the same record)."""
    n_a, n_b = _n(a), _n(b)
    if exclude_self:
        exclude = np.arange(n_a)
    if n_b == 0 or (exclude is not None and n_b < 2):
        return np.full(n_a, np.inf), np.full(n_a, -1)
    fn = _dist_fn(a, b)
    k = a.values.shape[1] if isinstance(a, RecordFeatures) else 1
    step = _chunk_rows(n_b, k)
    dmin, arg = np.empty(n_a), np.empty(n_a, np.int64)
    for s in range(0, n_a, step):
        rows = np.arange(s, min(n_a, s + step))
        d = fn(rows)
        if exclude is not None:
            d[np.arange(len(rows)), exclude[rows]] = np.inf
        arg[rows] = d.argmin(1)
        dmin[rows] = d[np.arange(len(rows)), arg[rows]]
    return dmin, arg


# ---------------------------------------------------------------- distance to closest record
@dataclass
class _Scan:
    d_tr: np.ndarray     # synthetic -> nearest training record
    nn_tr: np.ndarray
    d_ho: np.ndarray     # synthetic -> nearest holdout record
    top_d: np.ndarray    # synthetic -> the `top` nearest records of train + holdout (sorted)
    top_i: np.ndarray    # their pool index (< n_train: training)
    n_tr: int
    n_ho: int


def _scan(synthetic, train, holdout, top: int = 128) -> _Scan:
    n_s, n_t, n_h = _n(synthetic), _n(train), _n(holdout)
    f_t, f_h = _dist_fn(synthetic, train), _dist_fn(synthetic, holdout)
    m = min(top, n_t + n_h)
    k = synthetic.values.shape[1] if isinstance(synthetic, RecordFeatures) else 1
    step = _chunk_rows(n_t + n_h, k)
    d_tr, d_ho = np.empty(n_s), np.empty(n_s)
    nn_tr = np.empty(n_s, np.int64)
    top_d, top_i = np.empty((n_s, m)), np.empty((n_s, m), np.int64)
    for s in range(0, n_s, step):
        rows = np.arange(s, min(n_s, s + step))
        d = np.concatenate([f_t(rows), f_h(rows)], axis=1)
        r = np.arange(len(rows))
        nn_tr[rows] = d[:, :n_t].argmin(1)
        d_tr[rows] = d[r, nn_tr[rows]]
        d_ho[rows] = d[:, n_t:].min(1)
        part = np.argpartition(d, m - 1, axis=1)[:, :m] if m < d.shape[1] else np.tile(np.arange(d.shape[1]),
                                                                                          (len(rows), 1))
        pd_ = np.take_along_axis(d, part, 1)
        order = np.argsort(pd_, axis=1, kind="stable")
        top_d[rows] = np.take_along_axis(pd_, order, 1)
        top_i[rows] = np.take_along_axis(part, order, 1)
    return _Scan(d_tr, nn_tr, d_ho, top_d, top_i, n_t, n_h)


def _closer_share(d_tr: np.ndarray, d_ho: np.ndarray) -> np.ndarray:
    """Per synthetic record: 1 closer to training, 0 closer to holdout, 0.5 a tie."""
    return (d_tr < d_ho) + 0.5 * (d_tr == d_ho)


def _null_shares(scan: _Scan, rng: np.random.Generator, n_null: int) -> np.ndarray:
    """The share under random train/holdout labels of the pooled real records (no memorisation)."""
    n_pool = scan.n_tr + scan.n_ho
    r = np.arange(len(scan.d_tr))
    out = np.empty(n_null)
    for b in range(n_null):
        is_tr = rng.permutation(n_pool) < scan.n_tr
        lab = is_tr[scan.top_i]
        first_t, first_h = lab.argmax(1), (~lab).argmax(1)
        dt = np.where(lab.any(1), scan.top_d[r, first_t], np.inf)
        dh = np.where((~lab).any(1), scan.top_d[r, first_h], np.inf)
        out[b] = _closer_share(dt, dh).mean()
    return out


def _dcr_from_scan(scan: _Scan, rng: np.random.Generator, distance: str, n_null: int = N_NULL,
                   n_boot: int = N_BOOT) -> dict:
    per = _closer_share(scan.d_tr, scan.d_ho)
    share = float(per.mean())
    null = _null_shares(scan, rng, n_null)
    expected = float(null.mean())
    score = min(1.0, max(0.0, (1 - share) / (1 - expected))) if expected < 1 else None
    return {"share_closer_to_training": share,
            "share_ci95": _interval(_boot_mean(per, rng, n_boot)),
            "expected_share": expected,
            "expected_share_null95": _interval(null),
            "expected_share_size_ratio": scan.n_tr / (scan.n_tr + scan.n_ho),
            "excess_share": share - expected,
            "p_value": float((1 + (null >= share).sum()) / (1 + len(null))),
            "score": _f(score),
            "ties": float((scan.d_tr == scan.d_ho).mean()),
            "median_dcr_training": float(np.median(scan.d_tr)),
            "median_dcr_holdout": float(np.median(scan.d_ho)),
            "n_synthetic": len(per), "n_training": int(scan.n_tr), "n_holdout": int(scan.n_ho),
            "distance": distance,
            "definition": "share of synthetic records closer to the full training set than to the holdout (ties "
                          "half), against its mean under random train/holdout labels of the pooled real records "
                          "(expected_share; 95% range expected_share_null95); share_ci95: bootstrap over synthetic "
                          "records; score = min(1, (1 - share) / (1 - expected_share)), 1 best"}


RECORD_DISTANCE = ("record distance: 0.25 code-set Jaccard + 0.5 (code, 30-day offset bucket) Jaccard + "
                   "0.25 value/demographic gap")


def dcr_overfitting(synthetic, train, holdout, rng: np.random.Generator, *, n_null: int = N_NULL,
                    n_boot: int = N_BOOT) -> dict:
    """SDMetrics DCROverfittingProtection, calibrated: share of synthetic records closer to a record of the FULL
    training set than to any holdout record (ties count half), compared with the share expected by chance for
    these set sizes (permutation null over the pooled real records' train/holdout labels: no memorisation).
    Inputs are RecordFeatures (record distance) or binary code-set matrices (Hamming distance)."""
    if _n(train) == 0 or _n(holdout) == 0 or _n(synthetic) == 0:
        return {"share_closer_to_training": None, "reason": "empty training, holdout or synthetic set"}
    name = RECORD_DISTANCE if isinstance(synthetic, RecordFeatures) else "Hamming on code sets"
    return _dcr_from_scan(_scan(synthetic, train, holdout), rng, name, n_null, n_boot)


# ---------------------------------------------------------------- copies: exact, code-set, near
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


def _rate(hit: pd.Series | np.ndarray) -> tuple[float | None, list]:
    hit = np.asarray(hit, bool)
    if len(hit) == 0:
        return None, [None, None]
    return float(hit.mean()), wilson_interval(int(hit.sum()), len(hit))


def copy_rates(train: Cohort, synthetic: Cohort, holdout: Cohort | None) -> dict:
    """Exact trajectory copies and code-set copies of training patients (share of patients; Wilson 95%
    intervals), for the synthetic set and, as the baseline, the holdout."""
    tr_t, tr_c = set(trajectory_signatures(train).dropna()), set(codeset_signatures(train).dropna())
    out: dict = {}
    sets = [("synthetic", synthetic)] + ([("holdout", holdout)] if holdout is not None else [])
    for name, c in sets:
        for kind, sig, ref in (("trajectory", trajectory_signatures, tr_t), ("codeset", codeset_signatures, tr_c)):
            rate, ci = _rate(sig(c).isin(ref))
            out[f"{name}_{kind}_copy_rate"] = rate
            out[f"{name}_{kind}_copy_rate_ci95"] = ci
    return out


def near_copy_rates(d_synthetic: np.ndarray, d_reference: np.ndarray, *, quantile: float = NEAR_COPY_QUANTILE,
                    nearest_training: np.ndarray | None = None, reference: str = "holdout",
                    d_baseline: np.ndarray | None = None) -> dict:
    """Near copies: records whose nearest training record is within the real-vs-real threshold, the `quantile`
    of the reference records' nearest-training distances (real records vs the training set: holdout, and
    training records leave-one-out). d_*: each record's distance to its nearest training record. The baseline
    is the rate of the d_baseline records (the holdout; default: the reference) at that threshold."""
    d_s, d_r = np.asarray(d_synthetic, float), np.asarray(d_reference, float)
    d_r = d_r[np.isfinite(d_r)]
    d_b = d_r if d_baseline is None else np.asarray(d_baseline, float)
    d_b = d_b[np.isfinite(d_b)]
    if len(d_s) == 0 or len(d_r) == 0 or len(d_b) == 0:
        return {"synthetic_near_copy_rate": None, "near_copy_reason": f"no synthetic or no {reference} records"}
    thr = float(np.quantile(d_r, quantile))
    hit = d_s <= thr
    rate, ci = _rate(hit)
    base, base_ci = _rate(d_b <= thr)
    out = {"synthetic_near_copy_rate": rate, "synthetic_near_copy_rate_ci95": ci,
           "baseline_near_copy_rate": base, "baseline_near_copy_rate_ci95": base_ci,
           "near_copy_baseline": reference, "near_copy_threshold": thr, "near_copy_quantile": quantile,
           "n_reference_distances": len(d_r),
           "synthetic_median_distance_to_training": float(np.median(d_s)),
           "baseline_median_distance_to_training": float(np.median(d_b))}
    if reference == "holdout":
        out["holdout_near_copy_rate"], out["holdout_near_copy_rate_ci95"] = base, base_ci
    if nearest_training is not None:
        out["n_training_patients_near_copied"] = len(np.unique(np.asarray(nearest_training)[hit]))
    return out


# ---------------------------------------------------------------- attribute inference
def quasi_identifiers(cohort: Cohort) -> pd.DataFrame:
    """Age band (10 years, at last event), sex, visit-count band (powers of two). (The former attack's
    quasi-identifiers; kept for callers. The attack now uses the whole record: see attribute_inference.)"""
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


def choose_secrets(real: Cohort, k: int = N_SECRETS, min_cases: int = 10) -> list[str]:
    """Conditions to infer: the sensitive one (SENSITIVE list) first, then those whose prevalence is nearest 50%;
    each with at least min_cases patients with and without it."""
    ev = real.events[(real.events["kind"] == "condition").to_numpy()]
    cnt = ev.drop_duplicates(["pidx", "token"])["token"].astype(str).value_counts()
    ok = cnt[(cnt >= min_cases) & (cnt <= real.n - min_cases)]
    if ok.empty:
        return []
    balance = np.minimum(ok, real.n - ok).sort_values(ascending=False, kind="stable")
    out = []
    first = choose_sensitive(real, min_cases)
    if first in ok.index:
        out.append(first)
    out += [t for t in balance.index if t not in out]
    return [str(t) for t in out[:k]]


def _nn_guess(d: np.ndarray, y_syn: np.ndarray) -> np.ndarray:
    """Probability of 'has it' guessed from the nearest synthetic record(s) (ties share the vote)."""
    tied = d <= d.min(1, keepdims=True) + 1e-12
    return (tied * y_syn[None, :]).sum(1) / tied.sum(1)


def attribute_inference(train: Cohort, synthetic: Cohort, holdout: Cohort | None, seed: int = 0, *,
                        features: list[RecordFeatures] | None = None, max_targets: int = MAX_TARGETS,
                        n_secrets: int = N_SECRETS, n_boot: int = N_BOOT) -> dict:
    """Anonymeter-style inference attack. For each target and each secret condition, the attacker knows the rest of
    the target's record (codes, timing, values, demographics without the secret code), takes the nearest synthetic
    record on that and guesses the secret from it. Success on member targets (training patients) vs non-member
    targets (holdout, not seen by the generator, the baseline): the difference is what the synthetic data reveals
    about its training records beyond population statistics. features: record_features([train, holdout,
    synthetic]) if already computed."""
    return _attribute_inference(train, synthetic, holdout, seed, features=features, max_targets=max_targets,
                                n_secrets=n_secrets, n_boot=n_boot)[0]


def _attribute_inference(train: Cohort, synthetic: Cohort, holdout: Cohort | None, seed: int = 0, *,
                         features: list[RecordFeatures] | None = None, max_targets: int = MAX_TARGETS,
                         n_secrets: int = N_SECRETS, n_boot: int = N_BOOT) -> tuple[dict, np.ndarray | None,
                                                                                    np.ndarray | None]:
    """attribute_inference, plus each member / non-member target's distance to its nearest synthetic record."""
    if holdout is None:
        return {"computable": False, "reason": "needs --holdout (non-member targets)"}, None, None
    if synthetic.n == 0 or holdout.n == 0 or train.n == 0:
        return {"computable": False, "reason": "empty training, holdout or synthetic set"}, None, None
    rng = np.random.default_rng(seed)
    f_tr, f_ho, f_sy = features if features is not None else record_features([train, holdout, synthetic])
    mem = _sample(f_tr.n, max_targets, rng)
    non = _sample(f_ho.n, max_targets, rng)
    syn = _sample(f_sy.n, MAX_ROWS, rng)
    a_m, a_n, b = f_tr.rows(mem), f_ho.rows(non), f_sy.rows(syn)
    p_m, p_n = _parts(a_m, b), _parts(a_n, b)
    d_mem, d_non = _combine(p_m).min(1), _combine(p_n).min(1)
    secrets = choose_secrets(train, n_secrets)
    if not secrets:
        return ({"computable": False,
                 "reason": "no condition with at least 10 training patients with and without it"}, d_mem, d_non)
    col_of = {t: i for i, t in enumerate(f_tr.vocab)}
    succ_m, succ_n, per_secret = [], [], []
    for token in secrets:
        col = col_of[token]
        y_syn = b.codes[:, col].toarray().ravel()
        row = {"token": token, "label": train.displays.get(token, token)}
        for name, a, p, acc in (("member", a_m, p_m, succ_m), ("nonmember", a_n, p_n, succ_n)):
            y = a.codes[:, col].toarray().ravel()
            g = _nn_guess(_combine(_without_token(p, a, b, col)), y_syn)
            ok = y * g + (1 - y) * (1 - g)
            acc.append(ok)
            row[f"{name}_success"] = float(ok.mean())
            row[f"{name}_prevalence"] = float(y.mean())
        row["synthetic_prevalence"] = float(y_syn.mean())
        per_secret.append(row)
    s_m, s_n = np.mean(succ_m, axis=0), np.mean(succ_n, axis=0)  # per target, averaged over secrets
    m, n = float(s_m.mean()), float(s_n.mean())
    diff = _boot_mean(s_m, rng, n_boot) - _boot_mean(s_n, rng, n_boot)
    # majority-class guess from the synthetic prevalence: what population statistics alone give an attacker
    naive = np.mean([r["member_prevalence"] if r["synthetic_prevalence"] >= 0.5 else 1 - r["member_prevalence"]
                     for r in per_secret])
    out = {"computable": True, "method": "nearest synthetic record on the rest of the record (" + RECORD_DISTANCE
           + "), secret = presence of a condition; success averaged over the secrets",
           "sensitive": secrets[0], "label": train.displays.get(secrets[0], secrets[0]),
           "member_success": m, "nonmember_success": n, "advantage": m - n, "advantage_ci95": _interval(diff),
           "risk": _f((m - n) / (1 - n)) if n < 1 else None, "naive_member_success": float(naive),
           "n_member_targets": len(mem), "n_nonmember_targets": len(non), "n_synthetic": len(syn),
           "baseline_source": "holdout (non-member targets)", "secrets": per_secret}
    return out, d_mem, d_non


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
    # record features: the full training set (sampled only beyond MAX_TRAIN), synthetic / holdout up to MAX_ROWS
    tr_idx = _sample(train.n, MAX_TRAIN, rng)
    syn_idx = _sample(synthetic.n, MAX_ROWS, rng)
    cohorts = [train, synthetic] + ([holdout] if holdout is not None else [])
    feats = record_features(cohorts)
    f_tr, f_sy = feats[0].rows(tr_idx), feats[1].rows(syn_idx)
    sampled = {"n_training_searched": len(tr_idx), "training_sampled": bool(len(tr_idx) < train.n),
               "n_synthetic_scored": len(syn_idx)}
    if holdout is not None:
        ho_idx = _sample(holdout.n, MAX_ROWS, rng)
        f_ho = feats[2].rows(ho_idx)
        k = min(train.n, holdout.n, MAX_ROWS)
        mem_idx, non_idx = _sample(train.n, k, rng), _sample(holdout.n, k, rng)
        tr_m, ho_m, sy_m = code_sets([train, holdout, synthetic])
        out["mia_distance"] = distance_attack(tr_m[mem_idx], ho_m[non_idx], sy_m[syn_idx])
        scan = _scan(f_sy, f_tr, f_ho) if f_sy.n and f_tr.n and f_ho.n else None
        out["dcr"] = (_dcr_from_scan(scan, rng, RECORD_DISTANCE) if scan is not None else
                      {"share_closer_to_training": None, "reason": "empty training, holdout or synthetic set"})
        try:
            out["mia_likelihood"] = likelihood_attack(model_dir, train_dir, holdout_dir, mem_idx, non_idx)
        except Exception as exc:  # noqa: BLE001 - another helper's scorer failing must not sink the report
            log.warning("likelihood attack failed: %s", exc)
            out["mia_likelihood"] = {"computable": False, "reason": f"{type(exc).__name__}: {exc}"}
        d_base, _ = nearest_record(f_ho, f_tr)
        loo = _sample(f_tr.n, MAX_ROWS, rng)
        d_ref = np.r_[d_base, nearest_record(f_tr.rows(loo), f_tr, exclude=loo)[0]]
        ref_name = "holdout"
        if scan is not None:
            d_syn, nn_syn = scan.d_tr, tr_idx[scan.nn_tr]
        else:
            d_syn, nn_syn = nearest_record(f_sy, f_tr)
            nn_syn = tr_idx[nn_syn] if len(tr_idx) else nn_syn
        ai, d_mem, d_non = _attribute_inference(train, synthetic, holdout, seed,
                                                features=[feats[0], feats[2], feats[1]])
        out["mia_record_distance"] = ({"computable": True, **attack_metrics(-d_mem, -d_non),
                                       "distance": RECORD_DISTANCE,
                                       "score": "minus the record distance to the nearest synthetic record"}
                                      if d_mem is not None else {"computable": False, "reason": ai.get("reason")})
    else:
        reason = "needs --holdout (non-members)"
        out["mia_distance"] = {"computable": False, "reason": reason}
        out["mia_record_distance"] = {"computable": False, "reason": reason}
        out["dcr"] = {"share_closer_to_training": None, "reason": reason}
        out["mia_likelihood"] = {"computable": False, "reason": reason}
        # real-vs-real reference without a holdout: training records to their nearest OTHER training record
        loo = _sample(f_tr.n, MAX_ROWS, rng)
        d_ref = d_base = nearest_record(f_tr.rows(loo), f_tr, exclude=loo)[0]
        ref_name = "training leave-one-out"
        d_syn, nn_syn = nearest_record(f_sy, f_tr)
        nn_syn = tr_idx[nn_syn] if len(tr_idx) else nn_syn
        ai = {"computable": False, "reason": "needs --holdout (non-member targets)"}
    out["copies"] = {**copy_rates(train, synthetic, holdout),
                     **near_copy_rates(d_syn, d_ref, nearest_training=nn_syn, reference=ref_name,
                                       d_baseline=d_base),
                     "near_copy_distance": RECORD_DISTANCE, **sampled}
    out["attribute_inference"] = ai
    return out
