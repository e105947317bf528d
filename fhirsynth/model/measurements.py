"""Statistics measured at train time under DP, for calibration at generate time (issue 15, calibrate.py).

Every statistic is a count of patients, so it is a linear query over a cohort: the same query functions
(`patient_queries`) answer it for the training patients here and for a pool of synthetic patients in
calibrate.py, which reweights the pool to match. Families (privacy unit: one patient, add/remove-one adjacency):

  cells        patients per cell, cell = sex (female / not female) x age band (age at death or at the last
               event: 0-17, 18-44, 45-64, 65+); L2 sensitivity 1
  prevalence   patients holding code c, over the vocabulary's codes of PREVALENCE_KINDS; a patient counts
               at most `max_codes` codes (the first in vocabulary order); sensitivity sqrt(max_codes)
  prevalence_cells  the same per cell (sex x age band), with a smaller share: the overall prevalence would
               otherwise carry the noise of every cell (sqrt(cells) times more)
  death        deceased patients per cell; sensitivity 1
  visits       histogram of visits per patient (an encounter id, else a calendar day), half-octave log buckets
  events       histogram of condition + observation events per patient, same buckets; sensitivity 1 each
  top_prevalence  patients holding each of the `pair_codes` (below): the codes whose shares decide the
               patient-level co-occurrence, measured again with sensitivity sqrt(len(pair_codes)) instead of
               sqrt(max_codes); repair combines it with `prevalence` (inverse-variance) for those codes
  top_held     histogram of how many of the pair codes a patient holds (0..len(pair_codes)); sensitivity 1. The
               US records are bimodal (77% lack at most 4 of the top 40, 23% lack 33 or more): the mix of full and
               sparse records moves every pair's joint share at once
  first_age    age at the first visit (first_visit_time; FIRST_AGE_EDGES buckets: weeks and months under three
               years, then years) per cell: where a record begins (near birth for a simulator, at the first
               contact for an EHR export); sensitivity 1. The visit sampler draws
               each patient's bucket from it and does not end the record (visits are drawn newest first) before
               it (visitsampler.py): the DP model alone ended half of its US records decades after birth, where
               every real one starts at birth. Models measured before it lack the family (no constraint).
  pairs_absent patients LACKING both codes a and b, for every pair of the `pair_codes` most common codes held by
               5-95% of patients (chosen from the noisy prevalence above: post-processing, not from exact data).
               Absence, not presence: most patients hold most of the common codes (US cohort: median 38 of the
               top 40), so a patient lacks few of them and contributes few pairs; a patient counts the pairs of
               at most `max_absent` of their absent codes (the first in that order); sensitivity
               sqrt(max_absent (max_absent - 1) / 2). Presence shares follow from these and the prevalence.

Mechanism: the discrete Gaussian (dpnoise.NoiseSource.gaussian: OpenDP, OS CSPRNG) on every family's integer
counts with its own scale. Accounting in zCDP: OpenDP calibrates sigma0 = gaussian_sigma(epsilon, delta, 1), i.e.
rho = 1 / (2 sigma0^2) reaches (epsilon, delta); family f gets the share w_f of rho with
sigma_f = sensitivity_f * sigma0 / sqrt(w_f), so the rhos add up to rho (zCDP composition, adaptive: the pair
codes depend on the first release). `epsilon_check` recomputes the epsilon of the composed release with OpenDP.
With dp=False the counts are exact (sigma 0, no claim).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import combinations
from typing import Any

import numpy as np

from fhirsynth.model.bins import DAYS_PER_YEAR, EARLY_AGE_EDGES
from fhirsynth.model.dpnoise import NoiseSource, gaussian_epsilon, gaussian_sigma
from fhirsynth.timeline.types import Timeline

log = logging.getLogger(__name__)

MEASUREMENTS = "measurements.json"
FORMAT = 1
AGE_BANDS = (18, 45, 65)  # band edges in years: 0-17, 18-44, 45-64, 65+
CELL_YEAR_DAYS = 365  # a cell's age in years is whole days since birth // 365 (the sampler's record start too)
N_CELLS = 2 * (len(AGE_BANDS) + 1)
# half-octave buckets of a per-patient count: 0, 1, 2-3, 4, 5-7, 8-10, 11-15, 16-21, ... up to 2^16
BUCKET_EDGES = tuple(sorted({0, 1} | {int(math.floor(2 ** (k / 2))) for k in range(2, 33)}))
CODE_KINDS = ("condition", "observation")  # the events histogram counts these (records_metrics' events)
# the prevalence families count every clinical code kind, so calibration and repair also bring medications,
# immunizations, procedures and allergies to their measured shares (issue 18)
PREVALENCE_KINDS = CODE_KINDS + ("medication", "immunization", "procedure", "allergy")
PAIR_BAND = (0.05, 0.95)
# lower edges in years, the last bucket open: under three years the visit model's own weeks and months
# (bins.EARLY_AGE_EDGES), so that an infant's record may end only near where real ones begin (with whole years,
# any time in the first year was allowed, and the sampler packed visits into the first weeks: 3.8 encounters in
# the first month per us-full record against 0.6, fourteenth session); then years
FIRST_AGE_EDGES = tuple(e / DAYS_PER_YEAR for e in EARLY_AGE_EDGES) + (5, 10, 18, 30, 45, 65)
FIRST_AGE_FLOOR = 2.0  # noise SDs under which a first-age count is read as 0 (first_age_prior)
# noise SDs a window of FIRST_AGE_WINDOW neighbouring buckets of the cells' summed counts must pass to be support
# (first_age_prior): one window in ~700 passes on noise alone, and the histogram has 46 buckets
FIRST_AGE_SUPPORT_SDS = 3.0
FIRST_AGE_WINDOW = 3
# rho shares of the families (public); the prevalence and the pairs are the many-query families
# measured on the US split: at these noise scales the pair counts carried no usable signal (BENCHMARKS.md,
# eleventh session), and the top codes' shares, which decide the pairs' joint shares, did: most of the pairs'
# former share now goes to top_prevalence and top_held
RHO_SHARES = {"cells": 0.03, "prevalence": 0.35, "prevalence_cells": 0.15, "death": 0.03, "visits": 0.06,
              "events": 0.06, "pairs_absent": 0.06, "top_prevalence": 0.18, "top_held": 0.04, "first_age": 0.04}
DEFAULT_MAX_CODES = 128
DEFAULT_PAIR_CODES = 40
DEFAULT_MAX_ABSENT = 10

CodeKey = tuple[str, str, str]


@dataclass
class Spec:
    """What is measured: the public / DP-derived definition of every query (stored with the counts)."""

    codes: list[CodeKey]
    max_codes: int = DEFAULT_MAX_CODES
    pair_codes: list[CodeKey] = field(default_factory=list)
    max_absent: int = DEFAULT_MAX_ABSENT
    first_age: bool = True  # False: a document measured before the family existed
    top: bool = True  # top_prevalence and top_held; False: a document measured before them

    def __post_init__(self) -> None:
        self.code_index = {c: i for i, c in enumerate(self.codes)}
        self.pair_index = {c: i for i, c in enumerate(self.pair_codes)}
        k = len(self.pair_codes)
        self.pair_of = {p: j for j, p in enumerate(combinations(range(k), 2))}

    def sizes(self) -> dict[str, int]:
        k = len(self.pair_codes)
        return {"cells": N_CELLS, "prevalence": len(self.codes), "prevalence_cells": N_CELLS * len(self.codes),
                "death": N_CELLS,
                "visits": len(BUCKET_EDGES), "events": len(BUCKET_EDGES), "pairs_absent": k * (k - 1) // 2,
                "top_prevalence": k if self.top else 0, "top_held": k + 1 if self.top and k else 0,
                "first_age": N_CELLS * len(FIRST_AGE_EDGES) if self.first_age else 0}

    def sensitivities(self) -> dict[str, float]:
        return {"cells": 1.0, "prevalence": math.sqrt(self.max_codes), "prevalence_cells": math.sqrt(self.max_codes),
                "death": 1.0, "visits": 1.0, "events": 1.0,
                "pairs_absent": math.sqrt(self.max_absent * (self.max_absent - 1) / 2),
                "top_prevalence": math.sqrt(max(len(self.pair_codes), 1)), "top_held": 1.0, "first_age": 1.0}

    def to_json(self) -> dict[str, Any]:
        out = {"codes": [list(c) for c in self.codes], "max_codes": self.max_codes,
               "pair_codes": [list(c) for c in self.pair_codes], "max_absent": self.max_absent,
               "age_bands": list(AGE_BANDS), "bucket_edges": list(BUCKET_EDGES)}
        if self.first_age:
            out["first_age_edges"] = list(FIRST_AGE_EDGES)
        out["top_families"] = self.top
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Spec:
        if list(d.get("age_bands", [])) != list(AGE_BANDS) or list(d.get("bucket_edges", [])) != list(BUCKET_EDGES):
            raise ValueError("age bands or buckets differ from this fhirsynth's")
        if "first_age_edges" in d and list(d["first_age_edges"]) != list(FIRST_AGE_EDGES):
            raise ValueError("first-visit age buckets differ from this fhirsynth's")
        return cls(codes=[tuple(c) for c in d["codes"]], max_codes=int(d["max_codes"]),
                   pair_codes=[tuple(c) for c in d["pair_codes"]], max_absent=int(d["max_absent"]),
                   first_age="first_age_edges" in d, top=bool(d.get("top_families", False)))


def vocab_codes(vocab) -> list[CodeKey]:
    """The codes (PREVALENCE_KINDS) of the (public + DP) vocabulary, in vocabulary order, once each."""
    seen: dict[CodeKey, None] = {}
    for it in vocab.items:
        if it.kind in PREVALENCE_KINDS and it.system and it.code:
            seen.setdefault((it.kind, it.system, it.code), None)
    return list(seen)


def bucket(x: int) -> int:
    return int(np.searchsorted(BUCKET_EDGES, x, side="right") - 1)


def _utc(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


def cell_of(tl: Timeline) -> int:
    """sex (female / not) x age band at death, else at the last event (no birth date or no event: age 0)."""
    p = tl.patient
    end = p.death_date or (max((e.time for e in tl.events), key=_utc) if tl.events else None)
    age = 0
    if p.birth_date is not None and end is not None:
        age = max(0, (_utc(end).date() - p.birth_date).days // CELL_YEAR_DAYS)
    band = int(np.searchsorted(AGE_BANDS, age, side="right"))
    return (0 if p.sex == "female" else 1) * (len(AGE_BANDS) + 1) + band


def first_visit_time(tl: Timeline) -> datetime | None:
    """When the record's first visit begins, as the visit encoding sees it (tokenizer.py): an encounter's events
    begin at the encounter's start (a condition whose onset predates the encounter it was recorded at, such as a
    simulator's finding dated at birth, does not start the record), other events on their own day."""
    groups: dict[tuple, list] = {}
    for e in tl.events:
        groups.setdefault(_visit_key(e), []).append(e)
    starts = [min(_utc(e.time) for e in ([e for e in evs if e.kind == "encounter"] or evs)) for evs in groups.values()]
    return min(starts) if starts else None


