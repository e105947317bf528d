"""What differs between the two model architectures for training and scoring: how patients become a dataset,
how a batch is collated, which network, and the per-patient loss. train.py and scoring.py stay arch-agnostic.

  token: one position per token (tokenizer.py, transformer.py), long histories compressed to max_len tokens;
  visit: one position per visit (visits.py, visitmodel.py), whole records up to max_visits visits.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from fhirsynth.model.config import ModelConfig
from fhirsynth.model.tokenizer import Tokenizer
from fhirsynth.model.vocab import ETHNICITIES, RACES, SEXES, Vocab
from fhirsynth.timeline.types import Timeline


@dataclasses.dataclass
class Arch:
    name: str
    dataset: Dataset
    collate: Callable[[list], Any]
    model: nn.Module
    # (model, batch on device) -> (per-patient loss [B], the number of scored units: tokens or visits)
    loss: Callable[[nn.Module, Any], tuple[torch.Tensor, int]]
    to_device: Callable[[Any, torch.device], Any]
    batch_size_of: Callable[[Any], int]
    unit: str  # "token" | "visit"
    norm: float  # the public per-patient loss normalizer (max_len or max_visits)


def visit_sizes(vocab: Vocab) -> dict[str, int]:
    from fhirsynth.model.visits import VisitLayout

    L = VisitLayout(vocab)
    return {"n_features": L.n_features, "n_content": L.NC, "n_enc": L.NE + 1, "n_type": L.NT + 1, "n_dur": L.n_dur,
            "n_gap": L.n_gap, "n_values": L.n_values, "n_sex": len(SEXES), "n_bands": vocab.n_bands,
            "n_race": len(RACES), "n_eth": len(ETHNICITIES), "n_ages": vocab.n_ages}


def build_network(mc: ModelConfig) -> nn.Module:
    if mc.arch == "visit":
        from fhirsynth.model.visitmodel import VisitModel, VisitSizes

        assert mc.visit_sizes is not None
        return VisitModel(mc, VisitSizes(**mc.visit_sizes))
    from fhirsynth.model.transformer import Transformer

    return Transformer(mc)


def build_arch(mc: ModelConfig, vocab: Vocab, timelines: list[Timeline], stats: Counter, *,
               entry_weight: float = 1.0) -> Arch:
    """The dataset, collate function and network of mc.arch (fills mc's data-independent sizes); entry_weight:
    the visit model's repeat and lead terms in the training loss (TrainConfig.entry_weight)."""
    tokenizer = Tokenizer(vocab)
    mc.vocab_size = vocab.size
    if mc.arch == "visit":
        from fhirsynth.model.visits import VisitLayout, visit_dataset

        layout = VisitLayout(vocab)
        mc.visit_sizes = visit_sizes(vocab)
        dataset, collate, _ = visit_dataset(tokenizer, layout, timelines, mc.max_visits, stats)
        allowed = torch.as_tensor(layout.allowed)

        def loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
            per = model(**batch, allowed=allowed.to(batch["feats"].device), entry_weight=entry_weight)
            return per, int((batch["eg_tgt"] >= 0).sum())

        def to_device(batch, dev):
            if not isinstance(batch, dict):  # Opacus' first empty Poisson batch (see train.as_batch)
                batch = collate([])
            return {k: t.to(dev) for k, t in batch.items()}

        return Arch("visit", dataset, collate, build_network(mc), loss, to_device,
                    lambda b: int(b["feats"].shape[0]), "visit", float(mc.max_visits))
    from fhirsynth.model.train import SeqDataset, as_batch, pad_collate
    from fhirsynth.model.transformer import patient_loss

    seqs = [s for s in (tokenizer.encode_with_ages(t, stats) for t in timelines) if s is not None]

    def tloss(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        inp, tgt = batch[:, :-1], batch[:, 1:, 0]
        logits = model(inp[..., 0], inp[..., 1])
        return patient_loss(logits, tgt, mc.max_len), int((tgt != 0).sum())

    return Arch("token", SeqDataset(seqs), pad_collate, build_network(mc), tloss,
                lambda b, dev: as_batch(b).to(dev), lambda b: int(b.shape[0]), "token", float(mc.max_len))
