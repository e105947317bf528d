"""Calibration by post-processing (issue 15): reweight an oversampled pool of the model's own patients so its
statistics match the measurements released at train time (measurements.py), then draw the output from the weights.

As PMW-Pub (Liu, Vietri, Steinke, Ullman, Wu, ICML 2021) with the model's samples as the public support: the
weights are a distribution over the pool, w = softmax(theta), fitted by L-BFGS to
    sum over families f of  v_f  mean over queries j of f of  huber(max(0, |a_j(w) - t_j| / s_j - 1/2))
    + tau KL(w || uniform)  +  CAP_PENALTY sum_i max(0, n w_i - 1)^2
where a_j(w) is the pool's weighted share for query j, t_j the measured share (noisy count / noisy patient count,
clipped to [0, 1]) and s_j = max(sigma_j / n_hat, FLOOR) the noise scale of that target in share units: a pool
inside half a standard deviation of a target pays nothing, so the fit does not chase the noise, and the entropy
term keeps the weights spread. huber(h) is h^2 up to HUBER noise standard deviations and linear beyond: a code
share the pool is far from (the model rarely writes the code) is one reweighting cannot reach (repair below
does), and squared, hundreds of such queries outweighed every other family together and bought nothing but
shorter records (US split, no DP: events per patient KS 0.07 as sampled, 0.22 after the fit). v_f is 1 / (number
of families) except for the record-length families (FAMILY_WEIGHTS). The last term keeps every weight under 1/n
(n = the requested count): the output takes a pooled patient at most once, so a weight above that could not be
honoured by the draw.

The per-patient histograms (CUMULATIVE_FAMILIES: visits and events per patient, and how many of the pair codes a
patient holds) enter as cumulative shares, "patients with at least bucket j" for every bucket edge, computed from
the released histogram (post-processing): what a KS distance measures, where per-bucket queries, each inside its
dead zone, let every bucket drift the same way. For top_held that drift was the loss of the records' shape: the
US records are bimodal (no patient holds 10-29 of the top 40 codes), per-bucket queries left 18% of the output in
that gap, and the pairs' joint shares with them (patient co-occurrence R2 at epsilon 8, three seeds, two draws:
0.46 -> 0.54; BENCHMARKS.md, twentieth session).
Everything here is a function of the DP release and of samples of the DP model: post-processing, no privacy cost.

The output: inclusion probabilities pi_i = min(1, n w_i) (mass above 1 redistributed), then systematic sampling
over a seeded permutation: n distinct pooled patients, never a duplicate. Then, unless repair=False, repair.py moves
each code's share the rest of the way to its measured target by moving code histories between patients of the same
sex and age band (reweighting alone cannot raise a code the model rarely writes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from fhirsynth.model.measurements import Spec, patient_queries
from fhirsynth.model.sampler import sample_timelines
from fhirsynth.timeline.types import Timeline

log = logging.getLogger(__name__)

FLOOR = 0.005  # smallest tolerance in share units (exact measurements: half a percentage point is a match)
DEADZONE = 0.5  # in noise standard deviations
HUBER = 5.0  # noise standard deviations (past the dead zone) beyond which a query's pull stops growing
TAU = 1e-3  # entropy weight
CAP_PENALTY = 10.0
CUMULATIVE_FAMILIES = ("visits", "events", "top_held")
# relative family weights (default 1): the record-length histograms are two families against eight about codes,
# and repair restores code shares after the draw but not lengths. Measured on the US split (BENCHMARKS.md,
# eighteenth session): without DP 3 and 5 alike (events / visits per patient KS 0.26 / 0.15 -> 0.12 / 0.06); at
# epsilon 8 a larger weight buys shorter KS with patient co-occurrence, 5 lost 0.1-0.2 more of it than 3. top_held,
# the third per-patient histogram, takes the same weight (twentieth session: 1 gained half of what 3 did)
FAMILY_WEIGHTS = {"visits": 3.0, "events": 3.0, "top_held": 3.0}
DEFAULT_POOL_FACTOR = 5
# requested patients calibrated together: the pool of one chunk (x pool factor) is held in memory, so a large n
# streams chunk by chunk like plain generation
CALIBRATION_CHUNK = 2000


@dataclass
class Targets:
    spec: Spec
    families: list[str]
    offsets: dict[str, tuple[int, int]]
    target: np.ndarray  # shares in [0, 1]
    scale: np.ndarray  # tolerance per query, share units
    family_of: np.ndarray  # family index per query
    n_hat: float
    cumulative: tuple[str, ...] = ()  # families whose queries are "at least bucket j" (j = 1 .. buckets - 1)


def targets(doc: dict[str, Any], floor: float = FLOOR) -> Targets:
    spec = Spec.from_json(doc["spec"])
    fams = doc["families"]
    names = [f for f in spec.sizes() if spec.sizes()[f] > 0]
    n_hat = max(float(np.clip(fams["cells"]["counts"], 0, None).sum()), 1.0)
    n_hat_var = len(fams["cells"]["counts"]) * float(fams["cells"]["sigma"]) ** 2
    offsets, t, s, fo, at = {}, [], [], [], 0
    cumulative = tuple(f for f in CUMULATIVE_FAMILIES if f in names)
    for k, f in enumerate(names):
        c, sd = np.asarray(fams[f]["counts"], dtype=float), float(fams[f]["sigma"])
        sigma = np.full(len(c), sd)
        if f in cumulative:
            c, sigma = tail_counts(c, sd, n_hat, n_hat_var)
        offsets[f] = (at, at + len(c))
        at += len(c)
        t.append(np.clip(c / n_hat, 0.0, 1.0))
        s.append(np.maximum(sigma / n_hat, floor))
        fo.append(np.full(len(c), k))
    return Targets(spec, names, offsets, np.concatenate(t), np.concatenate(s), np.concatenate(fo), n_hat,
                   cumulative)


def tail_counts(c: np.ndarray, sigma: float, n_hat: float, n_hat_var: float) -> tuple[np.ndarray, np.ndarray]:
    """Patients in bucket j or above, j = 1 .. len(c) - 1, from a noisy histogram c (noise sigma per bucket), and
    the noise of each: the inverse-variance mean of the sum of the buckets from j up and of n_hat minus the sum
    below j (n_hat: the noisy patient count with variance n_hat_var; the two estimates' noises are independent)."""
    k = len(c)
    up = np.cumsum(c[::-1])[::-1][1:]
    if sigma == 0.0:  # exact counts: both estimates agree up to the patient count's definition; take the sum up
        return up, np.zeros(k - 1)
    j = np.arange(1, k)
    below = n_hat - np.cumsum(c)[:-1]
    v_up, v_below = sigma ** 2 * (k - j), sigma ** 2 * j + n_hat_var
    return (up * v_below + below * v_up) / (v_up + v_below), np.sqrt(v_up * v_below / (v_up + v_below))


def query_matrix(pool: list[Timeline], tg: Targets) -> sp.csr_matrix:
    """pool x queries, 1 where the patient counts toward the query."""
    rows, cols = [], []
    for i, tl in enumerate(pool):
        q = patient_queries(tl, tg.spec)
        for f in tg.families:
            lo = tg.offsets[f][0]
            js = [t for b in q[f] for t in range(b)] if f in tg.cumulative else q[f]  # thresholds 1..b
            cols.extend(lo + j for j in js)
            rows.extend([i] * len(js))
    return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(pool), len(tg.target)))


