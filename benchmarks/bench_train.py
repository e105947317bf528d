"""DP training step time / non-DP step time for the default model and batch, measured in the same run.

Goal: ratio <= 1.5 for the DEFAULT DP path, whose Gaussian noise comes from the OS CSPRNG (securerng: os.urandom,
sum of four Gaussians per value). All paths run the same model, the same logical batch (split into the same
physical batches) and AdamW; the DP paths add Opacus per-sample gradients, clipping and noise. The seeded-noise
DP path (--reproducible-noise, no guarantee) is printed beside it to show what the secret noise costs.
The batches are real training batches of the chosen architecture (archs.build_arch): pass a timelines dir
(e.g. the shared US cohort ingested) for realistic record lengths; without one, random timelines are used.

    OMP_NUM_THREADS=1 python benchmarks/bench_train.py [--arch visit|token] [--timelines DIR] [--steps 3]
        [--batch 64] [--physical 32]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections import Counter

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="visit", choices=("visit", "token"))
    ap.add_argument("--timelines", help="a timelines dir (default: random timelines)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--physical", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    from fhirsynth.model.archs import build_arch, build_network
    from fhirsynth.model.config import ModelConfig, TokenizerConfig
    from fhirsynth.model.dpnoise import NoiseSource
    from fhirsynth.model.vocab import build_vocab
    from fhirsynth.timeline.io import read_timelines
    from fhirsynth.timeline.samples import random_timelines

    dev = torch.device(args.device)
    if args.timelines:
        tls = list(read_timelines(args.timelines))[: 4 * args.batch]
    else:
        tls = random_timelines(4 * args.batch, seed=3, visits=60)
    vocab, _ = build_vocab(tls, TokenizerConfig(), dp=False, epsilon=None, delta=None,
                           noise=NoiseSource.reproducible(0))
    cfg = ModelConfig(arch=args.arch)
    torch.manual_seed(0)
    arch = build_arch(cfg, vocab, tls, Counter())
    items = [arch.dataset[i] for i in range(min(args.batch, len(arch.dataset)))]
    chunks = [arch.to_device(arch.collate(items[i: i + args.physical]), dev)
              for i in range(0, len(items), args.physical)]

    def run(model, opt, dp: bool) -> list[float]:
        times = []
        for i in range(args.steps + 1):  # first step is warm-up
            t = time.perf_counter()
            for j, chunk in enumerate(chunks):
                per, _ = arch.loss(model, chunk)
                loss = per.mean()
                if not dp:
                    loss = loss * (arch.batch_size_of(chunk) / len(items))
                loss.backward()
                if dp:
                    opt.signal_skip_step(do_skip=j < len(chunks) - 1)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            if not dp:
                opt.step()
                opt.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t)
        return times

    plain = build_network(cfg).to(dev)
    t_plain = run(plain, torch.optim.AdamW(plain.parameters(), lr=1e-3), dp=False)
    from fhirsynth.model.securerng import install_noise

    def private_run(secure: bool) -> list[float]:
        private = build_network(cfg).to(dev)
        loader = DataLoader(arch.dataset, batch_size=args.batch, collate_fn=arch.collate)
        model, opt, _ = PrivacyEngine().make_private(
            module=private, optimizer=torch.optim.AdamW(private.parameters(), lr=1e-3), data_loader=loader,
            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
        if secure:
            install_noise(opt)
        return run(model, opt, dp=True)

    t_seeded = private_run(secure=False)
    t_dp = private_run(secure=True)
    p, d, ds = statistics.median(t_plain), statistics.median(t_dp), statistics.median(t_seeded)
    n_params = sum(x.numel() for x in plain.parameters())
    print(f"model: arch={cfg.arch} d={cfg.d_model} layers={cfg.n_layers} heads={cfg.n_heads}/{cfg.n_kv_heads}kv "
          f"params={n_params:,}; batch {len(items)} (physical {args.physical}); {len(tls)} timelines "
          f"({args.timelines or 'random'}); device {args.device}, threads {args.threads}")
    print(f"non-DP step: {p:.3f} s   DP step (secret noise, the default): {d:.3f} s   "
          f"ratio DP/non-DP: {d / p:.2f}  (goal <= 1.5)")
    print(f"DP step with seeded noise (--reproducible-noise, no guarantee): {ds:.3f} s   ratio {ds / p:.2f}; "
          f"secret noise costs {d - ds:+.3f} s per step")


if __name__ == "__main__":
    main()
