"""The token grammar as a batched state machine: which tokens may come next, and the in-bucket draws.

Every sampled sequence is a valid timeline because each step only allows tokens that keep it valid:
  * grammar (tokenizer.py): prefix order, visits, entries, value tokens only after their code, END at the end;
  * length: a token is allowed only if the sequence can still be finished within max_len;
  * time: visits are sampled newest first (tokenizer.py), each one a gap back from the later time, never
    before birth; the death (when sampled, right after the prefix) is before the reference date and is the
    end of the record; durations >= 0 (abatement never precedes onset) and never run past the record's end;
  * representation: beyond the RECENT_VISITS newest visits a condition or observation code already emitted
    is not repeated (compressed training sequences keep one occurrence of a code there, tokenizer.py; a small
    model does not track that itself and filled its context with repeated vitals, ending records years early);
  * clinical (constraints.py): sex-specific codes, age limits; value bins never leave physiologic ranges;
  * conditioning: forced sex, birth dates giving the requested age, a required condition code.
Continuous quantities (birth day, visit age, end times, values) are drawn inside the chosen bucket right when
the token is chosen, so the constraints are checked on exact values. State tensors are float64 (minutes of
rounding in float32 could otherwise put an event after a death).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import numpy as np
import torch

from fhirsynth.model.bins import DAYS_PER_YEAR, DUR_EDGES, GAP_EDGES
from fhirsynth.model.constraints import Constraints
from fhirsynth.model.tokenizer import AGE_UNKNOWN, RECENT_VISITS, day_number
from fhirsynth.model.vocab import SEXES, Vocab
from fhirsynth.timeline.types import CRITICALITY_SYSTEM

(ST_START, ST_SEX, ST_BY, ST_RACE, ST_ETH, ST_BODY0, ST_DEATH, ST_BODY1, ST_VFIRST, ST_AENC,
 ST_AENCCAT, ST_ACOND, ST_AOBS, ST_ADONE, ST_FIN, ST_AALG) = range(16)
N_STATES = 16  # ST_AALG: after an allergy, whose only value is a criticality
# Fewest tokens needed to finish a sequence from each state (the length mask).
_NEED = {ST_START: 6, ST_SEX: 5, ST_BY: 4, ST_RACE: 3, ST_ETH: 2, ST_BODY0: 1, ST_DEATH: 2, ST_BODY1: 1,
         ST_VFIRST: 2, ST_AENC: 1, ST_AENCCAT: 1, ST_ACOND: 1, ST_AOBS: 1, ST_ADONE: 1, ST_FIN: 0, ST_AALG: 1}


@dataclass
class Conditioning:
    sex: str | None = None
    age: tuple[int, int] | None = None  # years at the end of the record (death, else the reference date)
    condition_tokens: tuple[int, ...] = ()


@dataclass
class BatchState:
    st: torch.Tensor  # [B] long, grammar state
    sex: torch.Tensor  # [B] long, index into SEXES, len(SEXES) = not yet known
    birth: torch.Tensor  # [B] float64, birth day number
    cur: torch.Tensor  # [B] float64, days since birth of the current visit (the record's end before the first)
    end: torch.Tensor  # [B] float64, the record's end (days since birth): death, else the reference date
    last_item: torch.Tensor  # [B] long, token of the last code (for value bins)
    has_cond: torch.Tensor  # [B] bool, required condition emitted
    band: torch.Tensor  # [B] long, birth band
    n_visit: torch.Tensor  # [B] long, visits begun so far
    seen: torch.Tensor  # [B, V] bool, condition / observation codes emitted so far

    def select(self, idx: torch.Tensor) -> BatchState:
        return BatchState(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


class Grammar:
    def __init__(self, vocab: Vocab, constraints: Constraints | None, max_len: int, device: torch.device,
                 cond: Conditioning | None = None) -> None:
        self.v = v = vocab
        self.max_len = max_len
        self.device = device
        self.cond = cond or Conditioning()
        # released (DP) sex shares replace the model's first prediction (vocab.py); not when sex is forced
        self.sex_prior: torch.Tensor | None = None
        if vocab.sex_shares is not None and self.cond.sex is None:
            self.sex_prior = torch.as_tensor(vocab.sex_shares, dtype=torch.float32, device=device)
        # released (DP) deceased share per birth band: the chance of DEATH right after the prefix (vocab.py)
        self.death_prior: torch.Tensor | None = None
        if vocab.death_shares is not None:
            self.death_prior = torch.as_tensor(vocab.death_shares, dtype=torch.float32, device=device)
        V = v.size
        allowed = np.zeros((N_STATES, V), dtype=bool)
        nxt = np.full((N_STATES, V), ST_FIN, dtype=np.int64)

        def allow(s: int, toks, ns: int) -> None:
            toks = list(toks)
            allowed[s, toks] = True
            nxt[s, toks] = ns

        base = v.start("item")
        kinds = [it.kind for it in v.items]
        enc = [base + i for i, k in enumerate(kinds) if k == "encounter"]
        cond_t = [base + i for i, k in enumerate(kinds) if k == "condition"]
        obs = [base + i for i, k in enumerate(kinds) if k == "observation"]
        vals = [base + i for i, k in enumerate(kinds) if k == "value"]
        # issue 18's kinds reuse the entry states (tokenizer.py): a course / performed period takes a DUR like a
        # condition, an allergy only a criticality VALUE item (ST_AALG), a vaccine nothing
        durable = [base + i for i, k in enumerate(kinds) if k in ("medication", "procedure")]
        allergy = [base + i for i, k in enumerate(kinds) if k == "allergy"]
        crit = [base + i for i, it in enumerate(v.items) if it.kind == "value" and it.system == CRITICALITY_SYSTEM]
        vaccine = [base + i for i, k in enumerate(kinds) if k == "immunization"]

        def body(s: int) -> None:
            allow(s, cond_t, ST_ACOND)
            allow(s, obs, ST_AOBS)
            allow(s, durable, ST_ACOND)
            allow(s, allergy, ST_AALG)
            allow(s, vaccine, ST_ADONE)
            allow(s, v.rng("gap"), ST_VFIRST)
            allow(s, [v.END], ST_FIN)

        allow(ST_START, [v.BOS], ST_SEX)
        allow(ST_SEX, v.rng("sex"), ST_BY)
        allow(ST_BY, v.rng("by"), ST_RACE)
        allow(ST_RACE, v.rng("race"), ST_ETH)
        allow(ST_ETH, v.rng("eth"), ST_BODY0)
        allow(ST_BODY0, [v.DEATH], ST_DEATH)
        allow(ST_DEATH, v.rng("age"), ST_BODY1)
        for s in (ST_BODY0, ST_BODY1):
            allow(s, v.rng("gap"), ST_VFIRST)
            allow(s, [v.END], ST_FIN)
        allow(ST_VFIRST, enc, ST_AENC)
        allow(ST_VFIRST, cond_t, ST_ACOND)
        allow(ST_VFIRST, obs, ST_AOBS)
        allow(ST_VFIRST, durable, ST_ACOND)
        allow(ST_VFIRST, allergy, ST_AALG)
        allow(ST_VFIRST, vaccine, ST_ADONE)
        for s in (ST_AENC, ST_AENCCAT, ST_ACOND, ST_AOBS, ST_ADONE, ST_AALG):
            body(s)
        allow(ST_AALG, crit, ST_ADONE)
        # a criticality is an allergy's value only: never an encounter type or an observation's answer
        vals = sorted(set(vals) - set(crit))
        allow(ST_AENC, vals, ST_AENCCAT)
        allow(ST_AENC, v.rng("dur"), ST_ADONE)
        allow(ST_AENCCAT, v.rng("dur"), ST_ADONE)
        allow(ST_ACOND, v.rng("dur"), ST_ADONE)
        allow(ST_AOBS, v.rng("val"), ST_ADONE)
        allow(ST_AOBS, vals, ST_ADONE)
        allow(ST_FIN, [v.PAD], ST_FIN)
        need_state = np.array([_NEED[s] for s in range(N_STATES)], dtype=np.int64)
        need = np.where(allowed, need_state[nxt], 0)

        t = lambda a, dt=None: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
        self.allowed = t(allowed)
        self.nxt = t(nxt)
        self.need = t(need)
        self.need_max = int(need.max())
        f64 = torch.float64
        self.gap_lo, self.gap_hi = t(GAP_EDGES[:-1], f64), t(GAP_EDGES[1:], f64)
        self.dur_lo, self.dur_hi = t(DUR_EDGES[:-1], f64), t(DUR_EDGES[1:], f64)
        ages = np.arange(v.n_ages, dtype=np.float64)
        self.age_lo, self.age_hi = t(ages * DAYS_PER_YEAR, f64), t((ages + 1) * DAYS_PER_YEAR, f64)
        # value bins per item token: edges padded with the last edge
        nb = np.zeros(V, dtype=np.int64)
        edges = np.zeros((V, v.n_val + 1), dtype=np.float64)
        dec = np.zeros(V, dtype=np.int64)
        is_value_item = np.zeros(V, dtype=bool)
        for i, it in enumerate(v.items):
            vb = v.item_bins(it)
            is_value_item[base + i] = it.kind == "value"
            if vb is not None:
                nb[base + i] = vb.n_bins
                e = list(vb.edges) + [vb.edges[-1]] * (v.n_val + 1 - len(vb.edges))
                edges[base + i] = e
                dec[base + i] = vb.decimals
        self.item_nbins, self.val_edges, self.item_dec = t(nb), t(edges, f64), t(dec)
        self.is_value_item = t(is_value_item)
        self.val_arange = torch.arange(v.n_val, device=device)
        # birth bands in day numbers, intersected with the age condition
        ref = v.cfg.ref_date
        self.ref_end = float(day_number(ref) + 1)  # end of the reference day
        bands = [v.band_years(b) for b in range(v.n_bands)]
        lo = np.array([day_number(_jan1(a)) for a, _ in bands], dtype=np.float64)
        hi = np.array([day_number(_jan1(b + 1)) - 1 for _, b in bands], dtype=np.float64)
        hi = np.minimum(hi, self.ref_end - 1)
        self.min_death0 = 0.0
        if self.cond.age is not None:
            a_lo, a_hi = self.cond.age
            # age = floor(days lived / 365.25) at the end of the record (death, else the reference date) in
            # [a_lo, a_hi]: birth so that the reference date gives an age <= a_hi, death no earlier than a_lo
            lo = np.maximum(lo, np.ceil(self.ref_end - (a_hi + 1) * DAYS_PER_YEAR) + 1)
            hi = np.minimum(hi, np.floor(self.ref_end - a_lo * DAYS_PER_YEAR) - 1)
            self.min_death0 = a_lo * DAYS_PER_YEAR
        self.band_lo, self.band_hi = t(lo, f64), t(hi, f64)
        by_ok = lo <= hi
        sex_ok = np.ones(len(SEXES), dtype=bool)
        if self.cond.sex is not None:
            sex_ok[:] = False
            sex_ok[SEXES.index(self.cond.sex)] = True
        self.by_ok = t(by_ok)  # the sampler refuses an --age that leaves no band
        # clinical constraints
        forbid = np.zeros((len(SEXES) + 1, V), dtype=bool)  # last row: sex not known yet
        self.lim_cols = t(np.zeros(0, dtype=np.int64))
        self.lim_lo = self.lim_hi = t(np.zeros(0), f64)
        if constraints is not None:
            for s, toks in constraints.forbidden_tokens(v).items():
                forbid[SEXES.index(s), toks] = True
            lims = constraints.age_limited_tokens(v)
            if lims:
                self.lim_cols = t(np.array([c for c, _, _ in lims], dtype=np.int64))
                self.lim_lo = t(np.array([a * DAYS_PER_YEAR for _, a, _ in lims]), f64)
                self.lim_hi = t(np.array([b * DAYS_PER_YEAR for _, _, b in lims]), f64)
        self.forbid = t(forbid)
        # the static part of the mask, one row per (state, sex): grammar, sex-specific codes, allowed birth bands
        # and sexes; mask() gathers it once per step instead of and-ing the parts together
        static = allowed[:, None, :] & ~forbid[None, :, :]
        b0, b1 = v.offsets["by"]
        static[:, :, b0:b1] &= by_ok[None, None, :]
        x0, x1 = v.offsets["sex"]
        static[:, :, x0:x1] &= sex_ok[None, None, :]
        self.n_sex_rows = len(SEXES) + 1
        self.static = t(static.reshape(N_STATES * self.n_sex_rows, V))
        self.cond_tokens = t(np.array(self.cond.condition_tokens, dtype=np.int64))
        once = np.zeros(V, dtype=bool)  # codes that appear at most once beyond the recent visits
        once[cond_t + obs + durable + allergy + vaccine] = True
        self.once = t(once)

    # ---- state --------------------------------------------------------------------------------------------

    def init_state(self, batch: int) -> BatchState:
        d, f64 = self.device, torch.float64
        z = torch.zeros(batch, dtype=f64, device=d)
        return BatchState(
            st=torch.full((batch,), ST_START, dtype=torch.long, device=d),
            sex=torch.full((batch,), len(SEXES), dtype=torch.long, device=d),
            birth=z.clone(), cur=z.clone(), end=z.clone(),
            last_item=torch.zeros(batch, dtype=torch.long, device=d),
            has_cond=torch.zeros(batch, dtype=torch.bool, device=d),
            band=torch.zeros(batch, dtype=torch.long, device=d),
            n_visit=torch.zeros(batch, dtype=torch.long, device=d),
            seen=torch.zeros((batch, self.v.size), dtype=torch.bool, device=d),
        )

    def age_ids(self, s: BatchState) -> torch.Tensor:
        """[B] long: the model's age input after the last applied token (tokenizer.encode_with_ages): whole
        years of the current time since birth; AGE_UNKNOWN until the birth band is drawn."""
        years = torch.div(s.cur, DAYS_PER_YEAR, rounding_mode="floor").clamp(0, AGE_UNKNOWN - 1).long()
        known = (s.st != ST_START) & (s.st != ST_SEX) & (s.st != ST_BY)
        return torch.where(known, years, AGE_UNKNOWN)

    def mask(self, s: BatchState, pos: int) -> torch.Tensor:
        """[B, V] bool: the tokens allowed at position `pos` (0-based) of each sequence."""
        v = self.v
        m = self.static[s.st * self.n_sex_rows + s.sex]
        lived = self.ref_end - s.birth  # days from birth to the end of the reference date
        a0, a1 = v.offsets["age"]
        g0, g1 = v.offsets["gap"]
        d0, d1 = v.offsets["dur"]
        l0, l1 = v.offsets["val"]
        # AGE (only the death's): before the reference date, not younger than an age condition allows
        m[:, a0:a1] &= (self.age_lo[None] < lived[:, None]) & (self.age_hi[None] > self.min_death0)
        m[:, g0:g1] &= self.gap_lo[None] <= s.cur[:, None]  # never before birth
        m[:, d0:d1] &= self.dur_lo[None] <= (s.end - s.cur)[:, None]  # never past the record's end
        m[:, l0:l1] &= self.val_arange[None] < self.item_nbins[s.last_item][:, None]
        if self.lim_cols.numel():
            cur = s.cur[:, None]
            m[:, self.lim_cols] &= (self.lim_lo[None] <= cur) & (cur < self.lim_hi[None])
        old = s.n_visit > RECENT_VISITS
        if bool(old.any()):
            m &= ~(s.seen & old[:, None])
        if self.cond_tokens.numel():
            missing = ~s.has_cond
            m[:, v.END] &= ~missing
            # close to the end of the context: put the required code in as soon as it is allowed
            if pos >= self.max_len - 8:
                can = m[:, self.cond_tokens].any(dim=1) & missing
                if bool(can.any()):
                    forced = torch.zeros_like(m[0])
                    forced[self.cond_tokens] = True
                    m[can] &= forced
        if pos + 1 + self.need_max > self.max_len:
            m &= self.need[s.st] <= (self.max_len - pos - 1)
        dead_end = ~m.any(dim=1)
        if bool(dead_end.any()):  # only reachable when a required code never became allowed: end it
            m[dead_end, v.END] = True
        return m

    def advance(self, s: BatchState, tok: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Apply the chosen tokens [B]; u [B] uniform(0,1). Returns the in-bucket draws [B] float64: birth day
        number, or days since birth (death, visit time, end time), or the value."""
        v = self.v
        draw = torch.zeros_like(s.cur)
        st = s.st

        def grp(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            a, b = v.offsets[name]
            return (tok >= a) & (tok < b), (tok - a).clamp(0, b - a - 1)

        is_sex, sx = grp("sex")
        s.sex = torch.where(is_sex, sx, s.sex)
        # birth day inside the band (and inside the age condition); a living record ends at the reference date
        is_by, band = grp("by")
        birth = self.birth_in_band(band, u)
        s.birth = torch.where(is_by, birth, s.birth)
        s.band = torch.where(is_by, band, s.band)
        draw = torch.where(is_by, birth, draw)
        lived = self.ref_end - s.birth
        s.end = torch.where(is_by, lived, s.end)
        # AGE: the death, which becomes the record's end
        is_age, ai = grp("age")
        x = self.death_in_age(ai, lived, u)
        s.end = torch.where(is_age, x, s.end)
        draw = torch.where(is_age, x, draw)
        s.cur = torch.where(is_by | is_age, s.end, s.cur)
        # GAP: the next (older) visit, that many days before the current one, never before birth
        is_gap, gi = grp("gap")
        x = self.visit_before(s.cur, gi, u)
        draw = torch.where(is_gap, x, draw)
        s.cur = torch.where(is_gap, x, s.cur)
        # DUR: end = start + duration (never before the start, never after the record's end)
        is_dur, di = grp("dur")
        end = self.end_after(s.cur, di, s.end, u)
        draw = torch.where(is_dur, end, draw)
        # VAL: value inside the bin of the last code, rounded, kept inside the physiologic range
        is_val, bi = grp("val")
        x = self.value_in_bin(s.last_item, bi, u)
        draw = torch.where(is_val, x, draw)
        # items
        is_item = tok >= v.start("item")
        s.last_item = torch.where(is_item & ~self.is_value_item[tok], tok, s.last_item)
        if self.cond_tokens.numel():
            s.has_cond |= torch.isin(tok, self.cond_tokens)
        s.n_visit += is_gap  # a GAP begins a visit
        s.seen[torch.arange(tok.shape[0], device=tok.device), tok] |= self.once[tok]
        s.st = self.nxt[st, tok]
        return draw

    # ---- in-bucket draws (u uniform in [0, 1)); shared with the visit sampler ----------------------------

    def birth_in_band(self, band: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Birth day number inside the band (and inside the age condition)."""
        blo, bhi = self.band_lo[band], self.band_hi[band]
        return torch.minimum(torch.floor(blo + u * (bhi - blo + 1)), bhi)

    def death_in_age(self, ai: torch.Tensor, lived: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Days from birth to a death in age year ai, before the reference date, not younger than an age
        condition allows."""
        lo = torch.clamp(self.age_lo[ai], min=self.min_death0)
        hi = torch.maximum(torch.minimum(self.age_hi[ai], lived), lo)
        return lo + u * (hi - lo)

    def visit_before(self, cur: torch.Tensor, gi: torch.Tensor, u: torch.Tensor,
                     floor: torch.Tensor | float = 0.0) -> torch.Tensor:
        """Days from birth to the visit gap bucket gi before the time cur, never before floor (birth, or where
        the record must begin)."""
        lo = self.gap_lo[gi]
        hi = torch.maximum(torch.minimum(self.gap_hi[gi], cur - floor), lo)
        return torch.maximum(cur - (lo + u * (hi - lo)), torch.as_tensor(floor, dtype=cur.dtype, device=cur.device))

    def end_after(self, start: torch.Tensor, di: torch.Tensor, record_end: torch.Tensor,
                  u: torch.Tensor) -> torch.Tensor:
        """start + a duration in bucket di, never past the record's end."""
        lo = self.dur_lo[di]
        hi = torch.maximum(torch.minimum(self.dur_hi[di], record_end - start), lo)
        return start + lo + u * (hi - lo)

    def value_in_bin(self, item: torch.Tensor, bi: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """A value inside bin bi of the code token item, rounded to its decimals, inside its physiologic range."""
        e = self.val_edges[item]
        lo = e.gather(1, bi[:, None]).squeeze(1)
        hi = e.gather(1, (bi + 1)[:, None]).squeeze(1)
        x = lo + u * (hi - lo)
        f64 = torch.float64
        scale = torch.pow(torch.tensor(10.0, dtype=f64, device=x.device), self.item_dec[item].to(f64))
        x = torch.round(x * scale) / scale
        return torch.minimum(torch.maximum(x, e[:, 0]), e.gather(1, self.item_nbins[item][:, None]).squeeze(1))

    def check(self, tokens: list[int]) -> str | None:
        """Grammar-only validation of one sequence (no time/clinical masks): None if valid, else why. A sequence
        without END is valid where END could follow (a truncated record, tokenizer.py)."""
        st, last_item = ST_START, 0
        allowed = self.allowed.cpu().numpy()
        nxt = self.nxt.cpu().numpy()
        nb = self.item_nbins.cpu().numpy()
        l0 = self.v.start("val")
        for i, tok in enumerate(tokens):
            if not allowed[st, tok]:
                return f"position {i}: token {self.v.describe(tok)} not allowed in state {st}"
            if l0 <= tok < l0 + self.v.n_val and tok - l0 >= nb[last_item]:
                return f"position {i}: value bin {tok - l0} beyond the code's {nb[last_item]} bins"
            if tok >= self.v.start("item") and self.v.item_of(tok).kind != "value":
                last_item = tok
            st = nxt[st, tok]
        if st == ST_FIN or (self.v.END not in tokens and allowed[st, self.v.END]):
            return None
        return f"sequence ends in state {st}"


def _jan1(year: int) -> date:
    return date(max(year, 1), 1, 1)



def replay(grammar: Grammar, tokens: torch.Tensor, generator: torch.Generator | None = None,
           times: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher-forced draws for given sequences [B, L] (PAD after END): turns training sequences into
    timelines with the same in-bucket jitter the sampler uses. Constraint masks are not applied.
    times [B, L] float64 (NaN elsewhere), optional: fixed draws of the birth band (day number), death age and
    gap tokens (days since birth) that replace the in-bucket draws there (visits.visit_time_draws: times placed
    inside each visit's known age year, so the decoded record does not drift), later draws built on them."""
    B, L = tokens.shape
    s = grammar.init_state(B)
    draws = torch.zeros((B, L), dtype=torch.float64, device=tokens.device)
    b0, b1 = grammar.v.offsets["by"]
    a0, a1 = grammar.v.offsets["age"]
    for pos in range(L):
        u = torch.rand(B, generator=generator, dtype=torch.float64, device=tokens.device)
        draws[:, pos] = grammar.advance(s, tokens[:, pos], u)
        if times is not None:
            fix = ~torch.isnan(times[:, pos])
            if bool(fix.any()):
                x, tok = times[:, pos], tokens[:, pos]
                is_by = fix & (tok >= b0) & (tok < b1)
                is_age = fix & (tok >= a0) & (tok < a1)
                s.birth = torch.where(is_by, x, s.birth)
                s.end = torch.where(is_by, grammar.ref_end - x, torch.where(is_age, x, s.end))
                s.cur = torch.where(is_by, s.end, torch.where(fix, x, s.cur))
                draws[:, pos] = torch.where(fix, x, draws[:, pos])
    return draws