def errors(Q: sp.csr_matrix, w: np.ndarray, tg: Targets, how: str = "max") -> dict[str, float]:
    """Max (or mean) |weighted share - target| per family (share units; for a cumulative family the max is the
    KS distance to the measured histogram). The targets are noisy: with many queries the max is bounded below by
    the noise (about 3 sigma / n_hat), the mean tells the trend."""
    a = Q.T @ w
    agg = np.max if how == "max" else np.mean
    return {f: float(agg(np.abs(a[lo:hi] - tg.target[lo:hi]))) if hi > lo else 0.0
            for f, (lo, hi) in tg.offsets.items()}


def family_weights(tg: Targets, weights: dict[str, float] | None = None) -> np.ndarray:
    """Each query's weight in the fit: its family's v_f (FAMILY_WEIGHTS, else 1) over the family's query count and
    the number of families."""
    weights = FAMILY_WEIGHTS if weights is None else weights
    counts = np.bincount(tg.family_of, minlength=len(tg.families)).astype(float)
    v = np.array([weights.get(f, 1.0) for f in tg.families])
    return v[tg.family_of] / (len(tg.families) * counts[tg.family_of])


def huber(h: np.ndarray, delta: float = HUBER) -> tuple[np.ndarray, np.ndarray]:
    """h^2 up to delta, then linear with the same slope at delta; and its derivative."""
    if not np.isfinite(delta):
        return h * h, 2.0 * h
    inside = h <= delta
    return (np.where(inside, h * h, 2.0 * delta * h - delta * delta), np.where(inside, 2.0 * h, 2.0 * delta))


