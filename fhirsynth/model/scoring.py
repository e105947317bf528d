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
    """Mean next-token NLL of each timeline's token sequence (NaN for a timeline that cannot be tokenized,
    i.e. one without a birth date). Same tokenizer and compression as training."""
    lm = load_model(model_dir, device)
    tok = Tokenizer(lm.vocab)
    stats: Counter = Counter()
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
