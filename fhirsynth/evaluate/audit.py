"""Empirical DP audit in one training run (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1)
Training Run", NeurIPS). m canaries are each included in training independently with probability 1/2; the
auditor guesses "in" for the k+ highest-scoring and "out" for the k- lowest, abstains otherwise. If training is
(eps, delta)-DP, v correct guesses out of r are unlikely beyond a randomized-response binomial tail; the largest
eps rejected at confidence 1 - p is a lower bound on the true epsilon. A bound above the claimed epsilon means
the accountant or the training loop is wrong.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections import Counter
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
from scipy import stats

from fhirsynth.errors import UsageError
from fhirsynth.timeline.types import CLINICAL_KINDS, Event, PatientInfo, Timeline

log = logging.getLogger(__name__)


def p_value_dp_audit(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[>= v correct of r guesses] under an (eps, delta)-DP null with m canaries (the paper's Theorem 3.1
    tail bound including the delta term)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v} r={r} m={m}")
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"bad eps={eps} or delta={delta}")
    q = 1.0 / (1.0 + math.exp(-eps))  # accuracy of eps-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if v == 0 or delta == 0:
        return min(beta, 1.0)
    # alpha = max over i in 1..v of P[v > Binomial(r, q) >= v - i] / i (the paper's loop, vectorised)
    acc = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(acc / np.arange(1, v + 1)))
    return min(beta + alpha * delta * 2 * m, 1.0)


def eps_from_counts(m: int, r: int, v: int, delta: float, p: float = 0.05) -> float:
    """Largest eps whose null is rejected at level p (binary search; 0 when even eps=0 is not rejected)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if r == 0 or p_value_dp_audit(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value_dp_audit(m, r, v, hi, delta) < p:
        hi *= 2
        if hi > 100:
            return hi  # v == r with huge r: bounded only by the search cap
    for _ in range(40):
        mid = (lo + hi) / 2
        if p_value_dp_audit(m, r, v, mid, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


def eps_lower_bound(scores: Sequence[float], inclusion: Sequence[bool], k_guesses: int | tuple[int, int],
                    delta: float, p: float = 0.05) -> dict:
    """One-run epsilon lower bound from canary scores (higher = more likely included).

    k_guesses: total guesses split evenly between "in" (top scores) and "out" (bottom scores), or (k+, k-).
    Choose k before looking at the scores: picking the best of many k inflates the bound."""
    s = np.asarray(scores, float)
    inc = np.asarray(inclusion, bool)
    m = len(s)
    if len(inc) != m:
        raise ValueError(f"{m} scores but {len(inc)} inclusion flags")
    k_pos, k_neg = (k_guesses // 2, k_guesses - k_guesses // 2) if isinstance(k_guesses, int) else k_guesses
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > m:
        raise ValueError(f"guesses ({k_pos}+{k_neg}) must be non-negative and at most m={m}")
    order = np.argsort(-s, kind="stable")
    guess_in, guess_out = order[:k_pos], order[m - k_neg:] if k_neg else order[:0]
    v = int(inc[guess_in].sum() + (~inc[guess_out]).sum())
    r = k_pos + k_neg
    return {"eps_lower_bound": eps_from_counts(m, r, v, delta, p), "m": m, "guesses": r, "correct": v,
            "k_plus": int(k_pos), "k_minus": int(k_neg), "delta": delta, "confidence": 1 - p}


# ---------------------------------------------------------------- canary runner
def make_canaries(pool: list[Timeline], m: int, seed: int | np.random.Generator, n_codes: int = 60) -> list[Timeline]:
    """m canary patients: each takes the demographics and visit dates of a random pool patient but random items
    drawn from the pool's n_codes most widespread codes of every clinical kind (a drug list or a vaccine history
    identifies a patient as well as a diagnosis list does), so each canary is an
    unusual, memorisable record made of codes the model's vocabulary has (a rare code would be dropped by DP
    vocabulary selection). Each item copies the first pool event with its code (its category, status, reason,
    criticality and duration, as the data holds them), at the canary's visit; a measured value is drawn anew."""
    rng = np.random.default_rng(seed)
    spread: Counter = Counter()
    template: dict[tuple, Event] = {}
    for t in pool:
        seen = set()
        for e in t.events:
            if e.kind in CLINICAL_KINDS:
                key = (e.kind, e.system, e.code)
                seen.add(key)
                template.setdefault(key, e)
        spread.update(seen)
    vocab = [template[k] for k in sorted(k for k, _ in spread.most_common(n_codes))]
    if not vocab or not pool:
        raise UsageError("canary audit needs a non-empty training cohort")
    out = []
    for i in range(m):
        src = pool[int(rng.integers(len(pool)))]
        times = sorted({e.time for e in src.events if e.kind == "encounter"}) or [src.events[0].time]
        events: list[Event] = []
        for j, t in enumerate(times[:20]):
            events.append(Event(time=t, kind="encounter", system="http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                code="AMB", encounter_id=f"canary{i}-e{j}", end_time=t + timedelta(minutes=30)))
            for k in rng.choice(len(vocab), size=min(4, len(vocab)), replace=False):
                like = vocab[int(k)]
                numeric = like.kind == "observation" and like.value is not None and like.unit
                events.append(replace(
                    like, time=t, encounter_id=f"canary{i}-e{j}", source_id=None,
                    end_time=t + (like.end_time - like.time) if like.end_time and like.end_time >= like.time else None,
                    value=float(np.round(rng.normal(100, 30), 1)) if numeric else like.value))
        patient = PatientInfo(patient_id=f"canary-{i}", sex=src.patient.sex, birth_date=src.patient.birth_date)
        out.append(Timeline(patient=patient, events=events).sorted())
    return out


def run_canary_audit(train_dir: Path, m: int, *, epsilon: float, delta: float | None = None,
                     k_guesses: int | None = None, seed: int = 1, workdir: Path | None = None,
                     train_kwargs: dict | None = None, p: float = 0.05) -> dict:
    """Train once with each of m canaries included with probability 1/2, score all canaries by model
    likelihood, and return the one-run epsilon lower bound next to the claimed epsilon."""
    from fhirsynth.model.scoring import sequence_nll  # lazy: helper MODEL's modules
    from fhirsynth.model.train import train_model
    from fhirsynth.timeline.io import TimelineWriter, read_timelines

    if m < 2:
        raise UsageError(f"--audit-canaries needs at least 2 canaries, got {m}")
    # independent streams: with one seed for both, the inclusion coin of canary i and the random draws that
    # build canary i came from the same bits, so whether a canary was included correlated with what it looks
    # like (its source patient), which the one-run bound assumes impossible
    content_seed, coin_seed = np.random.SeedSequence(seed).spawn(2)
    pool = list(read_timelines(train_dir))
    canaries = make_canaries(pool, m, np.random.default_rng(content_seed))
    inclusion = np.random.default_rng(coin_seed).random(m) < 0.5
    own_tmp = workdir is None
    work = Path(tempfile.mkdtemp(prefix="fhirsynth-audit-")) if own_tmp else Path(workdir)
    try:
        data_dir, model_dir = work / "timelines", work / "model"
        with TimelineWriter(data_dir) as w:
            for t in pool:
                w.add(t)
            for t, inc in zip(canaries, inclusion):
                if inc:
                    w.add(t)
        kwargs = dict(train_kwargs or {})
        dp = math.isfinite(epsilon)
        report = train_model(data_dir, model_dir, epsilon=epsilon if dp else 8.0, delta=delta, dp=dp, seed=seed,
                             **kwargs)
        claimed_delta = float(report.get("delta") or delta or 1e-5)
        scores = -np.asarray(sequence_nll(model_dir, canaries), float)
        # a canary the tokenizer cannot encode (NaN) carries no signal: rank it in the middle (an abstention)
        scores = np.where(np.isfinite(scores), scores, np.nanmedian(scores) if np.isfinite(scores).any() else 0.0)
        k = k_guesses if k_guesses is not None else max(2, m // 5)
        bound = eps_lower_bound(scores, inclusion, k, claimed_delta, p)
        claimed = float(report.get("epsilon_total", report.get("epsilon", epsilon))) if dp else math.inf
        # threshold-free view of the same scores (0.5 = the model does not tell included canaries apart)
        bound["score_auc"] = (float(stats.mannwhitneyu(scores[inclusion], scores[~inclusion]).statistic
                                    / (inclusion.sum() * (~inclusion).sum()))
                              if 0 < inclusion.sum() < m else None)
        bound.update({"claimed_epsilon": claimed if dp else None, "dp": dp,
                      "exceeds_claim": bool(dp and bound["eps_lower_bound"] > claimed),
                      "n_included": int(inclusion.sum())})
        if bound["exceeds_claim"]:
            log.error("audit lower bound %.3f exceeds the claimed epsilon %.3f: a privacy bug",
                      bound["eps_lower_bound"], claimed)
        return bound
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
