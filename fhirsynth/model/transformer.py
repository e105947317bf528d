"""Decoder-only transformer (torch only: sees token ids, never FHIR).

Opacus-compatible by construction: only nn.Embedding, nn.Linear and nn.LayerNorm carry parameters (all have
per-sample gradient rules); attention is nn.Linear + F.scaled_dot_product_attention (no nn.MultiheadAttention);
no BatchNorm; input and output embeddings are NOT tied (a shared parameter would get two grad samples).
Position embeddings take [B, T] position ids so the per-sample gradient sees the batch dimension.

Besides the token ids the model reads an age id per position: the record's current age in whole years after
that token (tokenizer.encode_with_ages; the sampler computes the same from its exact draws, grammar.age_ids).
Visits are generated newest first as gaps back in time, and a small model does not sum log-spaced gaps itself:
without the age it did not know when a record reached birth (a tenth of synthetic records piled visits onto the
birth day) nor which conditions fit the age of a visit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fhirsynth.model.config import ModelConfig


class KVCache:
    """Pre-allocated keys and values for incremental decoding, per layer: keys transposed [B, kv_heads, head_dim,
    max_len], values [B, kv_heads, max_len, head_dim]. Both slices a step reads (positions 0..pos) are then plain
    strided matrices for the batched matmuls; keys stored untransposed cost a copy of the whole slice every step
    (measured: 1.5x slower attention at 500 cached positions on CPU)."""

    def __init__(self, cfg: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        hd = cfg.d_model // cfg.n_heads
        self.k = [torch.zeros((batch, cfg.n_kv_heads, hd, cfg.max_len), device=device, dtype=dtype)
                  for _ in range(cfg.n_layers)]
        self.v = [torch.zeros((batch, cfg.n_kv_heads, cfg.max_len, hd), device=device, dtype=dtype)
                  for _ in range(cfg.n_layers)]

    def select(self, idx: torch.Tensor) -> None:
        """Keep only the batch rows in idx (finished sequences leave the batch)."""
        self.k = [k.index_select(0, idx) for k in self.k]
        self.v = [v.index_select(0, idx) for v in self.v]


class Attention(nn.Module):
    """Causal self-attention with n_kv_heads key/value heads shared by groups of query heads (multi-query /
    grouped-query attention): the KV cache, whose memory traffic bounds CPU sampling speed, shrinks by
    n_heads / n_kv_heads."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv = cfg.n_heads, cfg.n_kv_heads
        self.hd = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * self.n_kv * self.hd)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        C, kv = self.n_heads * self.hd, self.n_kv * self.hd
        q, k, v = x.split([C, kv, kv], dim=2)
        q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # [B, Hkv, T, hd]
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self._heads(self.qkv(x))
        g = self.n_heads // self.n_kv
        if g > 1:  # [B, Hkv, T, hd] -> [B, H, T, hd]
            k = k.repeat_interleave(g, dim=1)
            v = v.repeat_interleave(g, dim=1)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)  # [B, H, T, hd]
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def step(self, x: torch.Tensor, pos: int, cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
        """One new position for every row: x [B, 1, C]; attends to the cached positions 0..pos."""
        B, _, C = x.shape
        q, k, v = self._heads(self.qkv(x))  # q [B, H, 1, hd], k/v [B, Hkv, 1, hd]
        cache_k[:, :, :, pos] = k[:, :, 0]
        cache_v[:, :, pos] = v[:, :, 0]
        g, P = self.n_heads // self.n_kv, pos + 1
        # 3-D views for bmm: the query heads of each kv head as one [g, hd] matrix (4-D matmul was 2x slower)
        qg = q.reshape(B * self.n_kv, g, self.hd) * (self.hd ** -0.5)
        keys = cache_k.view(B * self.n_kv, self.hd, -1)[:, :, :P]  # [B*Hkv, hd, P]
        vals = cache_v.view(B * self.n_kv, -1, self.hd)[:, :P]  # [B*Hkv, P, hd]
        y = torch.bmm(torch.softmax(torch.bmm(qg, keys), dim=-1), vals)  # [B*Hkv, g, hd]
        return self.proj(y.reshape(B, 1, C))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.out = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.out(F.gelu(self.fc(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
            raise ValueError("d_model must be a multiple of n_heads, n_heads a multiple of n_kv_heads")
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.age = nn.Embedding(cfg.n_age_ids, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if name.endswith("proj.weight") or name.endswith("out.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        """idx [B, T] token ids, ages [B, T] age ids -> logits [B, T, V]."""
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device).unsqueeze(0).expand(B, T)
        x = self.tok(idx) + self.pos(pos) + self.age(ages)  # [B, T, C]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype = torch.float32) -> KVCache:
        return KVCache(self.cfg, batch, device, dtype)

    @torch.no_grad()
    def step(self, tok: torch.Tensor, age: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        """tok [B] and its age id [B] at position pos -> next-token logits [B, V], filling the cache."""
        B = tok.shape[0]
        p = torch.full((B, 1), pos, dtype=torch.long, device=tok.device)
        x = self.tok(tok[:, None]) + self.pos(p) + self.age(age[:, None])  # [B, 1, C]
        for i, blk in enumerate(self.blocks):
            x = x + blk.attn.step(blk.ln1(x), pos, cache.k[i], cache.v[i])
            x = x + blk.mlp(blk.ln2(x))
        return self.head(self.ln_f(x))[:, 0]


def token_nll(logits: torch.Tensor, targets: torch.Tensor, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed next-token NLL [B] and the number of scored tokens [B] (pad targets ignored)."""
    B, T, V = logits.shape
    nll = F.cross_entropy(logits.reshape(B * T, V).float(), targets.reshape(B * T), reduction="none").view(B, T)
    mask = (targets != pad).to(nll.dtype)
    return (nll * mask).sum(dim=1), mask.sum(dim=1)


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """Per-sequence mean next-token NLL [B] (pad targets ignored): a per-patient score (scoring.py)."""
    total, n = token_nll(logits, targets, pad)
    return total / n.clamp(min=1.0)


def patient_loss(logits: torch.Tensor, targets: torch.Tensor, max_len: int, pad: int = 0) -> torch.Tensor:
    """The training loss of each patient [B]: summed next-token NLL / max_len. One patient = one loss term, and
    every token weighs the same. A per-sequence MEAN gave each token of a short record (an infant's) up to 10x the
    weight of one of a long record: the model then drew the 2025-29 birth band for 14% of synthetic patients
    against 2.8% in the data. max_len is a public setting, so the normalizer depends on no one's data."""
    total, _ = token_nll(logits, targets, pad)
    return total / float(max_len)
