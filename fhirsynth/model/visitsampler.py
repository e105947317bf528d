"""Batched sampling from the visit model: one cached transformer step per visit, not per event.

A patient is drawn as: sex (the released shares, or forced), birth band and day (inside an --age condition),
race, ethnicity, deceased (the released share of the band) and death age; then visits newest first, each a gap
back from the later time (never before birth, never after death: the record ends there), its mixture
component, its items under the clinical constraints (mappings/constraints.toml: sex-specific codes, age
limits), complete public panels, and every item's value from its own value space (a numeric code always gets a
quantity inside its bins; durations never run past the record's end), how many times it occurs in the visit
(its REPEAT_EDGES bucket, then a count inside it: the repeats carry the same value) and how long before the
visit its own time lies (a gap bucket for tokenizer.LEAD_KINDS, never before birth nor below the item's lowest
allowed age; a condition's abatement counts from that onset). Each step reads the visit's age in whole years
and, under three years, in weeks and months (bins.early_age_id), as training did.
Once a record is drawn, every drug or procedure with a reason condition finds that condition in the record no
later than its first use (reasons.py).
The result is written as tokens of the token grammar plus in-bucket draws (tokenizer.py), which
Tokenizer.decode turns into a Timeline: one decoder for both models.
A required condition (--condition) that a record did not produce by its end is put into the visit where the
model gave it the highest probability (the visits after it were drawn without it: documented approximation).
Where the record begins: when the model holds the DP histogram of the age at the first event per sex x age band
(measurements.first_age_prior), each patient draws a bucket of it, and the record may not end (END is masked)
while its earliest visit is at or above the bucket's upper edge, and no visit lies below the lower edge (a gap that
would cross it is not drawn). Once END may be drawn, and always without such a histogram, the probability of the
gaps that no longer fit (before the start bucket or birth) goes to END, not to the short gaps that still do:
renormalised over those, a record that reached its first days kept drawing visits there (half of a pool of the
US split's ε = 8 model had visits in the first week of life, up to 42 of them; real records 0.6%).
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import torch

from fhirsynth.model.bins import DAYS_PER_YEAR, EARLY_AGE_EDGES, N_REPEAT, REPEAT_BOUNDS
from fhirsynth.model.grammar import Grammar
from fhirsynth.model.measurements import AGE_BANDS, CELL_YEAR_DAYS, FIRST_AGE_EDGES
from fhirsynth.model.reasons import close_reasons, reason_conditions
from fhirsynth.model.tokenizer import AGE_UNKNOWN, LEAD_KINDS
from fhirsynth.model.visitmodel import VisitModel
from fhirsynth.model.visits import NONE, VisitLayout, lead_days
from fhirsynth.model.vocab import SEXES

log = logging.getLogger(__name__)


def _draw(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One categorical draw per row of probs [B, n] (rows with no mass take index 0)."""
    cum = probs.double().cumsum(dim=1)
    r = torch.rand((probs.shape[0], 1), generator=gen, dtype=torch.float64, device=probs.device) * cum[:, -1:]
    return torch.searchsorted(cum, r, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


def _masked_draw(logits: torch.Tensor, mask: torch.Tensor, gen: torch.Generator, temperature: float) -> torch.Tensor:
    logits = (logits.float() / temperature).masked_fill(~mask, float("-inf"))
    return _draw(torch.softmax(logits, dim=-1).nan_to_num(0.0), gen)


def _end_takes_lost_gaps(logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """END-or-gap probabilities where END may be drawn: the mass of the gaps that no longer fit (before the
    record's start or birth) goes to END rather than to the short gaps that do, which piled visits up at the
    start (us-full: 3.5 encounters per record in days 7-29 of life against 0.6); elsewhere as _masked_draw."""
    p = torch.softmax(logits.float() / temperature, dim=-1)
    lost = (p * ~mask).sum(dim=1)
    p = p * mask
    p[:, 0] += torch.where(mask[:, 0], lost, torch.zeros_like(lost))
    return p


def _years(days: torch.Tensor) -> torch.Tensor:
    return torch.div(days, DAYS_PER_YEAR, rounding_mode="floor").clamp(0, AGE_UNKNOWN - 1).long()


def same_code_items(layout: VisitLayout) -> np.ndarray:
    """For each content item, the first observation item of the same (system, code) with the same value bins (a
    code listed alone and as a panel member, e.g. systolic pressure 8480-6 beside its blood-pressure panel
    85354-9), else itself. In the data both carry the same value at a visit (one measurement: 3,800 of 3,800
    shared-cohort visits with both); drawn independently they gave a patient two unrelated systolic values per
    visit, and the lag-1 correlation of consecutive values fell to ~0.05 (0.84 real)."""
    v = layout.vocab
    first: dict[tuple, int] = {}
    canon = np.arange(layout.NC, dtype=np.int64)
    for j, tok in enumerate(layout.content_tokens):
        it = v.item_of(tok)
        if it.kind != "observation":
            continue
        vb = v.item_bins(it)
        key = (it.system, it.code, None if vb is None else (vb.unit, tuple(vb.edges)))
        canon[j] = first.setdefault(key, j)
    return canon


class VisitSampler:
    def __init__(self, model: VisitModel, layout: VisitLayout, grammar: Grammar,
                 condition_tokens: tuple[int, ...] = (), first_age: np.ndarray | None = None) -> None:
        self.m, self.L, self.g = model, layout, grammar
        dev = grammar.device
        self.dev = dev
        # P(first-event age bucket | sex x age band) [cells, buckets] (NaN rows: no constraint), or None
        self.first_age = None if first_age is None else torch.as_tensor(first_age, dtype=torch.float64, device=dev)
        edges = [e * DAYS_PER_YEAR for e in FIRST_AGE_EDGES]
        self.first_lo = torch.as_tensor(edges, dtype=torch.float64, device=dev)
        self.first_hi = torch.as_tensor(edges[1:] + [float("inf")], dtype=torch.float64, device=dev)
        self.early_edges = torch.as_tensor(EARLY_AGE_EDGES, dtype=torch.float64, device=dev)
        bounds = torch.as_tensor(REPEAT_BOUNDS, dtype=torch.long, device=dev)
        self.rep_lo, self.rep_width = bounds[:-1], bounds[1:] - bounds[:-1]
        # members of a public panel are one measurement at the visit: no lead (a component alone on another day
        # would break the panel)
        kinds = [layout.vocab.item_of(t).kind for t in layout.content_tokens]
        self.no_lead = torch.as_tensor([k not in LEAD_KINDS for k in kinds], dtype=torch.bool,
                                       device=dev).reshape(layout.NC)
        for grp in layout.panels:
            self.no_lead[grp] = True
        self.lead_at_visit = torch.as_tensor([k == "observation" for k in kinds], dtype=torch.bool,
                                             device=dev).reshape(layout.NC)
        v = layout.vocab
        ct = torch.as_tensor(layout.content_tokens, dtype=torch.long, device=dev)
        self.content_tokens = ct
        # sex-specific codes: [n_sex + 1, NC]; age limits on content items
        self.forbid = grammar.forbid[:, ct] if len(layout.content_tokens) else grammar.forbid[:, :0]
        self.lim_j = torch.as_tensor([layout.content_index[int(c)] for c in grammar.lim_cols.tolist()
                                      if int(c) in layout.content_index], dtype=torch.long, device=dev)
        keep = [i for i, c in enumerate(grammar.lim_cols.tolist()) if int(c) in layout.content_index]
        self.lim_lo, self.lim_hi = grammar.lim_lo[keep], grammar.lim_hi[keep]
        # a lead never takes an item below its lowest allowed age (mappings/constraints.toml)
        self.lead_floor = torch.zeros(layout.NC, dtype=torch.float64, device=dev)
        for j, lo in zip(self.lim_j.tolist(), self.lim_lo.tolist()):
            self.lead_floor[j] = max(float(self.lead_floor[j]), lo)
        self.allowed = torch.as_tensor(layout.allowed, device=dev)
        self.type_ok = torch.as_tensor(layout.type_ok, device=dev)[None, :]
        self.is_cond = torch.as_tensor(layout.is_condition, device=dev)
        self.cond_j = [layout.content_index[t] for t in condition_tokens if t in layout.content_index]
        self.canon = torch.as_tensor(same_code_items(layout), device=dev)
        self.has_twins = bool((self.canon != torch.arange(layout.NC, device=dev)).any())
        self.v = v
        self.tok_sex, self.tok_by = v.start("sex"), v.start("by")
        self.tok_race, self.tok_eth = v.start("race"), v.start("eth")
        self.tok_age, self.tok_gap = v.start("age"), v.start("gap")
        self.tok_dur, self.tok_val = v.start("dur"), v.start("val")
        # a drug's indication in the record (reasons.py): the constraints of each reason condition
        self.reasons = reason_conditions(layout)
        self.reason_stats: Counter = Counter()
        self._forbid_l = self.forbid.cpu().tolist()  # [sex][content index]
        self._cond_limits = {layout.content_index[t]: [] for t in set(self.reasons.values())}
        for k, j in enumerate(self.lim_j.tolist()):
            if j in self._cond_limits:
                self._cond_limits[j].append((float(self.lim_lo[k]), float(self.lim_hi[k])))
        d0, d1 = v.offsets["dur"]
        v0, v1 = v.offsets["val"]
        self._is_value = lambda t: d0 <= t < d1 or v0 <= t < v1 or t in layout.answer_index

    @torch.no_grad()
    def generate(self, batch: int, gen: torch.Generator, *, temperature: float = 1.0
                 ) -> tuple[list[list[int]], list[list[float]]]:
        m, L, g, dev, v = self.m, self.L, self.g, self.dev, self.v
        f64 = torch.float64
        u = lambda *shape: torch.rand(shape, generator=gen, dtype=f64, device=dev)
        B = batch
        # ---- static part
        if g.cond.sex is not None:
            sex = torch.full((B,), SEXES.index(g.cond.sex), dtype=torch.long, device=dev)
        elif g.sex_prior is not None and float(g.sex_prior.sum()) > 0:
            sex = _draw(g.sex_prior[None].expand(B, -1), gen)
        else:
            sex = _draw(torch.tensor([[1.0, 1.0, 0.0, 0.0]], device=dev).expand(B, -1), gen)
        static = torch.zeros((B, 6), dtype=torch.long, device=dev)
        static[:, 0] = sex
        bl, _, _, _ = m.static_logits(static)
        band = _masked_draw(bl, g.by_ok[None].expand(B, -1), gen, temperature)
        static[:, 1] = band
        birth = g.birth_in_band(band, u(B))
        _, rl, _, _ = m.static_logits(static)
        static[:, 2] = _masked_draw(rl, torch.ones_like(rl, dtype=torch.bool), gen, temperature)
        _, _, el, dl = m.static_logits(static)
        static[:, 3] = _masked_draw(el, torch.ones_like(el, dtype=torch.bool), gen, temperature)
        lived = g.ref_end - birth
        p_dead = g.death_prior[band].double() if g.death_prior is not None else torch.zeros(B, dtype=f64, device=dev)
        age_ok = (g.age_lo[None] < lived[:, None]) & (g.age_hi[None] > g.min_death0)
        dead = (u(B) < p_dead) & age_ok.any(dim=1)
        dage = _masked_draw(dl, age_ok, gen, temperature)
        death = g.death_in_age(dage, lived, u(B))
        end = torch.where(dead, death, lived)
        static[:, 4] = dead.long()
        static[:, 5] = torch.where(dead, dage, torch.zeros_like(dage))
        start_hi, start_lo = self._record_start(sex, end, gen)
        # no visit before birth, nor before the lower edge of the record's drawn start (a gap that overshot it
        # put a record's first visit in its first days where every real one began weeks later: us-full)
        floor = torch.clamp(start_lo, min=0.0)
        toks: list[list[int]] = []
        draws: list[list[float]] = []
        for b in range(B):
            t = [v.BOS, self.tok_sex + int(sex[b]), self.tok_by + int(band[b]), self.tok_race + int(static[b, 2]),
                 self.tok_eth + int(static[b, 3])]
            d = [0.0, 0.0, float(birth[b]), 0.0, 0.0]
            if bool(dead[b]):
                t += [v.DEATH, self.tok_age + int(dage[b])]
                d += [0.0, float(death[b])]
            toks.append(t)
            draws.append(d)
        visits: list[list[tuple[list[int], list[float]]]] = [[] for _ in range(B)]
        # ---- visits, newest first
        cache = m.new_cache(B, dev, next(m.parameters()).dtype)
        # the static position reads the age at the reference date, as training does (visits.PatientVisits.end_age:
        # the time after the ethnicity token), also for the deceased
        x_in = m.static_embedding(static) + m.time_embedding(torch.full((B,), L.n_gap, device=dev), _years(lived),
                                                              self._early(lived))
        alive = torch.arange(B, device=dev)
        cur = end.clone()
        best_p = torch.full((B,), -1.0, device=dev)
        best_visit = torch.full((B,), -1, dtype=torch.long, device=dev)
        has_cond = torch.zeros(B, dtype=torch.bool, device=dev)
        forbid = self.forbid[sex]  # [B, NC]
        last_feat = torch.full((B, L.NC), L.n_features, dtype=torch.long, device=dev)  # visits.previous_values
        for pos in range(m.cfg.max_visits):
            h = m.step(x_in, pos, cache)
            n = h.shape[0]
            # END or a gap that stays after birth
            eg_mask = torch.ones((n, 1 + L.n_gap), dtype=torch.bool, device=dev)
            eg_mask[:, 1:] = g.gap_lo[None] <= (cur[alive] - floor[alive])[:, None]
            # where the record begins (see the module docstring); no visit falls below the start bucket's lower
            # edge or birth: the floor bounds the gaps and visit_before
            eg_mask[:, 0] = (cur[alive] < start_hi[alive]) | ~eg_mask[:, 1:].any(dim=1)
            eg = _draw(_end_takes_lost_gaps(m.eg_head(h), eg_mask, temperature), gen)
            go = eg > 0
            if not bool(go.any()):
                break
            keep = go.nonzero().squeeze(1)
            if keep.numel() < n:
                cache.select(keep)
                h, eg, alive = h[keep], eg[keep], alive[keep]
                n = keep.numel()
            gi = eg - 1
            t_vis = g.visit_before(cur[alive], gi, u(n), floor[alive])
            cur[alive] = t_vis
            aid, eid = _years(t_vis), self._early(t_vis)
            c = m.context(h, gi, aid, eid)
            k = _draw(torch.softmax(m.mix_head(c).float() / temperature, dim=-1), gen)
            z = m.components(c)[torch.arange(n, device=dev), k]  # [n, d]
            p_item = torch.sigmoid(m.item_head(z).float() / temperature)
            p_item = p_item.masked_fill(forbid[alive], 0.0)
            if self.lim_j.numel():
                tv = t_vis[:, None]
                bad = ~((self.lim_lo[None] <= tv) & (tv < self.lim_hi[None]))
                p_item[:, self.lim_j] = p_item[:, self.lim_j].masked_fill(bad, 0.0)
            x = torch.rand(p_item.shape, generator=gen, device=dev) < p_item
            for grp in L.panels:  # complete public panels (both blood pressure components, ...)
                anyp = x[:, grp].any(dim=1, keepdim=True)
                x[:, grp] |= anyp & ~forbid[alive][:, grp]
            if self.cond_j:
                pc = p_item[:, self.cond_j].max(dim=1).values
                better = (pc > best_p[alive]) & (pc > 0)  # only where the constraints allow it
                best_p[alive] = torch.where(better, pc, best_p[alive])
                best_visit[alive] = torch.where(better, torch.full_like(gi, pos), best_visit[alive])
                has_cond[alive] |= x[:, self.cond_j].any(dim=1)
            room = end[alive] - t_vis  # durations never run past the record's end
            dur_ok = g.dur_lo[None] <= room[:, None]
            enc = _masked_draw(m.enc_head(z), torch.ones((n, L.NE + 1), dtype=torch.bool, device=dev), gen,
                               temperature)
            ety = _masked_draw(m.type_head(z), self.type_ok.expand(n, -1), gen, temperature)
            ed_mask = torch.ones((n, L.n_dur + 1), dtype=torch.bool, device=dev)
            ed_mask[:, 1:] = dur_ok
            edur = _masked_draw(m.edur_head(z), ed_mask, gen, temperature)
            # values of the present items
            rows, cols = x.nonzero(as_tuple=True)
            vmask = self.allowed[cols].clone()
            if rows.numel():
                d0 = L.dur_value(0)
                vmask[:, d0: d0 + L.n_dur] &= dur_ok[rows]
                prev = last_feat[alive[rows], cols]
                hv = m.value_state(c[rows], cols, prev)
                vals = _masked_draw(m.v_head(hv), vmask, gen, temperature)
                rb = _masked_draw(m.r_head(hv), torch.ones((rows.numel(), N_REPEAT), dtype=torch.bool,
                                                           device=dev), gen, temperature)
                ur = torch.rand(rows.numel(), generator=gen, dtype=f64, device=dev)
                reps = self.rep_lo[rb] + (ur * self.rep_width[rb]).long().clamp(max=self.rep_width[rb] - 1)
                lb = _masked_draw(m.l_head(hv), torch.ones((rows.numel(), L.n_gap), dtype=torch.bool, device=dev),
                                  gen, temperature)
                ul = torch.rand(rows.numel(), generator=gen, dtype=f64, device=dev)
                room = (t_vis[rows].double() - self.lead_floor[cols]).clamp(min=0.0)  # birth, lowest allowed age
                lead = lead_days(lb, ul)
                # a lead past the floor: a condition's onset is then since birth (or the lowest allowed age), a
                # measurement is taken at its visit (no observation precedes birth)
                leads = torch.where((lead > room) & self.lead_at_visit[cols], torch.zeros_like(lead),
                                    torch.minimum(lead, room))
                # a day without an encounter is its events' day (training never sees a lead there)
                leads = torch.where(self.no_lead[cols] | (enc[rows] == NONE), torch.zeros_like(leads), leads)
                if self.has_twins:  # one measurement, one value (same_code_items)
                    at = torch.full((n, L.NC), -1, dtype=torch.long, device=dev)
                    at[rows, cols] = torch.arange(rows.numel(), device=dev)
                    src = at[rows, self.canon[cols]]  # the entry of the same code's first item, or -1
                    cv = vals[src.clamp(min=0)]
                    copy = (src >= 0) & (src != torch.arange(rows.numel(), device=dev))
                    copy &= vmask.gather(1, cv[:, None])[:, 0]
                    vals = torch.where(copy, cv, vals)
                    same = torch.where(copy, src, torch.arange(rows.numel(), device=dev))
            else:
                vals = torch.zeros(0, dtype=torch.long, device=dev)
                reps = torch.zeros(0, dtype=torch.long, device=dev)
                leads = torch.zeros(0, dtype=f64, device=dev)
            if not (self.has_twins and rows.numel()):
                same = torch.arange(rows.numel(), device=dev)
            feats, vfeat = self._features(n, enc, ety, edur, rows, cols, vals)
            last_feat[alive[rows], cols] = vfeat
            x_in = m.visit_in(feats) + m.time_embedding(gi, aid, eid)
            self._emit(visits, alive, gi, t_vis, enc, ety, edur, rows, cols, vals, end, gen, same, reps, leads)
        # ---- every drug's indication in its record (reasons.py)
        if self.reasons:
            sex_l = sex.tolist()
            for b in range(B):
                close_reasons(visits[b], self.reasons, self._is_value,
                              lambda tok, day, s=sex_l[b]: self._condition_allowed(tok, s, day), self.reason_stats)
            log.debug("sampler: reason conditions added %d, reason items removed %d (so far)",
                      self.reason_stats["reason_conditions_added"], self.reason_stats["reason_items_removed"])
        # ---- a required condition that never came: into its likeliest visit
        if self.cond_j:
            tok = int(self.content_tokens[self.cond_j[0]])
            for b in range(B):
                vi = int(best_visit[b])
                if not bool(has_cond[b]) and 0 <= vi < len(visits[b]):
                    t_list, d_list = visits[b][vi]
                    t_list.append(tok)
                    d_list.append(0.0)
        for b in range(B):
            for t_list, d_list in visits[b]:
                toks[b] += t_list
                draws[b] += d_list
        return toks, draws

    def _condition_allowed(self, tok: int, sex: int, day: float) -> bool:
        """Whether the constraints let a patient of this sex have the condition token at this day since birth."""
        j = self.L.content_index[tok]
        return not self._forbid_l[sex][j] and all(lo <= day < hi for lo, hi in self._cond_limits[j])

    def _early(self, days: torch.Tensor) -> torch.Tensor:
        """bins.early_age_id of times in days since birth, batched."""
        i = torch.searchsorted(self.early_edges, days.double(), right=True)  # 1 + bucket inside the edges
        return torch.where(days.double() < self.early_edges[-1], i.clamp(min=1), torch.zeros_like(i))

    def _features(self, n, enc, ety, edur, rows, cols, vals) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.L
        f = torch.zeros((n, L.n_features), device=self.dev)
        r = torch.arange(n, device=self.dev)
        has = enc > 0
        f[r[has], L.f_enc + enc[has] - 1] = 1.0
        has = ety > 0
        f[r[has], L.f_type + ety[has] - 1] = 1.0
        has = edur > 0
        f[r[has], L.f_edur + edur[has] - 1] = 1.0
        f[rows, L.f_item + cols] = 1.0
        pair = torch.as_tensor(L.f_pair, device=self.dev)[cols]
        is_bin = (vals >= 1) & (vals <= L.n_val) & (pair >= 0)
        f[rows[is_bin], pair[is_bin] + vals[is_bin] - 1] = 1.0
        is_ans = (vals > L.n_val) & (vals <= L.n_val + L.NA)
        f[rows[is_ans], L.f_answer + vals[is_ans] - 1 - L.n_val] = 1.0
        is_dur = vals > L.n_val + L.NA
        f[rows[is_dur], L.f_cdur + vals[is_dur] - 1 - L.n_val - L.NA] = 1.0
        vfeat = torch.full_like(vals, L.n_features)  # each entry's value feature (visits.VisitLayout.value_feature)
        vfeat[is_bin] = pair[is_bin] + vals[is_bin] - 1
        vfeat[is_ans] = L.f_answer + vals[is_ans] - 1 - L.n_val
        vfeat[is_dur] = L.f_cdur + vals[is_dur] - 1 - L.n_val - L.NA
        return f, vfeat

    def _emit(self, visits, alive, gi, t_vis, enc, ety, edur, rows, cols, vals, end, gen, same, reps,
              leads) -> None:
        """Append each row's visit as tokens + draws (tokenizer grammar: GAP, encounter [type] [dur], items);
        same[i]: the entry whose in-bucket draw entry i shares (one measurement of one code, same_code_items);
        reps[i]: how many times entry i is written (its repeats carry its value); leads[i]: days before the visit
        (the item token's draw, Tokenizer.decode)."""
        L, g, dev = self.L, self.g, self.dev
        f64 = torch.float64
        n = alive.shape[0]
        # in-bucket draws, vectorised: encounter end, condition end, numeric value
        ue = torch.rand(n, generator=gen, dtype=f64, device=dev)
        rec_end = end[alive]
        enc_end = g.end_after(t_vis, (edur - 1).clamp(min=0), rec_end, ue)
        uv = torch.rand(cols.shape[0], generator=gen, dtype=f64, device=dev)
        is_bin = (vals >= 1) & (vals <= L.n_val)
        xv = g.value_in_bin(self.content_tokens[cols], (vals - 1).clamp(0, L.n_val - 1), uv)
        d0 = L.dur_value(0)
        is_dur = vals >= d0
        cend = g.end_after(t_vis[rows] - leads, (vals - d0).clamp(0, L.n_dur - 1), rec_end[rows], uv)
        xval = torch.where(is_bin, xv, torch.where(is_dur, cend, torch.zeros_like(xv)))[same]
        # to python once
        alive_l, gi_l, tv_l = alive.tolist(), gi.tolist(), t_vis.tolist()
        enc_l, ety_l, edur_l, ee_l = enc.tolist(), ety.tolist(), edur.tolist(), enc_end.tolist()
        rows_l, cols_l, vals_l, xval_l = rows.tolist(), cols.tolist(), vals.tolist(), xval.tolist()
        reps_l, leads_l = reps.tolist(), leads.tolist()
        per_row: list[list[int]] = [[] for _ in range(n)]
        for i, r in enumerate(rows_l):
            per_row[r].append(i)
        ct = L.content_tokens
        for r in range(n):
            t_list = [self.tok_gap + gi_l[r]]
            d_list = [tv_l[r]]
            if enc_l[r] != NONE:
                t_list.append(L.enc_tokens[enc_l[r] - 1])
                d_list.append(0.0)
                if ety_l[r] != NONE:
                    t_list.append(L.type_tokens[ety_l[r] - 1])
                    d_list.append(0.0)
                if edur_l[r] != NONE:
                    t_list.append(self.tok_dur + edur_l[r] - 1)
                    d_list.append(ee_l[r])
            for i in per_row[r]:
                e_t, e_d = [ct[cols_l[i]]], [leads_l[i]]
                val = vals_l[i]
                if val == NONE:
                    pass
                elif val <= L.n_val:
                    e_t.append(self.tok_val + val - 1)
                    e_d.append(xval_l[i])
                elif val < d0:
                    e_t.append(L.answer_tokens[val - 1 - L.n_val])
                    e_d.append(0.0)
                else:
                    e_t.append(self.tok_dur + val - d0)
                    e_d.append(xval_l[i])
                t_list += e_t * reps_l[i]
                d_list += e_d * reps_l[i]
            visits[alive_l[r]].append((t_list, d_list))

    def _record_start(self, sex: torch.Tensor, end: torch.Tensor, gen: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(upper, lower) edge in days since birth of each patient's first-event age bucket, drawn from the
        released histogram of the patient's cell (measurements.cell_of: female or not x age band at the end);
        (inf, -inf) where there is none: no constraint."""
        B = sex.shape[0]
        hi = torch.full((B,), float("inf"), dtype=torch.float64, device=self.dev)
        lo = torch.full((B,), float("-inf"), dtype=torch.float64, device=self.dev)
        if self.first_age is None:
            return hi, lo
        # the cell as measurements.cell_of counts it, so the histogram drawn from is the patient's own cell's
        years = torch.div(end.double().floor(), CELL_YEAR_DAYS, rounding_mode="floor").clamp(min=0)
        band = torch.searchsorted(torch.as_tensor(AGE_BANDS, dtype=torch.float64, device=self.dev), years,
                                  right=True)
        cell = (sex != SEXES.index("female")).long() * (len(AGE_BANDS) + 1) + band
        probs = self.first_age[cell]
        ok = ~torch.isnan(probs).any(dim=1)
        probs = probs.nan_to_num(0.0) * (self.first_lo[None] <= end.double()[:, None])  # no start after the end
        ok &= probs.sum(dim=1) > 0
        bucket = _draw(probs, gen)
        hi = torch.where(ok, self.first_hi[bucket], hi)
        lo = torch.where(ok, self.first_lo[bucket], lo)
        return hi, lo
