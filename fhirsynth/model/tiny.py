"""A tiny model, really trained with DP-SGD on random timelines (fhirsynth.timeline.samples), in seconds.

For the tests, benchmarks and load tests that need a model to sample from ($synthesize, generation at scale),
not for synthetic data anyone should use: 40 made-up patients, one epoch, a one-layer 32-wide transformer.
"""

from __future__ import annotations

from pathlib import Path


def train_tiny_model(root: Path) -> Path:
    """Write random timelines to root/timelines, train root/model on them (epsilon 8) and return the model dir."""
    from fhirsynth.model.config import ModelConfig
    from fhirsynth.model.train import train_model
    from fhirsynth.timeline.io import write_timelines
    from fhirsynth.timeline.samples import random_timelines

    root = Path(root)
    write_timelines(random_timelines(40, seed=3, visits=4), root / "timelines")
    train_model(root / "timelines", root / "model", dp=True, epsilon=8.0, epochs=1, device="cpu",
                model_config=ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=256))
    return root / "model"
