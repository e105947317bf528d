"""The DP-SGD regime a trained model's budget allows, without training: the noise multiplier train would pick for
each expected batch and epoch count, and the effective noise sigma / B per step (issue 15 item 2).

    python benchmarks/dp_regime.py MODEL_DIR... [--batches 32,64,128,256] [--epochs 10,20,40]

For every DP model dir: its releases before training (the vocabulary and the measurements, read back from
privacy.json and composed as train composes them: composition.releases_of, released_rdp), its DP patient count
and delta; then, for each (batch, epochs), the steps and sampling rate train derives from that count
(train.steps_per_epoch_for) and the smallest noise multiplier that keeps the whole at the model's epsilon
(composition.sgd_noise_multiplier). Prints one markdown table per model. Nothing here touches the data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fhirsynth.model import composition  # noqa: E402
from fhirsynth.model.train import _quiet_opacus, steps_per_epoch_for  # noqa: E402


def released_before_training(privacy: dict):
    """(RDP curve of the releases before training, the delta it converts at), composed as train composes them."""
    releases = composition.releases_of(privacy["vocabulary"], privacy.get("measurements"))
    return composition.released_rdp(releases), composition.conversion_delta(releases, privacy["delta"])


def regime_rows(privacy: dict, batches: list[int], epochs: list[int]) -> list[dict]:
    """(batch, epochs, steps, q, sigma, sigma / B) for one model's privacy.json; batches above the DP count skipped."""
    released, d_conv = released_before_training(privacy)
    n = int(privacy["n_estimate"])
    rows = []
    for b in batches:
        if b > n:
            continue
        for e in epochs:
            per_epoch = steps_per_epoch_for(n, b)
            steps, q = e * per_epoch, 1.0 / per_epoch
            sigma = composition.sgd_noise_multiplier(float(privacy["epsilon_target"]), d_conv, q, steps, released)
            rows.append({"batch": b, "epochs": e, "steps": steps, "q": q, "sigma": sigma, "sigma_per_b": sigma / b})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--batches", default="32,64,128,256,512")
    ap.add_argument("--epochs", default="10,20,40")
    args = ap.parse_args()
    try:
        batches = [int(x) for x in args.batches.split(",")]
        epochs = [int(x) for x in args.epochs.split(",")]
    except ValueError:
        ap.error("--batches and --epochs take comma-separated integers")
    _quiet_opacus()
    for model in args.models:
        try:
            privacy = json.loads((model / "privacy.json").read_text())
        except (OSError, ValueError) as exc:
            ap.error(f"{model}: no readable privacy.json ({exc})")
        if not privacy.get("dp"):
            ap.error(f"{model}: trained without DP (no noise to plan)")
        pre = composition.epsilon_of(*released_before_training(privacy))
        print(f"\n{model}: DP patient count {privacy['n_estimate']}, ε {privacy['epsilon_target']:g}, "
              f"the releases before training alone ε {pre:.2f}\n")
        print("| batch | epochs | steps | sampling rate | σ | σ / B |\n|---|---|---|---|---|---|")
        for r in regime_rows(privacy, batches, epochs):
            print(f"| {r['batch']} | {r['epochs']} | {r['steps']} | {r['q']:.3f} | {r['sigma']:.2f} | "
                  f"{r['sigma_per_b']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