def first_age_bucket(tl: Timeline) -> int | None:
    """The FIRST_AGE_EDGES bucket of the age at the first visit (first_visit_time); None without a birth date or
    an event."""
    first = first_visit_time(tl) if tl.patient.birth_date is not None else None
    if first is None:
        return None
    years = max(0, (first.date() - tl.patient.birth_date).days) / DAYS_PER_YEAR
    return int(np.searchsorted(FIRST_AGE_EDGES, years, side="right") - 1)


def n_visits(tl: Timeline) -> int:
    """Distinct encounter ids plus distinct UTC days of events without one (records_metrics' visits)."""
    return len({_visit_key(e) for e in tl.events})


def _visit_key(e) -> tuple:
    """The visit an event belongs to: its encounter, else its UTC day."""
    return ("e", e.encounter_id) if e.encounter_id else ("d", _utc(e.time).date())


def patient_queries(tl: Timeline, spec: Spec) -> dict[str, list[int]]:
    """The indices of the counts this patient adds 1 to, per family (bounded as the module docstring says)."""
    cell = cell_of(tl)
    held = {(e.kind, e.system, e.code) for e in tl.events if e.kind in PREVALENCE_KINDS}
    idx = sorted(spec.code_index[c] for c in held if c in spec.code_index)[: spec.max_codes]
    n_codes = len(spec.codes)
    absent = [j for j, c in enumerate(spec.pair_codes) if c not in held][: spec.max_absent]
    dead = tl.patient.death_date is not None or bool(tl.patient.deceased)
    n_events = sum(1 for e in tl.events if e.kind in CODE_KINDS)
    fa = first_age_bucket(tl) if spec.first_age else None
    top_held = [j for j, c in enumerate(spec.pair_codes) if c in held] if spec.top else []
    return {
        "cells": [cell],
        "prevalence": idx,
        "prevalence_cells": [cell * n_codes + i for i in idx],
        "death": [cell] if dead else [],
        "visits": [bucket(n_visits(tl))],
        "events": [bucket(n_events)],
        "pairs_absent": [spec.pair_of[p] for p in combinations(absent, 2)],
        "first_age": [] if fa is None else [cell * len(FIRST_AGE_EDGES) + fa],
        "top_prevalence": top_held,
        "top_held": [len(top_held)] if spec.top and spec.pair_codes else [],
    }


