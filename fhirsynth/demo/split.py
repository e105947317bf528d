"""The demo's holdout: a seeded share of the sample's patients that training never sees, to measure against."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fhirsynth.timeline.io import TimelineWriter, read_timelines

log = logging.getLogger(__name__)


def split_holdout(src: Path, train: Path, holdout: Path, fraction: float, seed: int) -> tuple[int, int]:
    """Write round(fraction * n) patients of the timelines dir `src` to `holdout`, the rest to `train`; returns
    (n_train, n_holdout). The draw is over the sorted patient ids, so it depends on the seed and the ids only."""
    ids = sorted(tl.patient.patient_id for tl in read_timelines(src))
    n_hold = min(max(round(fraction * len(ids)), 1), len(ids) - 1) if len(ids) > 1 else 0
    held = set(np.random.default_rng(seed).choice(ids, size=n_hold, replace=False).tolist()) if n_hold else set()
    with TimelineWriter(train) as wt, TimelineWriter(holdout) as wh:
        for tl in read_timelines(src):
            (wh if tl.patient.patient_id in held else wt).add(tl)
    return wt.n_patients, wh.n_patients