def fit_weights(Q: sp.csr_matrix, tg: Targets, n_out: int, *, tau: float = TAU, max_iter: int = 500,
                weights: dict[str, float] | None = None, huber_sd: float = HUBER) -> np.ndarray:
    """The calibrated distribution over the pool (see the module docstring); weights: the family weights v_f
    (default FAMILY_WEIGHTS); huber_sd: where the loss turns linear (inf: squared throughout)."""
    from scipy.optimize import minimize

    n = Q.shape[0]
    qw = family_weights(tg, weights)
    QT = Q.T.tocsr()

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        z = theta - theta.max()
        w = np.exp(z)
        w /= w.sum()
        r = (QT @ w - tg.target) / tg.scale
        h, dh = huber(np.maximum(np.abs(r) - DEADZONE, 0.0), huber_sd)
        logw = np.log(np.maximum(w, 1e-300))
        over = np.maximum(n_out * w - 1.0, 0.0)
        loss = float(np.sum(qw * h)) + tau * float(np.sum(w * logw) + np.log(n)) + CAP_PENALTY * float(over @ over)
        g_a = qw * dh * np.sign(r) / tg.scale  # d loss / d a
        g_w = Q @ g_a + tau * (logw + 1.0) + CAP_PENALTY * 2.0 * n_out * over
        g_theta = w * (g_w - float(w @ g_w))  # softmax Jacobian
        return loss, g_theta

    res = minimize(f, np.zeros(n), jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    z = res.x - res.x.max()
    w = np.exp(z)
    return w / w.sum()


def inclusion(w: np.ndarray, n: int) -> np.ndarray:
    """pi = min(1, c w) with c such that sum(pi) = n (mass above 1 goes to the others), for n <= len(w)."""
    pi = np.zeros_like(w)
    free = np.ones(len(w), dtype=bool)
    left = float(n)
    for _ in range(len(w)):
        c = left / max(float(w[free].sum()), 1e-300)
        pi[free] = c * w[free]
        over = free & (pi >= 1.0)
        if not over.any():
            break
        pi[over] = 1.0
        free &= ~over
        left = n - float(pi[~free].sum())
        if left <= 0 or not free.any():
            break
    return np.minimum(pi, 1.0)


def systematic_draw(pi: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct indices, index i with probability pi_i (systematic sampling over a random order)."""
    order = rng.permutation(len(pi))
    cum = np.cumsum(pi[order])
    cum *= n / cum[-1]
    points = rng.random() + np.arange(n)
    picked = order[np.searchsorted(cum, points, side="right").clip(max=len(pi) - 1)]
    picked = list(dict.fromkeys(picked.tolist()))  # round-off can repeat one; fill from the likeliest others
    if len(picked) < n:
        rest = [i for i in np.argsort(-pi, kind="stable").tolist() if i not in set(picked)]
        picked += rest[: n - len(picked)]
    return np.sort(np.asarray(picked[:n]))


def calibrate(pool: list[Timeline], doc: dict[str, Any], n: int, seed: int, *,
              repair: bool = True) -> tuple[list[Timeline], dict]:
    """n timelines drawn from the pool reweighted to the measurements (and repaired, see the module docstring),
    and a report of how far the statistics moved (max error per family before = the uniform pool, after = the
    fitted weights, drawn = the output before repair, repaired = after it)."""
    if n > len(pool):
        raise ValueError(f"the pool ({len(pool)}) is smaller than the requested count ({n})")
    tg = targets(doc)
    Q = query_matrix(pool, tg)
    uniform = np.full(len(pool), 1.0 / len(pool))
    w = fit_weights(Q, tg, n)
    pi = inclusion(w, n)
    idx = systematic_draw(pi, n, np.random.default_rng([seed % 2**63, 15]))  # seeds may be negative
    drawn = np.zeros(len(pool))
    drawn[idx] = 1.0 / n
    report = {"pool": len(pool), "n": n, "before": errors(Q, uniform, tg), "after": errors(Q, w, tg),
              "drawn": errors(Q, drawn, tg), "before_mean": errors(Q, uniform, tg, "mean"),
              "drawn_mean": errors(Q, drawn, tg, "mean"), "effective_pool": float(1.0 / np.sum(w * w)),
              "capped": int((pi >= 1.0 - 1e-12).sum())}
    out = [pool[i] for i in idx]
    if repair:
        from fhirsynth.model.repair import code_targets, repair as repair_marginals

        out, report["repair"] = repair_marginals(out, pool, code_targets(doc, DEADZONE, FLOOR), seed)
        report["repaired"] = errors(query_matrix(out, tg), np.full(n, 1.0 / n), tg)
    return out, report


def summary(report: dict) -> str:
    def worst(d: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.3f}" for k, v in d.items())

    text = (f"calibration: pool {report['pool']} -> {report['n']} patients (effective pool "
            f"{report['effective_pool']:.0f}); max error by statistic before [{worst(report['before'])}], "
            f"after [{worst(report['drawn'])}]; mean error before [{worst(report['before_mean'])}], after "
            f"[{worst(report['drawn_mean'])}]")
    if "repaired" in report:
        text += f"; max error after repair [{worst(report['repaired'])}]"
    return text


CONSTRAINTS = ("sex", "age", "condition")


def measurements_to_calibrate_to(model_dir: Path, sample: dict) -> dict | None:
    """The model's DP measurements when generation should calibrate to them, else None (and the log says why)."""
    from fhirsynth.model.measurements import load

    if any(sample.get(k) is not None for k in CONSTRAINTS):
        # the measurements describe the whole training cohort, not the subgroup asked for (and are not read)
        log.info("sex / age / condition constraint given: not calibrated (the measurements describe the whole "
                 "cohort)")
        return None
    doc = load(model_dir)
    if doc is None:
        log.info("the model holds no measurements (trained before calibration or with measurement share 0): "
                 "not calibrated")
    return doc


def generated_timelines(model_dir: Path, n: int, sample: dict, *, pool_factor: int = DEFAULT_POOL_FACTOR,
                        calibrate: bool = True, repair: bool = True):
    """The one generation path of `generate`, `$synthesize` and `serve --model`: n patients calibrated to the
    model's measurements when it holds them, calibration is wanted and no constraint is given; else as sampled.
    repair=False keeps the reweighted draw as it is (no code histories moved)."""
    doc = measurements_to_calibrate_to(model_dir, sample) if calibrate else None
    if doc is None:
        return sample_timelines(model_dir, n, **sample)
    return calibrated_timelines(model_dir, n, doc, pool_factor, sample, repair=repair)


def calibrated_timelines(model_dir: Path, n: int, doc: dict, pool_factor: int, sample: dict, *,
                         repair: bool = True):
    """Chunks of at most CALIBRATION_CHUNK patients, each drawn from pool_factor x as many samples reweighted to
    the measurements; ids syn-<seed>-<index> in output order. Deterministic given the seed."""
    seed = sample["seed"]
    stream = sample_timelines(model_dir, n * pool_factor, **sample)
    done = 0
    try:
        while done < n:
            k = min(CALIBRATION_CHUNK, n - done)
            pool = [tl for _, tl in zip(range(k * pool_factor), stream)]
            out, report = calibrate(pool, doc, k, seed=seed * 1_000_003 + done, repair=repair)
            log.info("%s", summary(report))
            for tl in out:
                tl.patient.patient_id = f"syn-{seed}-{done}"
                done += 1
                yield tl
    finally:
        stream.close()  # ends sampler worker processes
