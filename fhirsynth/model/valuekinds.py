"""Which kind of value each observation code carries (none, a quantity, a coded answer): a DP release.

The sampler gives an observation only a value kind that this release allows for its code: a numeric code
recorded with a quantity always gets one, a code the data records without a value gets none, a coded code gets
an answer (visits.py). Learned from the data, so it is a release like any other (vocab.py): per patient the set
of (code, kind) pairs seen, at most k pairs per patient (the least frequent), counts of distinct patients per
pair, discrete Gaussian noise for L2 sensitivity sqrt(k). The pairs range over the already released vocabulary
times three kinds, so no set-union threshold is needed: every noisy count is released. Post-processing: a kind
is allowed when its noisy count reaches KIND_MIN_SHARE of the code's noisy total and a floor of 3 sigma. A code
with no kind above the floor (at epsilon 8 the floor is about 160 patients on 800, and above every count on a
cohort of 120) gets, in this order: the kinds a public prior model holds for it (prior.py; public, no budget); a
quantity when the code has value bins (public reference ranges, or DP bins, which are only released for codes
the data records with numbers); a quantity too (its value then withheld, below) when the quantity count leads
none and coded by QUANTITY_LEAD_SD noise SDs; else none or coded, whichever has the larger noisy count (falling back to
"none or coded" once let the model write 17,108 observations of 18 codes with a kind the data never has; the
noisy argmax alone, with a prior on the 120-patient es-ips cohort, allowed 90-101 of 226 observed codes a kind
the data never records, BENCHMARKS.md). A code whose only kind is a quantity but which has no value bins (no DP
bins were released for it) has its value withheld (vocab.Vocab.value_withheld): it is sampled, and written with
dataAbsentReason "masked", not with a made-up value nor with a kind the data never has. (Never sampling it, as
before, lost 13 laboratory and survey codes held by 10-20% of the patients on the US cohort at epsilon 8.)
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from fhirsynth.model.dpnoise import NoiseSource, gaussian_sigma
from fhirsynth.timeline.types import DATA_ABSENT_SYSTEM, Timeline

KINDS = ("none", "quantity", "coded")
NONE, QUANTITY, CODED = KINDS.index("none"), KINDS.index("quantity"), KINDS.index("coded")
# under the floor and without bins, a code whose quantity count leads the others by this many noise SDs is a
# numeric code: it gets "quantity" (and is then never sampled, having no bins) rather than a kind it never has
QUANTITY_LEAD_SD = 1.0
KIND_MIN_SHARE = 0.05
# the share of the items' (epsilon, delta) that the value kinds take (build_vocab)
KIND_EPSILON_FRACTION = 0.2  # items 0.56, value kinds 0.14 of the preprocessing epsilon
KIND_DELTA_FRACTION = 0.1
KIND_FLOOR_SD = 3.0  # noise SDs a kind's count must reach to be allowed


def _kind(ev) -> str:
    if ev.value is not None:
        return "quantity"
    # a dataAbsentReason (value_system DATA_ABSENT_SYSTEM) is no value
    return "coded" if ev.value_code is not None and ev.value_system != DATA_ABSENT_SYSTEM else "none"


def release_value_kinds(timelines: list[Timeline], vocab, *, k: int, dp: bool, epsilon: float | None,
                        delta: float | None, noise: NoiseSource, prior_kinds: dict[tuple, list[str]] | None = None
                        ) -> tuple[dict[int, list[str]], dict[str, Any]]:
    """{item index: allowed kinds} for the vocabulary's observation items, and the mechanism's report.
    prior_kinds: item key -> kinds of a public prior model, for the codes the release leaves undecided."""
    from fhirsynth.model.tokenizer import Tokenizer

    matcher = Tokenizer(vocab).matcher  # the events' items exactly as the encoder maps them
    obs = [i for i, it in enumerate(vocab.items) if it.kind == "observation"]
    bins = {i: vocab.item_bins(vocab.items[i]) for i in obs}
    col = {(i, kind): j for j, (i, kind) in enumerate((i, kd) for i in obs for kd in KINDS)}
    counts = np.zeros(len(col), dtype=np.int64)
    for tl in timelines:
        per: Counter = Counter()
        for ev in tl.events:
            if ev.kind != "observation":
                continue
            key = matcher.event_key(ev)
            i = vocab.item_index.get(key) if key is not None else None
            if i is None or i not in bins:
                continue
            per[(i, _kind(ev))] += 1
        # the k pairs a patient recorded LEAST often: vitals recorded at every visit reach the floor from nearly every
        # patient anyway, while a lab done once a year would otherwise never be counted (measured at epsilon 8 on
        # the US cohort: most-frequent-first left 49 of 94 codes with a kind the data never has at k = 16, 7-10 at
        # k = 64; least-frequent-first at k = 64: see BENCHMARKS.md)
        chosen = [p for p, _ in sorted(per.items(), key=lambda kv: (kv[1], kv[0]))]
        for p in (chosen[:k] if dp else chosen):
            counts[col[p]] += 1
    if dp:
        assert epsilon is not None and delta is not None
        sigma = gaussian_sigma(epsilon, delta, math.sqrt(k))
        noisy = noise.gaussian(counts, sigma).astype(np.float64)
        floor, sd = KIND_FLOOR_SD * sigma, sigma
        report: dict[str, Any] = {"mechanism": "discrete Gaussian histogram of distinct patients per (observation "
                                               "item, value kind), at most k pairs per patient",
                                  "max_pairs_per_patient": k, "sigma": sigma, "epsilon": epsilon, "delta": delta}
    else:
        noisy, floor, sd = counts.astype(np.float64), 1.0, 0.0
        report = {"mechanism": "exact counts (no DP)", "epsilon": None, "delta": None}
    allowed: dict[int, list[str]] = {}
    undecided: Counter = Counter()
    for i in obs:
        c = np.array([max(noisy[col[(i, kd)]], 0.0) for kd in KINDS])
        total = c.sum()
        ok = [kd for kd, x in zip(KINDS, c) if x >= floor and x >= KIND_MIN_SHARE * total]
        if not ok:  # nothing above the floor: public knowledge first, then the noisy counts
            from_prior = (prior_kinds or {}).get(vocab.items[i].key)
            if from_prior:
                ok, why = list(from_prior), "prior"
            elif bins[i] is not None:
                ok, why = ["quantity"], "bins"
            elif c[QUANTITY] - max(c[NONE], c[CODED]) > QUANTITY_LEAD_SD * sd:  # (counts are clipped at 0)
                # recorded with numbers, but no bins to draw one from: its value is withheld ("masked",
                # Vocab.value_withheld), not written as "none", a kind the data never has (US, epsilon 8: five
                # specific-IgE codes were, 524 observations)
                ok, why = ["quantity"], "quantity without bins"
            elif max(c[NONE], c[CODED]) > 0:  # no bins, so no quantity to draw: the larger of none and coded
                ok, why = ["none" if c[NONE] >= c[CODED] else "coded"], "largest count"
            else:  # no count at all (a public code the data lacks)
                ok, why = ["none", "coded"], "none counted"
            undecided[why] += 1
        allowed[i] = ok
    report["codes_with_each_kind"] = {kd: sum(kd in v for v in allowed.values()) for kd in KINDS}
    report["codes_under_the_floor"] = dict(undecided)  # how the undecided codes got their kinds
    return allowed, report
