"""The visit representation: a patient as a static part and a sequence of visits, newest first.

The visit model (visitmodel.py) reads and writes this; it is built on the token grammar's encoder, so events map
to vocabulary items, values to bins and times to buckets exactly as there (tokenizer.py), only without the
length compression: a visit costs one position, so a record keeps its repeated vitals, its labs followed over
years and its chronic care. What a patient is here:

    static:  sex, birth band, race, ethnicity, deceased + death age (years)
    visits:  newest first (as tokenizer.py explains: a record starts at the present, and running out of context
             drops the oldest history); each one a gap back in time (GAP bucket), its age (years, and under
             three years its week or month: bins.early_age_id), an encounter class (or none: events grouped by
             day), an encounter type and duration, and a set of content entries
             (conditions, observations, medications, immunizations, procedures, allergies), each with one value
             from its own value space, how many times it occurs in the visit with that value (bins.REPEAT_EDGES:
             a vital written twice, a lab repeated through a stay) and how long before the visit's start its own
             time lies (a GAP bucket, 0 = the visit's day: a condition's onset before the encounter that records
             it, 4% of the US cohort's events and a fifth of its days with events):
               observation: one of the value kinds released for its code (valuekinds.py): none, a bin of its
               public / DP value bins (a quantity in its unit), or a coded answer (a value item that is not a
               public encounter type: no visit concept as a lab value);
               condition: none (still active) or its duration bucket (onset -> abatement);
               medication, procedure: none or the duration bucket of the course / performed period (the item
               itself carries the reason, vocab.REASON_KINDS);
               immunization: none (given at the visit's time);
               allergy: none or a criticality (a value item of CRITICALITY_SYSTEM).
    END:     no older history (a record longer than max_visits keeps its newest visits and has no END).

A sampled patient is written back as tokens of the same grammar plus the in-bucket draws, and decoded by
Tokenizer.decode: one decoder for both models.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from fhirsynth.model.bins import (DAYS_PER_YEAR, EARLY_AGE_EDGES, GAP_EDGES, bucket_of, early_age_id,
                                  repeat_bucket)
from fhirsynth.model.grammar import Grammar, replay
from fhirsynth.model.tokenizer import AGE_UNKNOWN, Tokenizer, age_id
from fhirsynth.model.tokenizer import DUR_KINDS
from fhirsynth.model.vocab import CONTENT_KINDS, Vocab
from fhirsynth.timeline.types import CRITICALITY_SYSTEM, Timeline

NONE = 0  # "no value" / "no encounter" in every categorical space below


class VisitLayout:
    """Index spaces of the visit model, all derived from the vocabulary (which is public or DP-released).

    enc:      encounter classes, categorical 1..NE (0 = a day without an encounter)
    etype:    encounter types (value items), 1..NT (0 = none)
    content:  condition and observation items, multi-label 0..NC-1
    values:   0 = none | 1..n_val = value bin | answers | duration buckets (value_id below)
    features: the multi-hot input of one visit: class, type, encounter duration, content items, (binned item,
              bin) pairs (so the model sees each code's own value: trajectories), answers, condition durations
    """

    def __init__(self, vocab: Vocab) -> None:
        self.vocab = v = vocab
        base = v.start("item")
        kinds = [it.kind for it in v.items]
        self.enc_tokens = [base + i for i, k in enumerate(kinds) if k == "encounter"]
        self.type_tokens = [base + i for i, k in enumerate(kinds) if k == "value"]
        self.content_tokens = [base + i for i, k in enumerate(kinds) if k in CONTENT_KINDS]
        # answers: value items that are not public encounter types (those are visit concepts, not results)
        self.answer_tokens = [base + i for i, it in enumerate(v.items) if it.kind == "value" and not it.public]
        self.enc_index = {t: j + 1 for j, t in enumerate(self.enc_tokens)}
        self.type_index = {t: j + 1 for j, t in enumerate(self.type_tokens)}
        self.content_index = {t: j for j, t in enumerate(self.content_tokens)}
        self.answer_index = {t: j for j, t in enumerate(self.answer_tokens)}
        self.NE, self.NT, self.NC, self.NA = (len(self.enc_tokens), len(self.type_tokens), len(self.content_tokens),
                                              len(self.answer_tokens))
        self.n_val, self.n_dur, self.n_gap = v.n_val, v.n_dur, v.n_gap
        self.n_values = 1 + self.n_val + self.NA + self.n_dur
        # per content item: bins (numeric), condition, or coded observation
        self.n_bins = np.zeros(self.NC, dtype=np.int64)
        self.is_condition = np.zeros(self.NC, dtype=bool)
        allowed = np.zeros((self.NC, self.n_values), dtype=bool)
        # criticality answers: the only coded values an allergy may take
        crit = [a for a, t in enumerate(self.answer_tokens) if v.item_of(t).system == CRITICALITY_SYSTEM]
        for j, tok in enumerate(self.content_tokens):
            it = v.item_of(tok)
            vb = v.item_bins(it)
            if it.kind in DUR_KINDS:  # condition, medication, procedure: none or a duration
                self.is_condition[j] = it.kind == "condition"
                allowed[j, NONE] = True
                allowed[j, self.dur_value(0): self.dur_value(0) + self.n_dur] = True
            elif it.kind in ("immunization", "allergy"):
                allowed[j, NONE] = True
                if it.kind == "allergy":
                    allowed[j, [self.answer_value(a) for a in crit]] = True
            else:
                # the value kinds released for this code (valuekinds.py); without a release: what its bins say
                kinds = (v.value_kinds or {}).get(tok - base)
                if kinds is None:
                    kinds = ["quantity"] if vb is not None else ["none", "coded"]
                if vb is not None:
                    self.n_bins[j] = vb.n_bins
                    if "quantity" in kinds:
                        allowed[j, 1: 1 + vb.n_bins] = True
                if "none" in kinds:
                    allowed[j, NONE] = True
                if "coded" in kinds:
                    allowed[j, 1 + self.n_val: 1 + self.n_val + self.NA] = True
                    allowed[j, [self.answer_value(a) for a in crit]] = False  # an allergy's criticality only
                if not allowed[j].any():  # only quantities, and no bins to draw one from
                    allowed[j, NONE] = True  # no value: decoding writes it withheld (Vocab.value_withheld)
        self.allowed = allowed
        # encounter types that may be drawn (index 0 = none): never an allergy's criticality
        self.type_ok = np.ones(self.NT + 1, dtype=bool)
        self.type_ok[[self.type_index[t] for t in self.type_tokens if v.item_of(t).system == CRITICALITY_SYSTEM]] = False
        # feature offsets
        off = 0
        self.f_enc = off; off += self.NE
        self.f_type = off; off += self.NT
        self.f_edur = off; off += self.n_dur
        self.f_item = off; off += self.NC
        self.f_pair = np.full(self.NC, -1, dtype=np.int64)  # first (item, bin) feature of each binned item
        for j in range(self.NC):
            if self.n_bins[j]:
                self.f_pair[j] = off
                off += int(self.n_bins[j])
        self.f_answer = off; off += self.NA
        self.f_cdur = off; off += self.n_dur
        self.n_features = off
        # panels: members of one public panel (e.g. blood pressure) come together (complete panels)
        groups: dict[tuple, list[int]] = {}
        for j, tok in enumerate(self.content_tokens):
            it = v.item_of(tok)
            if it.kind == "observation" and it.panel_code and it.public:
                groups.setdefault((it.panel_system, it.panel_code), []).append(j)
        self.panels = [g for g in groups.values() if len(g) > 1]

    def dur_value(self, d: int) -> int:
        return 1 + self.n_val + self.NA + d

    def answer_value(self, a: int) -> int:
        return 1 + self.n_val + a

    def value_feature(self, j: int, value: int) -> int | None:
        """The input feature of content item j's value, or None (no value)."""
        if value == NONE:
            return None
        if value <= self.n_val:
            return int(self.f_pair[j]) + value - 1 if self.f_pair[j] >= 0 else None
        if value <= self.n_val + self.NA:
            return self.f_answer + value - 1 - self.n_val
        return self.f_cdur + value - 1 - self.n_val - self.NA


@dataclass
class PatientVisits:
    """One encoded patient (arrays over visits, newest first)."""

    sex: int
    band: int
    race: int
    eth: int
    dead: int
    death_age: int  # years (0 when alive)
    end_age: int  # age id at the reference date (the deceased too: the death has its own age, death_age)
    end_early: int  # early-age id there (bins.early_age_id)
    truncated: bool  # older visits exist beyond max_visits (no END target)
    gap: np.ndarray  # [T] gap bucket
    age: np.ndarray  # [T] age id of the visit
    early: np.ndarray  # [T] early-age id of the visit (bins.early_age_id: weeks and months up to 3 years)
    enc: np.ndarray  # [T] 0 | 1 + encounter class
    etype: np.ndarray  # [T] 0 | 1 + encounter type
    edur: np.ndarray  # [T] 0 | 1 + duration bucket
    item_visit: np.ndarray  # [M] visit of each content entry
    item: np.ndarray  # [M] content index
    value: np.ndarray  # [M] value id (NONE: no value; scored only where the code's value kinds allow it)
    prev: np.ndarray  # [M] the input feature of the same code's value at its last earlier-drawn (newer) visit,
    #                   or layout.n_features: none (the value head reads it: a patient's values stay coherent)
    count: np.ndarray  # [M] how many times the entry (item, value and lead) occurs in its visit (>= 1)
    lead: np.ndarray  # [M] GAP bucket of how long before the visit's start the entry lies (0: the visit's day)


def encode_visits(tokenizer: Tokenizer, layout: VisitLayout, tl: Timeline, max_visits: int,
                  stats: Counter | None = None) -> PatientVisits | None:
    """A timeline as PatientVisits (None without a birth date), through the token encoder without compression."""
    stats = stats if stats is not None else Counter()
    leads: list[float] = []
    got = tokenizer.encode_with_days(tl, stats, compress=False, keep_repeats=True, leads=leads)
    if got is None:
        return None
    toks, days = got
    ages = [age_id(d) for d in days]
    v = layout.vocab
    groups = [v.group_of(t) for t in toks]
    sex = toks[1] - v.start("sex")
    band = toks[2] - v.start("by")
    race = toks[3] - v.start("race")
    eth = toks[4] - v.start("eth")
    end_age, end_early = ages[4], early_age_id(days[4])
    i, dead, death_age = 5, 0, 0
    if i < len(toks) and toks[i] == v.DEATH:
        dead, death_age = 1, toks[i + 1] - v.start("age")
        i += 2
    gap, age, early, enc, etype, edur = [], [], [], [], [], []
    iv, item, value, lead = [], [], [], []
    truncated = True
    last_j = -1  # content index of the last content entry (its value follows)
    last_kind = ""
    while i < len(toks):
        g, t = groups[i], toks[i]
        if g == "end":
            truncated = False
            break
        if g == "gap":
            if len(gap) == max_visits:
                break  # older visits do not fit: a window over the newest ones, no END
            gap.append(t - v.start("gap"))
            age.append(ages[i])
            early.append(early_age_id(days[i]))
            enc.append(NONE)
            etype.append(NONE)
            edur.append(NONE)
            last_kind = ""
        elif g == "item":
            it = v.item_of(t)
            if it.kind == "encounter":
                enc[-1] = layout.enc_index[t]
                last_kind = "encounter"
            elif it.kind == "value":
                if last_kind == "encounter":
                    etype[-1] = layout.type_index[t]
                elif last_kind == "observation" and t in layout.answer_index and not layout.n_bins[last_j]:
                    value[-1] = layout.answer_value(layout.answer_index[t])
                elif (last_kind == "allergy" and t in layout.answer_index
                      and layout.allowed[last_j, layout.answer_value(layout.answer_index[t])]):
                    value[-1] = layout.answer_value(layout.answer_index[t])  # its criticality
                else:
                    stats["answers_not_allowed_dropped"] += 1
            else:
                last_j = layout.content_index[t]
                last_kind = it.kind
                iv.append(len(gap) - 1)
                item.append(last_j)
                value.append(NONE)  # until a value token follows
                lead.append(bucket_of(leads[i], GAP_EDGES))
        elif g == "dur":
            d = t - v.start("dur")
            if last_kind == "encounter":
                edur[-1] = 1 + d
            elif last_kind in DUR_KINDS:
                value[-1] = layout.dur_value(d)
        elif g == "val":
            b = t - v.start("val")
            if last_kind == "observation" and b < layout.n_bins[last_j]:
                value[-1] = 1 + b
        i += 1
    iv, item, value, lead, count = merge_repeats(iv, item, value, lead, stats)
    a = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return PatientVisits(sex, band, race, eth, dead, death_age, end_age, end_early, truncated, a(gap), a(age),
                         a(early), a(enc), a(etype), a(edur), a(iv), a(item), a(value),
                         a(previous_values(layout, iv, item, value)), a(count), a(lead))


def merge_repeats(iv: list[int], item: list[int], value: list[int], lead: list[int], stats: Counter
                  ) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """One entry per (visit, item, value, lead) with its count. The tokenizer writes a visit's entries sorted by
    item and value, so repeats are adjacent (two copies with different leads stay two entries)."""
    out: list[tuple[int, int, int, int]] = []
    count: list[int] = []
    for key in zip(iv, item, value, lead):
        if out and out[-1] == key:
            count[-1] += 1
            stats["repeats_in_visit_counted"] += 1
            continue
        out.append(key)
        count.append(1)
    cols = [list(c) for c in zip(*out)] if out else [[], [], [], []]
    return cols[0], cols[1], cols[2], cols[3], count


def previous_values(layout: VisitLayout, iv: list[int], item: list[int], value: list[int]) -> list[int]:
    """For each content entry, the value feature of the same code at the nearest visit drawn before it (the
    newer one: visits are drawn newest first), or n_features; entries of one visit do not see each other."""
    last: dict[int, int] = {}
    out: list[int] = []
    pending: list[tuple[int, int]] = []
    cur = -1
    for t, j, val in zip(iv, item, value):
        if t != cur:
            for jj, f in pending:
                last[jj] = f
            pending, cur = [], t
        out.append(last.get(j, layout.n_features))
        f = layout.value_feature(j, val) if val >= 0 else None
        pending.append((j, layout.n_features if f is None else f))
    return out


def visit_tokens(layout: VisitLayout, p: PatientVisits) -> list[int]:
    """The token-grammar sequence of an encoded patient (what the sampler writes for Tokenizer.decode); equal to
    the uncompressed token encoding except for what encode_visits drops (counted in its stats)."""
    return visit_tokens_and_leads(layout, p)[0]


def visit_tokens_and_leads(layout: VisitLayout, p: PatientVisits) -> tuple[list[int], list[int]]:
    """visit_tokens, and beside every token its entry's lead bucket (0 at every other token)."""
    v = layout.vocab
    toks = [v.BOS, v.start("sex") + p.sex, v.start("by") + p.band, v.start("race") + p.race, v.start("eth") + p.eth]
    if p.dead:
        toks += [v.DEATH, v.start("age") + p.death_age]
    leads = [0] * len(toks)
    per_visit: list[list[int]] = [[] for _ in range(len(p.gap))]
    per_lead: list[list[int]] = [[] for _ in range(len(p.gap))]
    for t, j, val, c, ld in zip(p.item_visit.tolist(), p.item.tolist(), p.value.tolist(), p.count.tolist(),
                                p.lead.tolist()):
        entry = [layout.content_tokens[j]]
        if val > NONE:
            if val <= layout.n_val:
                entry.append(v.start("val") + val - 1)
            elif val <= layout.n_val + layout.NA:
                entry.append(layout.answer_tokens[val - 1 - layout.n_val])
            else:
                entry.append(v.start("dur") + val - layout.dur_value(0))
        per_visit[t] += entry * c
        per_lead[t] += ([ld] + [0] * (len(entry) - 1)) * c
    for t in range(len(p.gap)):
        head = [v.start("gap") + int(p.gap[t])]
        if p.enc[t]:
            head.append(layout.enc_tokens[int(p.enc[t]) - 1])
            if p.etype[t]:
                head.append(layout.type_tokens[int(p.etype[t]) - 1])
            if p.edur[t]:
                head.append(v.start("dur") + int(p.edur[t]) - 1)
        toks += head + per_visit[t]
        leads += [0] * len(head) + per_lead[t]
    if not p.truncated:
        toks.append(v.END)
        leads.append(0)
    return toks, leads


def lead_days(bucket: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Days before the visit inside each lead's GAP bucket (u uniform in [0, 1), float64); bucket 0 is the visit
    itself. The sampler and the encode/decode ceiling both place leads with it."""
    edges = torch.as_tensor(GAP_EDGES, dtype=torch.float64, device=bucket.device)
    days = edges[bucket] + u * (edges[bucket + 1] - edges[bucket])
    return torch.where(bucket > 0, days, torch.zeros_like(days))


def visit_time_draws(layout: VisitLayout, grammar: Grammar, p: PatientVisits, rng: np.random.Generator
                     ) -> list[float]:
    """Times for visit_tokens(layout, p) (NaN at the tokens without one) that use everything the representation
    holds: the birth day inside the band AND the age at the reference date, the death inside its age year, and
    every visit inside its own age year as well as its gap bucket (grammar.replay's `times`); under three years
    the week or month as well (bins.early_age_id). Drawing each gap uniformly in its bucket alone drifts: a
    yearly wellness gap of ~365 days is drawn in [362, 512), and over a hundred visits the sum runs past the
    birth date drawn anywhere in a 5-year band (the oldest visits then pile onto the birth day)."""
    Y = DAYS_PER_YEAR
    toks = visit_tokens(layout, p)
    out = [float("nan")] * len(toks)
    # birth day number: lived = ref_end - birth in [end_age, end_age + 1) years
    e_edges = np.asarray(EARLY_AGE_EDGES, dtype=np.float64)
    l_lo, l_hi = p.end_age * Y, (p.end_age + 1) * Y
    if p.end_early and not p.dead:  # an infant at the reference date: its week or month as well
        l_lo, l_hi = max(l_lo, e_edges[p.end_early - 1]), min(l_hi, e_edges[p.end_early])
    lo = max(float(grammar.band_lo[p.band]), np.floor(grammar.ref_end - l_hi) + 1)
    hi = min(float(grammar.band_hi[p.band]), np.floor(grammar.ref_end - l_lo))
    if lo > hi:  # the age id was clamped (very old): the band alone
        lo, hi = float(grammar.band_lo[p.band]), float(grammar.band_hi[p.band])
    birth = float(np.floor(lo + rng.random() * (hi - lo + 1)))
    birth = min(birth, hi)
    out[2] = birth
    end = grammar.ref_end - birth
    if p.dead:
        a_lo, a_hi = p.death_age * Y, min((p.death_age + 1) * Y, end)
        if p.end_early:  # died an infant: in its week or month as well
            a_lo, a_hi = max(a_lo, e_edges[p.end_early - 1]), min(a_hi, e_edges[p.end_early])
        end = a_lo + rng.random() * max(a_hi - a_lo, 0.0)
        out[6] = end
    # feasible interval of every visit: its age year, and its gap bucket back from the feasible interval of the
    # newer one (forward pass), then narrowed by the older ones (backward pass); drawn newest first inside it, so
    # that the errors of earlier draws never push a later visit out of its age year
    n = len(p.gap)
    eps = 1e-3  # days: keeps a time off the age year's upper edge after rounding to microseconds
    glo = np.asarray(GAP_EDGES, dtype=np.float64)[p.gap]
    ghi = np.asarray(GAP_EDGES, dtype=np.float64)[p.gap + 1]
    old = p.age >= AGE_UNKNOWN - 1  # the last age id holds every older age
    w_lo = np.where(old, 0.0, p.age * Y)
    w_hi = np.minimum(np.where(old, end, (p.age + 1) * Y - eps), end)
    early = p.early > 0  # under three years: the visit's week or month as well
    w_lo = np.where(early, np.maximum(w_lo, e_edges[np.maximum(p.early - 1, 0)]), w_lo)
    w_hi = np.where(early, np.minimum(w_hi, e_edges[np.minimum(p.early, len(e_edges) - 1)] - eps), w_hi)
    f_lo, f_hi = w_lo.copy(), w_hi.copy()
    prev_lo = prev_hi = end
    for t in range(n):
        lo, hi = max(w_lo[t], prev_lo - ghi[t]), min(w_hi[t], prev_hi - glo[t])
        if lo <= hi:
            f_lo[t], f_hi[t] = lo, hi
        prev_lo, prev_hi = f_lo[t], f_hi[t]
    for t in range(n - 2, -1, -1):
        lo, hi = max(f_lo[t], f_lo[t + 1] + glo[t + 1]), min(f_hi[t], f_hi[t + 1] + ghi[t + 1])
        if lo <= hi:
            f_lo[t], f_hi[t] = lo, hi
    g0, g1 = layout.vocab.offsets["gap"]
    cur, t = end, 0
    for i, tok in enumerate(toks):
        if not g0 <= tok < g1:
            continue
        lo = max(f_lo[t], cur - ghi[t], 0.0)
        hi = min(f_hi[t], cur - glo[t], cur)
        if lo > hi:  # no time fits every constraint (birth drawn inside the band): the age year's feasible part
            lo, hi = max(min(f_lo[t], cur), 0.0), max(min(f_hi[t], cur), 0.0)
        cur = lo + rng.random() * (hi - lo)
        out[i] = cur
        t += 1
    return out


def decode_encoded(tokenizer: Tokenizer, layout: VisitLayout, patients: list[PatientVisits], seed: int = 0,
                   id_prefix: str = "rt") -> list[Timeline]:
    """Encoded patients back to timelines through the shared decoder, times placed by visit_time_draws (the
    encode/decode ceiling of benchmarks/bench_records.py: what the visit representation keeps)."""
    both = [visit_tokens_and_leads(layout, p) for p in patients]
    seqs = [s for s, _ in both]
    if not seqs:
        return []
    L = max(len(s) for s in seqs)
    batch = torch.full((len(seqs), L), layout.vocab.PAD, dtype=torch.long)
    times = torch.full((len(seqs), L), float("nan"), dtype=torch.float64)
    grammar = Grammar(layout.vocab, None, max(layout.vocab.cfg.max_len, L), torch.device("cpu"))
    rng = np.random.default_rng(seed)
    for i, (p, s) in enumerate(zip(patients, seqs)):
        batch[i, : len(s)] = torch.tensor(s)
        times[i, : len(s)] = torch.tensor(visit_time_draws(layout, grammar, p, rng), dtype=torch.float64)
    draws = replay(grammar, batch, torch.Generator().manual_seed(seed), times=times)
    out = []
    for i, (s, lb) in enumerate(both):
        d = draws[i, : len(s)].numpy().copy()
        lb_a = np.asarray(lb, dtype=np.int64)
        at = np.flatnonzero(lb_a)
        if at.size:  # an entry's draw is its lead in days, never before birth (the visit's time, carried forward)
            visit_time = times[i, : len(s)].numpy().copy()
            for k in range(1, len(visit_time)):
                if np.isnan(visit_time[k]):
                    visit_time[k] = visit_time[k - 1]
            lead = lead_days(torch.from_numpy(lb_a[at]), torch.from_numpy(rng.random(at.size))).numpy()
            d[at] = np.minimum(lead, np.nan_to_num(visit_time[at]))
        out.append(tokenizer.decode(s, d.tolist(), f"{id_prefix}-{i}"))
    return out


def visit_features(layout: VisitLayout, p: PatientVisits) -> list[list[int]]:
    """The active input features of each visit."""
    feats: list[list[int]] = [[] for _ in range(len(p.gap))]
    for t in range(len(p.gap)):
        if p.enc[t]:
            feats[t].append(layout.f_enc + int(p.enc[t]) - 1)
        if p.etype[t]:
            feats[t].append(layout.f_type + int(p.etype[t]) - 1)
        if p.edur[t]:
            feats[t].append(layout.f_edur + int(p.edur[t]) - 1)
    for t, j, val in zip(p.item_visit, p.item, p.value):
        feats[t].append(layout.f_item + int(j))
        f = layout.value_feature(int(j), int(val)) if val >= 0 else None
        if f is not None:
            feats[t].append(f)
    return feats


class VisitDataset(Dataset):
    """One item per patient, as the tensor [i]: Opacus derives an empty Poisson batch's structure from the first
    item's tensors, so the item is a tensor; VisitCollate looks the patient up in `items` ((PatientVisits, its
    features))."""

    def __init__(self, patients: list[PatientVisits], layout: VisitLayout) -> None:
        self.items = [(p, visit_features(layout, p)) for p in patients]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i], dtype=torch.long)


def visit_dataset(tokenizer: Tokenizer, layout: VisitLayout, timelines: list[Timeline], max_visits: int,
                  stats: Counter) -> tuple[VisitDataset, VisitCollate, list[int]]:
    """The encodable timelines as a dataset with its collate function, and their indices in `timelines` (a
    patient without a birth date is left out, counted in stats)."""
    encoded = [encode_visits(tokenizer, layout, t, max_visits, stats) for t in timelines]
    kept = [i for i, p in enumerate(encoded) if p is not None]
    dataset = VisitDataset([encoded[i] for i in kept], layout)
    return dataset, VisitCollate(layout, dataset), kept


BATCH_KEYS = ("feats", "gap_in", "age_in", "early_in", "static", "eg_tgt", "gq", "aq", "eq", "x_tgt", "enc_tgt",
              "type_tgt", "edur_tgt", "vi_pos", "vi_item", "vi_val", "vi_prev", "vi_rep", "vi_lead")


class VisitCollate:
    """Patients -> a dict of batch-first tensors. Position 0 is the static part; position t >= 1 is visit t (the
    t-th newest); the outputs at position t predict visit t + 1 (or END)."""

    def __init__(self, layout: VisitLayout, dataset: VisitDataset | None = None) -> None:
        self.layout = layout
        self.dataset = dataset

    def __call__(self, batch: list) -> dict[str, torch.Tensor]:
        """batch: VisitDataset items (tensors [i]) or (PatientVisits, features) pairs."""
        L = self.layout
        batch = [self.dataset.items[int(x[0])] if isinstance(x, torch.Tensor) else x for x in batch]
        B = len(batch)
        T = max([len(p.gap) for p, _ in batch], default=0) + 1
        M = max([len(p.item) for p, _ in batch], default=0) or 1
        feats = torch.zeros((B, T, L.n_features))
        gap_in = torch.full((B, T), L.n_gap, dtype=torch.long)  # n_gap = "no gap" (the static position)
        age_in = torch.full((B, T), AGE_UNKNOWN, dtype=torch.long)
        early_in = torch.zeros((B, T), dtype=torch.long)
        static = torch.zeros((B, 6), dtype=torch.long)
        eg_tgt = torch.full((B, T), -1, dtype=torch.long)
        gq = torch.zeros((B, T), dtype=torch.long)
        aq = torch.zeros((B, T), dtype=torch.long)
        eq = torch.zeros((B, T), dtype=torch.long)
        x_tgt = torch.zeros((B, T, L.NC))
        enc_tgt = torch.full((B, T), -1, dtype=torch.long)
        type_tgt = torch.full((B, T), -1, dtype=torch.long)
        edur_tgt = torch.full((B, T), -1, dtype=torch.long)
        vi_pos = torch.zeros((B, M), dtype=torch.long)
        vi_item = torch.zeros((B, M), dtype=torch.long)
        vi_val = torch.full((B, M), -1, dtype=torch.long)
        vi_prev = torch.full((B, M), L.n_features, dtype=torch.long)
        vi_rep = torch.zeros((B, M), dtype=torch.long)  # REPEAT_EDGES bucket of each entry's count
        vi_lead = torch.zeros((B, M), dtype=torch.long)  # GAP bucket of each entry's lead before its visit
        for b, (p, fs) in enumerate(batch):
            n = len(p.gap)
            static[b] = torch.tensor([p.sex, p.band, p.race, p.eth, p.dead, p.death_age])
            age_in[b, 0] = p.end_age
            early_in[b, 0] = p.end_early
            for t, f in enumerate(fs):
                feats[b, t + 1, f] = 1.0
            if n:
                gap_in[b, 1: n + 1] = torch.from_numpy(p.gap)
                age_in[b, 1: n + 1] = torch.from_numpy(p.age)
                early_in[b, 1: n + 1] = torch.from_numpy(p.early)
                eg_tgt[b, :n] = torch.from_numpy(p.gap) + 1
                gq[b, :n] = torch.from_numpy(p.gap)
                aq[b, :n] = torch.from_numpy(p.age)
                eq[b, :n] = torch.from_numpy(p.early)
                enc_tgt[b, :n] = torch.from_numpy(p.enc)
                type_tgt[b, :n] = torch.from_numpy(p.etype)
                edur_tgt[b, :n] = torch.from_numpy(p.edur)
            if not p.truncated:
                eg_tgt[b, n] = 0  # END
            m = len(p.item)
            if m:
                x_tgt[b, torch.from_numpy(p.item_visit), torch.from_numpy(p.item)] = 1.0
                vi_pos[b, :m] = torch.from_numpy(p.item_visit)  # visit t is predicted at position t
                vi_item[b, :m] = torch.from_numpy(p.item)
                vi_val[b, :m] = torch.from_numpy(p.value)
                vi_prev[b, :m] = torch.from_numpy(p.prev)
                vi_rep[b, :m] = torch.tensor([repeat_bucket(c) for c in p.count.tolist()], dtype=torch.long)
                vi_lead[b, :m] = torch.from_numpy(p.lead)
        return {"feats": feats, "gap_in": gap_in, "age_in": age_in, "early_in": early_in, "static": static,
                "eg_tgt": eg_tgt, "gq": gq, "aq": aq, "eq": eq, "x_tgt": x_tgt, "enc_tgt": enc_tgt,
                "type_tgt": type_tgt, "edur_tgt": edur_tgt,
                "vi_pos": vi_pos, "vi_item": vi_item, "vi_val": vi_val, "vi_prev": vi_prev,
                "vi_rep": vi_rep, "vi_lead": vi_lead}

    def empty(self) -> dict[str, torch.Tensor]:
        return self([])