def exact_counts(timelines: list[Timeline], spec: Spec, families: tuple[str, ...]) -> dict[str, np.ndarray]:
    sizes = spec.sizes()
    out = {f: np.zeros(sizes[f], dtype=np.int64) for f in families}
    for tl in timelines:
        q = patient_queries(tl, spec)
        for f in families:
            np.add.at(out[f], q[f], 1)
    return out


def choose_pair_codes(spec: Spec, cells: np.ndarray, prevalence: np.ndarray, k: int) -> list[CodeKey]:
    """The k codes with the highest (noisy) prevalence among those held by 5-95% of patients: post-processing."""
    n_hat = max(float(np.clip(cells, 0, None).sum()), 1.0)
    share = np.clip(prevalence, 0, None) / n_hat
    order = sorted(range(len(spec.codes)), key=lambda i: (-share[i], i))
    return [spec.codes[i] for i in order if PAIR_BAND[0] <= share[i] <= PAIR_BAND[1]][:k]


def measure(timelines: list[Timeline], vocab, *, dp: bool, epsilon: float | None, delta: float | None,
            noise: NoiseSource, max_codes: int = DEFAULT_MAX_CODES, pair_codes: int = DEFAULT_PAIR_CODES,
            max_absent: int = DEFAULT_MAX_ABSENT) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the measurements.json document, its privacy report). Noisy integer counts under dp, exact otherwise.
    Without dp nothing needs bounding, so no patient's codes or absent pairs are cut (a cut biases the late codes
    of the order down: at 128 codes, 16% of the US patients lost some under the no-DP vocabulary of 516 codes)."""
    codes = vocab_codes(vocab)
    if not dp:
        max_codes, max_absent = max(len(codes), 1), max(pair_codes, 2)
    spec = Spec(codes=codes, max_codes=max_codes, max_absent=max_absent)
    sens = spec.sensitivities()
    sigma0 = None
    if dp:
        if epsilon is None or delta is None or not epsilon > 0 or not 0 < delta < 1:
            raise ValueError(f"measurements need epsilon > 0 and 0 < delta < 1 (got {epsilon}, {delta})")
        sigma0 = gaussian_sigma(epsilon, delta, 1.0)

    def release(counts: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
        out = {}
        for f, c in counts.items():
            if sigma0 is None:
                out[f] = {"counts": c.tolist(), "sigma": 0.0, "sensitivity": sens[f], "rho_share": None}
            else:
                sigma = sens[f] * sigma0 / math.sqrt(RHO_SHARES[f])
                out[f] = {"counts": noise.gaussian(c, sigma).tolist(), "sigma": sigma, "sensitivity": sens[f],
                          "rho_share": RHO_SHARES[f]}
        return out

    first = ("cells", "prevalence", "prevalence_cells", "death", "visits", "events", "first_age")
    fams = release(exact_counts(timelines, spec, first))
    # stage 2: the pair codes come from the noisy stage-1 release (adaptive composition, zCDP)
    spec.pair_codes = choose_pair_codes(spec, np.asarray(fams["cells"]["counts"]),
                                        np.asarray(fams["prevalence"]["counts"]), pair_codes)
    spec.__post_init__()
    sens = spec.sensitivities()
    fams.update(release(exact_counts(timelines, spec, ("pairs_absent", "top_prevalence", "top_held"))))
    doc = {"format": FORMAT, "dp": dp, "spec": spec.to_json(), "families": fams}
    if dp:
        eps_check = epsilon_check(doc, delta)
        report = {"mechanism": "discrete Gaussian per family (OpenDP, zCDP composition), bounded contribution "
                               "(see fhirsynth/model/measurements.py)",
                  "epsilon": epsilon, "delta": delta, "epsilon_check": eps_check, "sigma0": sigma0,
                  "families": {f: {"sigma": v["sigma"], "sensitivity": v["sensitivity"], "rho_share": v["rho_share"],
                                   "queries": len(v["counts"])} for f, v in fams.items()},
                  "file": MEASUREMENTS}
        if eps_check > epsilon * (1 + 1e-6):
            raise ValueError(f"measurement epsilon {eps_check} exceeds its share {epsilon} (accounting bug)")
    else:
        report = {"mechanism": "exact counts (no DP)", "epsilon": None, "delta": None, "file": MEASUREMENTS}
    log.info("measured %d statistics (%s)", sum(len(v["counts"]) for v in fams.values()),
             ", ".join(f"{f} {len(v['counts'])}" for f, v in fams.items()))
    return doc, report


def total_rho(doc: dict[str, Any]) -> float:
    """zCDP rho of the released families: sum of sensitivity^2 / (2 sigma^2)."""
    return sum(v["sensitivity"] ** 2 / (2 * v["sigma"] ** 2) for v in doc["families"].values())


def epsilon_check(doc: dict[str, Any], delta: float) -> float:
    """OpenDP's epsilon at delta of the composed release: one discrete Gaussian with the same total rho."""
    return gaussian_epsilon(1.0 / math.sqrt(2 * total_rho(doc)), delta, 1.0)


