"""DP training step time / non-DP step time for the default model and batch, measured in the same run.

Goal: ratio <= 1.5 for the DEFAULT DP path, whose Gaussian noise comes from the OS CSPRNG (securerng: os.urandom,
sum of four Gaussians per value). All paths run the same model, the same logical batch (split into the same
physical batches) and AdamW; the DP paths add Opacus per-sample gradients, clipping and noise. The seeded-noise
DP path (--reproducible-noise, no guarantee) is printed beside it to show what the secret noise costs.

    OMP_NUM_THREADS=1 python benchmarks/bench_train.py [--steps 3] [--seq-len 512] [--batch 64] [--physical 32]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--physical", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from fhirsynth.model.config import ModelConfig
    from fhirsynth.model.transformer import Transformer, sequence_loss

    dev = torch.device(args.device)
    cfg = ModelConfig(vocab_size=args.vocab, max_len=args.seq_len)
    torch.manual_seed(0)
    data = torch.randint(1, args.vocab, (args.batch, args.seq_len))
    ages = torch.randint(0, cfg.n_age_ids, (args.batch, args.seq_len))

    def run(model, opt, dp: bool) -> list[float]:
        times = []
        for i in range(args.steps + 1):  # first step is warm-up
            t = time.perf_counter()
            chunks = data.split(args.physical)
            for j, (chunk, age) in enumerate(zip(chunks, ages.split(args.physical))):
                chunk, age = chunk.to(dev), age.to(dev)
                loss = sequence_loss(model(chunk[:, :-1], age[:, :-1]), chunk[:, 1:]).mean()
                if not dp:
                    loss = loss * (chunk.shape[0] / args.batch)
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

    plain = Transformer(cfg).to(dev)
    t_plain = run(plain, torch.optim.AdamW(plain.parameters(), lr=1e-3), dp=False)
    from fhirsynth.model.securerng import install_noise

    def private_run(secure: bool) -> list[float]:
        private = Transformer(cfg).to(dev)
        loader = DataLoader(TensorDataset(data), batch_size=args.batch)
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
    print(f"model: d={cfg.d_model} layers={cfg.n_layers} heads={cfg.n_heads}/{cfg.n_kv_heads}kv "
          f"ctx={args.seq_len} params={n_params:,}; batch {args.batch} (physical {args.physical}); "
          f"device {args.device}, threads {args.threads}")
    print(f"non-DP step: {p:.3f} s   DP step (secret noise, the default): {d:.3f} s   "
          f"ratio DP/non-DP: {d / p:.2f}  (goal <= 1.5)")
    print(f"DP step with seeded noise (--reproducible-noise, no guarantee): {ds:.3f} s   ratio {ds / p:.2f}; "
          f"secret noise costs {d - ds:+.3f} s per step")


if __name__ == "__main__":
    main()
