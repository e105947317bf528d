"""Privacy metrics on known-answer sets built from toy data (issue 20): each metric must land on the right side
of its threshold. 150 training / 75 holdout patients; the "synthetic" sets are:

- holdout: the holdout passed off as synthetic (never seen by a generator: nothing to flag);
- fresh: an independent sample of the same population (a perfect generator that memorises nothing);
- copy: a verbatim copy of every training patient;
- jittered: a copy with +-1% value jitter, values rounded to one decimal and one random event per patient moved
  by a day (the exact-trajectory detector sees 0 copies in it);
- partial: a copy of 38 training patients (100 of 400, proportionally), alone or padded with fresh patients;
- shuffled: the training events with their codes and values shuffled across patients (every training patient's
  birth date, sex and visit days kept, the codes scrambled).
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from fhirsynth.evaluate.cohort import load_cohort
from fhirsynth.evaluate.privacy import (
    dcr_overfitting,
    near_copy_rates,
    privacy_report,
    record_distance,
    record_features,
    wilson_interval,
)
from fhirsynth.evaluate.toy import toy_timelines
from fhirsynth.timeline.io import write_timelines

N_TRAIN, N_HOLDOUT, N_PARTIAL = 150, 75, 38


def _jittered(timelines, rng):
    out = []
    for tl in timelines:
        events = [replace(e, value=round(e.value * (1 + rng.uniform(-0.01, 0.01)), 1)) if e.value is not None else
                  replace(e) for e in tl.events]
        i = int(rng.integers(len(events)))  # any event, the first one included
        shift = timedelta(days=int(rng.choice([-1, 1])))
        events[i] = replace(events[i], time=events[i].time + shift,
                            end_time=events[i].end_time + shift if events[i].end_time else None)
        out.append(replace(tl, events=events).sorted())
    return out


def _shuffled(timelines, rng):
    flat = [e for tl in timelines for e in tl.events]
    perm = rng.permutation(len(flat))
    fields = ("kind", "system", "code", "display", "value", "unit", "category")
    donors = [flat[j] for j in perm]
    out, k = [], 0
    for tl in timelines:
        events = []
        for e in tl.events:
            events.append(replace(e, **{f: getattr(donors[k], f) for f in fields}))
            k += 1
        out.append(replace(tl, events=events).sorted())
    return out


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("privacy_known")
    rng = np.random.default_rng(20)
    train = toy_timelines(N_TRAIN, seed=101, id_prefix="t")
    fresh = toy_timelines(N_TRAIN, seed=103, id_prefix="f")
    partial = [train[i] for i in np.sort(rng.choice(N_TRAIN, N_PARTIAL, replace=False))]
    sets = {"train": train, "holdout": toy_timelines(N_HOLDOUT, seed=102, id_prefix="h"), "fresh": fresh,
            "jittered": _jittered(toy_timelines(N_TRAIN, seed=101, id_prefix="t"), rng),
            "shuffled": _shuffled(toy_timelines(N_TRAIN, seed=101, id_prefix="t"), rng),
            "partial": partial, "partial_in_fresh": partial + fresh[: N_TRAIN - N_PARTIAL]}
    cohorts = {}
    for name, tls in sets.items():
        write_timelines(tls, root / name)
        cohorts[name] = load_cohort(root / name, name)
    cohorts["copy"] = cohorts["train"]
    reports = {name: privacy_report(cohorts["train"], cohorts[name], cohorts["holdout"], train_dir=root / "train",
                                    holdout_dir=root / "holdout", model_dir=None, seed=0)
               for name in ("holdout", "fresh", "copy", "jittered", "shuffled", "partial", "partial_in_fresh")}
    return cohorts, reports


# ---------------------------------------------------------------- the copies are flagged
@pytest.mark.parametrize("name", ["copy", "jittered", "partial"])
def test_dcr_flags_copies(known, name):
    dcr = known[1][name]["dcr"]
    assert dcr["share_closer_to_training"] >= 0.9
    # and beyond chance: the whole bootstrap interval above the no-memorisation range
    assert dcr["share_ci95"][0] > dcr["expected_share_null95"][1]
    assert dcr["p_value"] < 0.01
    assert dcr["n_training"] == N_TRAIN  # against the full training set, not a holdout-sized subsample


@pytest.mark.parametrize("name", ["copy", "jittered", "partial"])
def test_near_copies_flag_copies(known, name):
    c = known[1][name]["copies"]
    assert c["synthetic_near_copy_rate"] >= 0.9
    assert c["synthetic_near_copy_rate_ci95"][0] > c["holdout_near_copy_rate_ci95"][1]
    assert c["holdout_near_copy_rate"] <= 0.1


def test_exact_copy_detector_is_blind_to_jitter_the_near_copy_detector_is_not(known):
    reports = known[1]
    assert reports["copy"]["copies"]["synthetic_trajectory_copy_rate"] == 1.0
    assert reports["jittered"]["copies"]["synthetic_trajectory_copy_rate"] < 0.05  # the blind spot
    assert reports["jittered"]["copies"]["synthetic_near_copy_rate"] >= 0.9


def test_near_copies_measure_partial_memorisation(known):
    c = known[1]["partial_in_fresh"]["copies"]
    share = N_PARTIAL / N_TRAIN
    assert share - 0.08 < c["synthetic_near_copy_rate"] < share + 0.08
    assert c["synthetic_near_copy_rate_ci95"][0] > c["holdout_near_copy_rate"]
    dcr = known[1]["partial_in_fresh"]["dcr"]  # expected excess: 38/150 x (1 - 150/225) = 0.084
    assert dcr["excess_share"] > 0.04 and dcr["p_value"] < 0.05


@pytest.mark.parametrize("name", ["copy", "jittered"])
def test_attribute_inference_member_advantage_on_copies(known, name):
    ai = known[1][name]["attribute_inference"]
    assert ai["computable"]
    assert ai["member_success"] > 0.95  # the nearest synthetic record is the target's own copy
    assert ai["advantage"] > 0.1 and ai["advantage_ci95"][0] > 0.05
    assert ai["risk"] > 0.8
    assert len(ai["secrets"]) >= 3


def test_attribute_inference_partial_copy_has_some_advantage(known):
    ai = known[1]["partial"]["attribute_inference"]
    full = known[1]["copy"]["attribute_inference"]
    assert 0 < ai["advantage"] < full["advantage"]
    assert ai["risk"] > 0.1


@pytest.mark.parametrize("name", ["copy", "jittered"])
def test_record_mia_flags_copies(known, name):
    assert known[1][name]["mia_record_distance"]["auc"] >= 0.9


# ---------------------------------------------------------------- real patients that were never trained on are not
def test_holdout_as_synthetic_is_not_flagged(known):
    r = known[1]["holdout"]
    assert r["dcr"]["share_closer_to_training"] < r["dcr"]["expected_share_null95"][0]  # closer to the holdout
    c = r["copies"]
    assert c["synthetic_near_copy_rate"] == pytest.approx(c["holdout_near_copy_rate"])  # its own baseline
    assert c["synthetic_near_copy_rate"] <= 0.1
    ai = r["attribute_inference"]
    assert ai["advantage"] <= 0  # the non-member targets are the "synthetic" records themselves
    assert r["mia_record_distance"]["auc"] < 0.5


def test_independent_sample_is_within_the_null(known):
    r = known[1]["fresh"]
    d = r["dcr"]
    assert d["expected_share_null95"][0] <= d["share_closer_to_training"] <= d["expected_share_null95"][1]
    assert d["share_ci95"][0] <= d["expected_share"] <= d["share_ci95"][1]
    assert d["expected_share"] == pytest.approx(N_TRAIN / (N_TRAIN + N_HOLDOUT), abs=0.05)  # few ties
    c = r["copies"]
    assert c["synthetic_near_copy_rate"] <= c["holdout_near_copy_rate_ci95"][1]
    ai = r["attribute_inference"]
    assert ai["advantage_ci95"][0] <= 0 <= ai["advantage_ci95"][1]
    assert abs(ai["advantage"]) < 0.06
    assert abs(r["mia_record_distance"]["auc"] - 0.5) < 0.12


def test_shuffled_codes(known):
    """Scrambled codes reveal (almost) no condition of the training patients and are no exact copy; but each training
    patient's birth date, sex and visit days survive, so every record stays linked to its source: closer to
    training (DCR, record MIA), at a distance between a copy's and an unrelated real patient's. (Whether that
    counts as a near copy depends on how close the real patients with the shortest histories come to each other:
    the threshold is 0.1-0.4 on toy data; it is not asserted.)"""
    r = known[1]["shuffled"]
    assert r["copies"]["synthetic_trajectory_copy_rate"] == 0.0
    # the codes are not revealed (what remains, the number of events per visit day, hints a little)
    assert r["attribute_inference"]["advantage"] < 0.5 * known[1]["copy"]["attribute_inference"]["advantage"]
    assert r["attribute_inference"]["member_success"] < 0.9
    assert r["dcr"]["share_closer_to_training"] > r["dcr"]["expected_share_null95"][1]
    assert r["mia_record_distance"]["auc"] > 0.8
    jit = known[1]["jittered"]["copies"]["synthetic_median_distance_to_training"]
    real = r["copies"]["baseline_median_distance_to_training"]  # holdout to training
    assert jit < 0.05 < r["copies"]["synthetic_median_distance_to_training"] < real - 0.1


def test_reports_are_strict_json(known):
    for report in known[1].values():
        json.dumps(report, allow_nan=False)


# ---------------------------------------------------------------- without a holdout
def test_without_holdout_near_copies_use_training_leave_one_out(known):
    cohorts = known[0]
    r = privacy_report(cohorts["train"], cohorts["jittered"], None, train_dir=Path("."), holdout_dir=None,
                       model_dir=None)
    assert "holdout" in r["dcr"]["reason"] and r["attribute_inference"]["computable"] is False
    c = r["copies"]
    assert c["near_copy_baseline"] == "training leave-one-out"
    assert c["synthetic_near_copy_rate"] >= 0.9 and c["baseline_near_copy_rate"] <= 0.1
    r2 = privacy_report(cohorts["train"], cohorts["fresh"], None, train_dir=Path("."), holdout_dir=None,
                        model_dir=None)
    assert r2["copies"]["synthetic_near_copy_rate"] <= 0.1


# ---------------------------------------------------------------- the pieces
def test_record_distance_zero_on_itself_and_small_for_a_jittered_copy(known):
    cohorts = known[0]
    f_tr, f_ji, f_ho = record_features([cohorts["train"], cohorts["jittered"], cohorts["holdout"]])
    d_self = record_distance(f_tr, f_tr)
    assert np.allclose(np.diag(d_self), 0.0) and (d_self >= 0).all() and (d_self <= 1).all()
    d_jit = record_distance(f_ji, f_tr)
    assert (d_jit.argmin(1) == np.arange(N_TRAIN)).mean() > 0.95  # each jittered record's nearest is its source
    assert np.median(np.diag(d_jit)) < 0.05 < np.median(record_distance(f_ho, f_tr).min(1))


def test_dcr_null_follows_the_size_ratio_without_ties():
    """Continuous-ish random code sets (few ties): the permutation null's mean is |train| / (|train| + |holdout|),
    an independent set sits in it and a copy of the training set is far above it."""
    rng = np.random.default_rng(3)

    def draw(n):
        return sp.csr_matrix((rng.random((n, 400)) < 0.1).astype(np.float32))

    train, holdout, fresh = draw(300), draw(100), draw(200)
    iid = dcr_overfitting(fresh, train, holdout, rng)
    assert iid["expected_share"] == pytest.approx(0.75, abs=0.03)
    assert iid["expected_share_null95"][0] <= iid["share_closer_to_training"] <= iid["expected_share_null95"][1]
    assert iid["score"] > 0.8
    copied = dcr_overfitting(train[:200], train, holdout, rng)
    assert copied["share_closer_to_training"] == 1.0 and copied["score"] == 0.0
    assert copied["p_value"] < 0.01


def test_near_copy_threshold_from_the_reference_distribution():
    ref = np.linspace(0.1, 1.0, 100)  # reference (holdout) nearest-training distances
    out = near_copy_rates(np.r_[np.zeros(30), np.full(70, 0.5)], ref, quantile=0.05)
    assert out["near_copy_threshold"] == pytest.approx(np.quantile(ref, 0.05))
    assert out["synthetic_near_copy_rate"] == pytest.approx(0.3)
    assert out["baseline_near_copy_rate"] == pytest.approx(0.05)
    lo, hi = out["synthetic_near_copy_rate_ci95"]
    assert lo < 0.3 < hi


def test_wilson_interval():
    lo, hi = wilson_interval(0, 50)
    assert lo == 0.0 and 0.05 < hi < 0.1
    lo, hi = wilson_interval(25, 50)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(2 * 1.96 * 0.5 / np.sqrt(50), rel=0.05)
    assert wilson_interval(0, 0) == [None, None]