def load(model_dir) -> dict[str, Any] | None:
    """The model's measurements, or None when it has none (older models, or trained with measurement share 0)."""
    import json
    from pathlib import Path

    from fhirsynth.errors import ModelDirError

    path = Path(model_dir) / MEASUREMENTS
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT:
            raise ModelDirError(f"measurements format {doc.get('format')!r} is not {FORMAT}; retrain the model",
                                where=str(path))
        Spec.from_json(doc["spec"])
        for f, size in Spec.from_json(doc["spec"]).sizes().items():
            if size == 0 and f not in doc["families"]:
                continue  # a family this document predates
            if len(doc["families"][f]["counts"]) != size:
                raise ValueError(f"family {f} has {len(doc['families'][f]['counts'])} counts, expected {size}")
            # what calibrate.targets reads: numeric counts and a noise scale
            if not np.isfinite(np.asarray(doc["families"][f]["counts"], dtype=float)).all() \
                    or not float(doc["families"][f]["sigma"]) >= 0:
                raise ValueError(f"family {f}: counts or sigma are not finite numbers")
    except ModelDirError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelDirError(f"unreadable measurements ({exc})", where=str(path)) from None
    return doc


def first_age_support(counts: np.ndarray, sigma: float) -> np.ndarray:
    """Buckets where the cohort's records begin, from the released [N_CELLS, buckets] counts: every bucket of a
    window of FIRST_AGE_WINDOW neighbours whose summed count over all cells passes FIRST_AGE_SUPPORT_SDS noise SDs.
    One cell's bucket passing its own floor is often noise: in a small cohort (es-ips, 120 patients in 8 cells)
    the true buckets hold 4-10 patients a cell, and of 368 counts at sigma 7 the few that pass 2 SDs by chance lay
    at 1-5 years where every real record began in its first two months."""
    total = counts.sum(axis=0)
    nb, w = len(total), FIRST_AGE_WINDOW
    sd = float(sigma) * math.sqrt(counts.shape[0] * w)
    support = np.zeros(nb, dtype=bool)
    for lo in range(0, max(nb - w, 0) + 1):
        if total[lo: lo + w].sum() >= FIRST_AGE_SUPPORT_SDS * sd:
            support[lo: lo + w] |= total[lo: lo + w] > 0
    return support


