"""The visit model: a causal transformer over visits, not tokens (in the manner of HALO, Theodorou et al. 2023).

Position 0 is the patient's static part; position t >= 1 is visit t (newest first, visits.py), entered as ONE
embedding: a linear map of its multi-hot features (encounter class, type and duration, content items, each
binned code's own value bin, answers, condition durations) plus embeddings of its gap and age (whole years,
and under three years its week or month, bins.early_age_id: infant care runs by weeks and months). The output at
position t predicts visit t + 1:
  * END or its gap bucket (categorical);
  * given that gap and the visit's age, its content as a MIXTURE of K product distributions: a component k
    (a latent kind of visit: a wellness visit with its vitals panel and labs, an emergency, a refill...) is
    drawn first, then the encounter class, type, duration (categorical) and every content item (Bernoulli)
    independently given k. The mixture is what keeps within-visit co-occurrence: independent Bernoullis alone
    would mix the items of different kinds of visit;
  * the value of each present content item, from its own value space only (visits.VisitLayout.allowed), given
    the context, the item and the same item's value at its previous visit (so a patient's blood pressure, weight
    and labs follow a trajectory instead of being drawn afresh from the population at every visit).
    Beside it, from the same state, how many times the item occurs in the visit with that value (a REPEAT_EDGES
    bucket: a vital written twice, a lab repeated through a stay) and how long before the visit its own time lies
    (a gap bucket, 0 = the visit's day: a condition's onset before the encounter that records it).
The static part (birth band given sex, race, ethnicity, death age) comes from small heads on its own embeddings;
sex and the deceased share are drawn from the DP releases of the vocabulary (vocab.py), not from the model.

Opacus-compatible like transformer.py: parameters only in nn.Embedding, nn.Linear, nn.LayerNorm, every
activation batch-first. The per-patient loss is the sum of all its terms divided by the public max_visits.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fhirsynth.model.bins import N_EARLY_AGE_IDS, N_REPEAT
from fhirsynth.model.config import ModelConfig
from fhirsynth.model.transformer import Block, KVCache


ENTRY_TERMS = ("repeat", "lead")  # per-entry terms beside the value: how often and how long before the visit


@dataclass(frozen=True)
class VisitSizes:
    """The index spaces the model needs (from visits.VisitLayout), stored in config.json."""

    n_features: int
    n_content: int
    n_enc: int  # encounter classes + none
    n_type: int  # encounter types + none
    n_dur: int
    n_gap: int
    n_values: int
    n_sex: int
    n_bands: int
    n_race: int
    n_eth: int
    n_ages: int


class VisitModel(nn.Module):
    def __init__(self, cfg: ModelConfig, sz: VisitSizes) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
            raise ValueError("d_model must be a multiple of n_heads, n_heads a multiple of n_kv_heads")
        d, K = cfg.d_model, cfg.n_components
        self.cfg, self.sz, self.K = cfg, sz, K
        # static part
        self.s_sex = nn.Embedding(sz.n_sex, d)
        self.s_band = nn.Embedding(sz.n_bands, d)
        self.s_race = nn.Embedding(sz.n_race, d)
        self.s_eth = nn.Embedding(sz.n_eth, d)
        self.s_death = nn.Embedding(2, d)
        self.s_dage = nn.Embedding(sz.n_ages, d)
        self.band_head = nn.Linear(d, sz.n_bands)
        self.race_head = nn.Linear(d, sz.n_race)
        self.eth_head = nn.Linear(d, sz.n_eth)
        self.dage_head = nn.Linear(d, sz.n_ages)
        # visits
        self.visit_in = nn.Linear(sz.n_features, d, bias=False)
        self.gap_in = nn.Embedding(sz.n_gap + 1, d)  # + "no gap" at the static position
        self.age_in = nn.Embedding(cfg.n_age_ids, d)
        self.early_in = nn.Embedding(N_EARLY_AGE_IDS, d)
        self.pos = nn.Embedding(cfg.max_visits + 1, d)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(d)
        self.eg_head = nn.Linear(d, 1 + sz.n_gap)  # END | gap bucket
        # the next visit, given its gap and age
        self.gap_q = nn.Embedding(sz.n_gap, d)
        self.age_q = nn.Embedding(cfg.n_age_ids, d)
        self.early_q = nn.Embedding(N_EARLY_AGE_IDS, d)
        self.ln_c = nn.LayerNorm(d)
        self.mix_head = nn.Linear(d, K)
        self.comp = nn.Linear(d, K * d)
        self.item_head = nn.Linear(d, sz.n_content)
        self.enc_head = nn.Linear(d, sz.n_enc)
        self.type_head = nn.Linear(d, sz.n_type)
        self.edur_head = nn.Linear(d, sz.n_dur + 1)
        # values
        self.v_item = nn.Embedding(sz.n_content, d)
        self.v_prev = nn.Embedding(sz.n_features + 1, d)  # the code's value at its previous visit (or none)
        self.v_fc = nn.Linear(d, d)
        self.v_head = nn.Linear(d, sz.n_values)
        self.r_head = nn.Linear(d, N_REPEAT)  # repeats of the item (with its value) in the visit
        self.l_head = nn.Linear(d, sz.n_gap)  # the entry's lead before the visit (a gap bucket)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("out.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))
        # a visit holds a few of hundreds of items: start every item near a 2% chance, not 50% (a public
        # constant; from 50% the first epochs only learn that items are rare)
        nn.init.constant_(self.item_head.bias, -4.0)
        # most entries occur once: start there (P(once) ~ 0.9, public constants), not at 1 / N_REPEAT
        with torch.no_grad():
            self.r_head.bias[0] = 4.0
            self.l_head.bias[0] = 5.0  # and on the visit's day (P ~ 0.85)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    # ---- pieces shared by training and sampling ------------------------------------------------------------

    def static_embedding(self, static: torch.Tensor) -> torch.Tensor:
        """static [..., 6] (sex, band, race, eth, dead, death age) -> [..., d]."""
        return (self.s_sex(static[..., 0]) + self.s_band(static[..., 1]) + self.s_race(static[..., 2])
                + self.s_eth(static[..., 3]) + self.s_death(static[..., 4]) + self.s_dage(static[..., 5]))

    def static_logits(self, static: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Logits of band | sex, race | sex, band, eth | sex, band, race, death age | sex, band."""
        sx, bd, rc = self.s_sex(static[..., 0]), self.s_band(static[..., 1]), self.s_race(static[..., 2])
        return (self.band_head(F.gelu(sx)), self.race_head(F.gelu(sx + bd)), self.eth_head(F.gelu(sx + bd + rc)),
                self.dage_head(F.gelu(sx + bd)))

    def time_embedding(self, gap: torch.Tensor, age: torch.Tensor, early: torch.Tensor) -> torch.Tensor:
        """The input embedding of a position's gap, age id and early-age id."""
        return self.gap_in(gap) + self.age_in(age) + self.early_in(early)

    def context(self, h: torch.Tensor, gq: torch.Tensor, aq: torch.Tensor, eq: torch.Tensor) -> torch.Tensor:
        """The state that draws the next visit's content, given its gap, age id and early-age id."""
        return self.ln_c(h + self.gap_q(gq) + self.age_q(aq) + self.early_q(eq))

    def components(self, c: torch.Tensor) -> torch.Tensor:
        """c [..., d] -> component states [..., K, d]."""
        return F.gelu(self.comp(c)).view(*c.shape[:-1], self.K, c.shape[-1])

    def value_state(self, c: torch.Tensor, item: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """The state that draws an entry's value (v_head), its repeats in the visit (r_head) and its lead before
        the visit (l_head)."""
        return F.gelu(self.v_fc(c + self.v_item(item) + self.v_prev(prev)))

    # ---- training ----------------------------------------------------------------------------------------

    def forward(self, feats, gap_in, age_in, early_in, static, eg_tgt, gq, aq, eq, x_tgt, enc_tgt, type_tgt,
                edur_tgt, vi_pos, vi_item, vi_val, vi_prev, vi_rep, vi_lead, allowed,
                entry_weight: float = 1.0) -> torch.Tensor:
        """The summed NLL of each patient [B] (the batch tensors of visits.VisitCollate; allowed [NC, n_values]),
        the repeat and lead terms times entry_weight (training's TrainConfig.entry_weight; 1 = the likelihood)."""
        terms = self.loss_terms(feats, gap_in, age_in, early_in, static, eg_tgt, gq, aq, eq, x_tgt, enc_tgt,
                                type_tgt, edur_tgt, vi_pos, vi_item, vi_val, vi_prev, vi_rep, vi_lead, allowed)
        nll = sum(t * (entry_weight if k in ENTRY_TERMS else 1.0) for k, t in terms.items())
        return nll / float(self.cfg.max_visits)

    def loss_terms(self, feats, gap_in, age_in, early_in, static, eg_tgt, gq, aq, eq, x_tgt, enc_tgt, type_tgt,
                   edur_tgt, vi_pos, vi_item, vi_val, vi_prev, vi_rep, vi_lead, allowed) -> dict[str, torch.Tensor]:
        """Each patient's NLL [B] per term (static, gap, content, value, repeat, lead), before the division by
        max_visits: what each part of the record costs, and under DP how the clipped per-patient gradient is
        shared among them (benchmarks/dp_gradient_share.py)."""
        B, T, _ = feats.shape
        pos = torch.arange(T, device=feats.device).unsqueeze(0).expand(B, T)
        x = self.visit_in(feats) + self.time_embedding(gap_in, age_in, early_in) + self.pos(pos)
        x = torch.cat([x[:, :1] + self.static_embedding(static)[:, None], x[:, 1:]], dim=1)
        for blk in self.blocks:
            x = blk(x)
        h = self.ln_f(x)  # [B, T, d]
        # static terms
        bl, rl, el, dl = self.static_logits(static)
        static_nll = (F.cross_entropy(bl, static[:, 1], reduction="none")
                      + F.cross_entropy(rl, static[:, 2], reduction="none")
                      + F.cross_entropy(el, static[:, 3], reduction="none")
                      + F.cross_entropy(dl, static[:, 5], reduction="none") * static[:, 4].to(h.dtype))
        # END / gap
        eg = self.eg_head(h)
        ok = eg_tgt >= 0
        gap_nll = (F.cross_entropy(eg.transpose(1, 2), eg_tgt.clamp(min=0), reduction="none") * ok).sum(1)
        # visit content: mixture over K components
        vis = enc_tgt >= 0  # [B, T] a visit follows
        c = self.context(h, gq, aq, eq)
        z = self.components(c)  # [B, T, K, d]
        logp_k = F.log_softmax(self.mix_head(c), dim=-1)  # [B, T, K]
        il = self.item_head(z)  # [B, T, K, NC]
        xt = x_tgt[:, :, None, :]
        ll = -F.binary_cross_entropy_with_logits(il, xt.expand_as(il), reduction="none").sum(-1)  # [B, T, K]
        for head, tgt in ((self.enc_head, enc_tgt), (self.type_head, type_tgt), (self.edur_head, edur_tgt)):
            lp = F.log_softmax(head(z), dim=-1)  # [B, T, K, n]
            ll = ll + lp.gather(-1, tgt.clamp(min=0)[:, :, None, None].expand(B, T, self.K, 1)).squeeze(-1)
        visit_ll = torch.logsumexp(logp_k + ll, dim=-1)  # [B, T]
        content_nll = -(visit_ll * vis).sum(1)
        # values of the present items
        cv = c.gather(1, vi_pos[:, :, None].expand(B, vi_pos.shape[1], c.shape[-1]))  # [B, M, d]
        hv = self.value_state(cv, vi_item, vi_prev)
        vl = self.v_head(hv).masked_fill(~allowed[vi_item], float("-inf"))
        vok = (vi_val >= 0) & allowed[vi_item, vi_val.clamp(min=0)]
        vnll = F.cross_entropy(vl.transpose(1, 2), vi_val.clamp(min=0), reduction="none")
        value_nll = torch.where(vok, vnll, torch.zeros_like(vnll)).sum(1)
        entry = (vi_val >= 0).to(h.dtype)  # every entry (padding has vi_val -1)
        repeat_nll = (F.cross_entropy(self.r_head(hv).transpose(1, 2), vi_rep, reduction="none") * entry).sum(1)
        lead_nll = (F.cross_entropy(self.l_head(hv).transpose(1, 2), vi_lead, reduction="none") * entry).sum(1)
        return {"static": static_nll, "gap": gap_nll, "content": content_nll, "value": value_nll,
                "repeat": repeat_nll, "lead": lead_nll}

    # ---- sampling ----------------------------------------------------------------------------------------

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype = torch.float32) -> KVCache:
        # positions: the static part and up to max_visits visits
        return KVCache(dataclasses.replace(self.cfg, max_len=self.cfg.max_visits + 1), batch, device, dtype)

    @torch.no_grad()
    def step(self, x_in: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        """The input embedding x_in [B, d] at position pos -> h [B, d], filling the cache."""
        B = x_in.shape[0]
        p = torch.full((B,), pos, dtype=torch.long, device=x_in.device)
        x = (x_in + self.pos(p))[:, None]
        for i, blk in enumerate(self.blocks):
            x = x + blk.attn.step(blk.ln1(x), pos, cache.k[i], cache.v[i])
            x = x + blk.mlp(blk.ln2(x))
        return self.ln_f(x)[:, 0]

