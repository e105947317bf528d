"""Utility: train on synthetic, test on real (TSTR) against train and test on real (TRTR).

Each task sets a per-patient index date (the patient's middle visit), builds features only from events before
it, and a label from what happens after it. The same code builds the tasks for every cohort.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fhirsynth.evaluate.cohort import Cohort
from fhirsynth.evaluate.tables import FeatureSpec, flatten

log = logging.getLogger(__name__)

# Chronic conditions preferred as onset targets (SNOMED CT); the one with most positives in real data wins.
CHRONIC_TARGETS = ("59621000", "38341003", "44054006", "15777000", "55822004", "431855005", "433144002",
                   "162864005", "271737000", "40055000", "195967001", "13645005", "69896004", "239873007",
                   "414545008", "53741008", "87433001", "370143000", "35489007")
MIN_CLASS = 10  # fewest positives (and negatives) in the training and test sets for an AUROC to mean anything


@dataclass
class TaskData:
    x: pd.DataFrame
    y: np.ndarray
    groups: np.ndarray  # patient of each row (rows of one patient stay on one side of a split)


INDEX_ROUNDS = 4  # index visits per patient (at 1/5, 2/5, 3/5, 4/5 of the record): more labelled examples


def index_days(cohort: Cohort, round_: int = 1, rounds: int = 1) -> pd.Series:
    """Per-patient index day: the visit at fraction round_/(rounds+1) of the record (round_ 1..rounds);
    patients whose index would be their first visit (no history) have none."""
    vis = cohort.visits
    n = vis.groupby("pidx").size()
    target = ((n * round_) // (rounds + 1)).rename("target")
    v = vis.join(target, on="pidx")
    v = v[(v["vrank"] == v["target"]) & (v["target"] >= 1)]
    return v.set_index("pidx")["iday"].astype(float).sort_index()


def first_onset(cohort: Cohort, token: str) -> pd.Series:
    ev = cohort.events
    return ev.loc[(ev["token"] == token).to_numpy(), ["pidx", "day"]].groupby("pidx")["day"].min()


def _rounds(cohort: Cohort, spec: FeatureSpec, label) -> TaskData:
    xs, ys, gs = [], [], []
    for r in range(1, INDEX_ROUNDS + 1):
        idx = index_days(cohort, r, INDEX_ROUNDS)
        keep, y = label(idx)
        idx = idx[keep]
        if idx.empty:
            continue
        xs.append(flatten(cohort, spec, idx))
        ys.append(np.asarray(y, int))
        gs.append(idx.index.to_numpy())
    if not xs:
        return TaskData(flatten(cohort, spec, pd.Series(dtype=float)), np.zeros(0, int), np.zeros(0, int))
    return TaskData(pd.concat(xs), np.concatenate(ys), np.concatenate(gs))


def onset_task(cohort: Cohort, spec: FeatureSpec, token: str, horizon_days: float) -> TaskData:
    """Label: first onset of `token` within horizon after the index day; patients with prior onset excluded."""
    onset_all = first_onset(cohort, token)

    def label(idx: pd.Series):
        onset = onset_all.reindex(idx.index)
        keep = ~(onset < idx)
        y = (onset[keep] >= idx[keep]) & (onset[keep] < idx[keep] + horizon_days)
        return keep.to_numpy(), y.to_numpy()

    return _rounds(cohort, spec, label)


def mortality_task(cohort: Cohort, spec: FeatureSpec, horizon_days: float | None) -> TaskData:
    """Label: death recorded after the index day (within horizon when given)."""
    death_all = cohort.patients["death_day"]

    def label(idx: pd.Series):
        death = death_all.reindex(idx.index)
        keep = ~(death < idx)
        end = idx + (horizon_days if horizon_days is not None else np.inf)
        y = (death[keep] >= idx[keep]) & (death[keep] < end[keep])
        return keep.to_numpy(), y.to_numpy()

    return _rounds(cohort, spec, label)


def choose_onset_target(real: Cohort, spec: FeatureSpec, horizon_days: float) -> tuple[str | None, int]:
    """Condition token with most positives in the real cohort, chronic list first."""
    ev = real.events[real.events["kind"] == "condition"]
    first = ev.groupby(["pidx", ev["token"].astype(str)], observed=True)["day"].min().reset_index()
    counts = pd.Series(dtype=float)
    for r in range(1, INDEX_ROUNDS + 1):
        idx = index_days(real, r, INDEX_ROUNDS)
        at = idx.reindex(first["pidx"].to_numpy()).to_numpy()
        pos = first[(first["day"].to_numpy() >= at) & (first["day"].to_numpy() < at + horizon_days)]
        counts = counts.add(pos["token"].value_counts(), fill_value=0)
    counts = counts.sort_values(ascending=False)
    if counts.empty:
        return None, 0
    codes = counts.index.str.rsplit("|", n=1).str[-1]
    chronic = counts[np.isin(codes, CHRONIC_TARGETS)]
    if not chronic.empty and chronic.iloc[0] >= MIN_CLASS:
        return str(chronic.index[0]), int(chronic.iloc[0])
    return str(counts.index[0]), int(counts.iloc[0])


def _auroc(train: TaskData, test: TaskData, seed: int) -> tuple[float | None, str | None]:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    for name, d in (("training", train), ("test", test)):
        pos = int(d.y.sum())
        if pos < MIN_CLASS or len(d.y) - pos < MIN_CLASS:
            return None, f"{name} set has {pos} positives and {len(d.y) - pos} negatives (need >= {MIN_CLASS} each)"
    clf = HistGradientBoostingClassifier(max_iter=150, learning_rate=0.05, max_leaf_nodes=15, random_state=seed)
    clf.fit(train.x.to_numpy(float), train.y)
    proba = clf.predict_proba(test.x.reindex(columns=train.x.columns).to_numpy(float))[:, 1]
    return float(roc_auc_score(test.y, proba)), None


def _split(d: TaskData, frac: float, seed: int) -> tuple[TaskData, TaskData]:
    """Split by patient so no patient is on both sides."""
    rng = np.random.default_rng(seed)
    pats = np.unique(d.groups)
    test_pats = pats[rng.random(len(pats)) < frac]
    test = np.isin(d.groups, test_pats)
    return (TaskData(d.x[~test], d.y[~test], d.groups[~test]), TaskData(d.x[test], d.y[test], d.groups[test]))


def utility_report(real: Cohort, synthetic: Cohort, spec: FeatureSpec, *, holdout: Cohort | None = None,
                   onset_horizon_days: float = 365.0, mortality_horizon_days: float | None = None,
                   seed: int = 0) -> dict:
    """TRTR (train real, test holdout or a 30% real split) vs TSTR (train synthetic, same test set)."""
    token, n_pos = choose_onset_target(real, spec, onset_horizon_days)
    tasks: dict[str, tuple[str, object]] = {}
    if token is not None:
        tasks["condition_onset"] = (
            f"first {real.displays.get(token, token)} ({token.rsplit('|', 1)[-1]}) within "
            f"{onset_horizon_days:.0f} days of an index visit (4 per patient, at 1/5..4/5 of the record)",
            lambda c: onset_task(c, spec, token, onset_horizon_days))
    when = f"within {mortality_horizon_days:.0f} days" if mortality_horizon_days else "at any time"
    tasks["mortality"] = (f"death recorded {when} after an index visit (4 per patient)",
                          lambda c: mortality_task(c, spec, mortality_horizon_days))
    out: dict = {"test_set": "holdout" if holdout is not None else
                 "30% patient split of real; the generator saw these patients, so TSTR is optimistic"}
    if token is None:
        out["condition_onset"] = {"computable": False, "reason": "no condition has an onset after an index visit"}
    for name, (desc, build) in tasks.items():
        res: dict = {"description": desc}
        real_d = build(real)
        if holdout is not None:
            train_r, test = real_d, build(holdout)
        else:
            train_r, test = _split(real_d, 0.3, seed)
        synth_d = build(synthetic)
        res.update({"positives": {"real_train": int(train_r.y.sum()), "test": int(test.y.sum()),
                                  "synthetic": int(synth_d.y.sum())},
                    "n": {"real_train": len(train_r.y), "test": len(test.y), "synthetic": len(synth_d.y)}})
        trtr, why_r = _auroc(train_r, test, seed)
        tstr, why_s = _auroc(synth_d, test, seed)
        res["trtr_auroc"] = trtr
        res["tstr_auroc"] = tstr
        res["ratio"] = tstr / trtr if (trtr and tstr is not None) else None
        res["computable"] = trtr is not None and tstr is not None
        if why_r:
            res["trtr_reason"] = why_r
        if why_s:
            res["tstr_reason"] = why_s
        if not res["computable"]:
            res["reason"] = "; ".join(r for r in (why_r and f"TRTR: {why_r}", why_s and f"TSTR: {why_s}") if r)
        out[name] = res
    return out