def first_age_prior(doc: dict[str, Any] | None) -> np.ndarray | None:
    """P(first-visit age bucket | cell) from the released counts, as [N_CELLS, len(FIRST_AGE_EDGES)]: inside the
    cohort's support (first_age_support), a cell's counts under FIRST_AGE_FLOOR noise SDs are taken as 0 (most
    buckets are empty: a simulator's records all start at birth, and clipped noise alone would put a third of a
    small cell's mass in empty buckets); a cell with no mass left takes the cohort's histogram over the support; no
    support at all: no constraint (rows of NaN). None when the document lacks the family. Post-processing."""
    if doc is None or "first_age" not in doc["families"]:
        return None
    fam = doc["families"]["first_age"]
    sigma = float(fam["sigma"])
    counts = np.asarray(fam["counts"], dtype=float).reshape(N_CELLS, len(FIRST_AGE_EDGES))
    support = first_age_support(counts, sigma)
    if not support.any():
        return np.full(counts.shape, np.nan)
    c = np.where((counts >= max(FIRST_AGE_FLOOR * sigma, 1.0)) & support, counts, 0.0)
    cohort = np.where(support, np.clip(counts.sum(axis=0), 0.0, None), 0.0)
    cohort = cohort / cohort.sum()
    tot = c.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, c / tot, cohort[None, :])
