"""Per-patient sequence likelihood under a trained model (for membership-inference attacks)."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import torch

from fhirsynth.model.checkpoint import load_model
from fhirsynth.model.tokenizer import Tokenizer
from fhirsynth.model.train import SeqDataset, pad_collate
from fhirsynth.model.transformer import sequence_loss
from fhirsynth.timeline.types import Timeline


@torch.no_grad()
def sequence_nll(model_dir: str | os.PathLike, timelines: list[Timeline], *, batch_size: int = 32,
                 device: str = "auto") -> np.ndarray:
    """Mean NLL per scored unit of each timeline (NaN for a timeline that cannot be encoded, i.e. one without a
    birth date), encoded as in training: per token for the token model, per visit for the visit model."""
    lm = load_model(model_dir, device)
    tok = Tokenizer(lm.vocab)
    stats: Counter = Counter()
    if lm.model_config.arch == "visit":
        return _visit_nll(lm, tok, timelines, batch_size, stats)
    seqs = [tok.encode_with_ages(t, stats) for t in timelines]
    out = np.full(len(timelines), np.nan, dtype=np.float64)
    idx = [i for i, s in enumerate(seqs) if s is not None]
    ds = SeqDataset([seqs[i] for i in idx])  # the training layout: (token id, age id) pairs
    for start in range(0, len(idx), batch_size):
        chunk = idx[start: start + batch_size]
        batch = pad_collate([ds[j] for j in range(start, start + len(chunk))]).to(lm.device)
        logits = lm.model(batch[:, :-1, 0], batch[:, :-1, 1])
        out[chunk] = sequence_loss(logits, batch[:, 1:, 0]).double().cpu().numpy()
    return out


def _visit_nll(lm, tok: Tokenizer, timelines: list[Timeline], batch_size: int, stats: Counter) -> np.ndarray:
    from fhirsynth.model.visits import VisitLayout, visit_dataset

    layout = VisitLayout(lm.vocab)
    ds, collate, idx = visit_dataset(tok, layout, timelines, lm.model_config.max_visits, stats)
    out = np.full(len(timelines), np.nan, dtype=np.float64)
    allowed = torch.as_tensor(layout.allowed, device=lm.device)
    for start in range(0, len(idx), batch_size):
        chunk = idx[start: start + batch_size]
        batch = {k: t.to(lm.device) for k, t in collate([ds[j] for j in range(start, start + len(chunk))]).items()}
        total = lm.model(**batch, allowed=allowed) * float(lm.model_config.max_visits)
        units = (batch["eg_tgt"] >= 0).sum(dim=1).clamp(min=1)
        out[chunk] = (total / units).double().cpu().numpy()
    return out
