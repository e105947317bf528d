"""Synthetic patients per second from the sampler (KV cache, grammar + constraint masks, decoding to timelines).

Goal (issue 4): >= 50 patients/s on 2 CPU cores for the default model (Synthea: about 1 patient/s per core,
so the ceiling printed for comparison is 2 patients/s on 2 cores). Use a trained model dir for realistic
sequence lengths; without one, an untrained default-size model is built (its sequences are shorter).

    python benchmarks/bench_sample.py [--model MODEL_DIR] [-n 1024] [--batch 256] [--workers 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def _untrained_model(path: Path) -> Path:
    import numpy as np

    from fhirsynth.model.checkpoint import write_model_dir
    from fhirsynth.model.config import ModelConfig, TokenizerConfig, to_json, versions
    from fhirsynth.model.archs import build_network, visit_sizes
    from fhirsynth.model.vocab import Item, Vocab
    from fhirsynth.model.bins import load_value_bins
    from fhirsynth.model.vocab import public_items

    vb, panels = load_value_bins()
    items = public_items(vb, panels) + [
        Item("condition", "http://snomed.info/sct", str(100000 + i), f"condition {i}", "encounter-diagnosis")
        for i in range(600)]
    tk = TokenizerConfig()
    vocab = Vocab(tk, items, vb)
    mc = ModelConfig(vocab_size=vocab.size)
    mc.visit_sizes = visit_sizes(vocab)
    torch.manual_seed(0)
    config = {**versions(), "model": to_json(mc), "tokenizer": to_json(tk), "training": {}}
    write_model_dir(path, state_dict=build_network(mc).state_dict(), config=config, vocab=vocab.to_json(),
                    privacy={"unit": "patient", "dp": False}, curve=[])
    del np
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("-n", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from fhirsynth.model.sampler import sample_timelines

    tmp = None
    model = args.model
    if model is None:
        tmp = tempfile.TemporaryDirectory()
        model = _untrained_model(Path(tmp.name) / "model")
    # warm-up (imports, first allocations)
    list(sample_timelines(model, 8, seed=99, batch_size=8, device=args.device))
    rows = []
    configs = [("1 process x 1 thread", 1, 1), (f"1 process x {args.workers} threads", 1, args.workers)]
    if args.device == "cpu" and args.workers > 1:
        configs.append((f"{args.workers} processes x 1 thread", args.workers, 1))
    for name, workers, threads in configs:
        torch.set_num_threads(threads)
        t = time.perf_counter()
        tls = list(sample_timelines(model, args.n, seed=1, batch_size=args.batch, device=args.device,
                                    workers=workers))
        el = time.perf_counter() - t
        events = sum(len(tl.events) for tl in tls)
        rows.append((name, len(tls) / el, events / len(tls)))
    print(f"model: {model if args.model else 'untrained default-size model'}; n={args.n}, batch {args.batch}")
    ceiling = 2.0  # Synthea: ~1 patient/s per core, 2 cores
    for name, pps, ev in rows:
        print(f"{name:28s} {pps:8.1f} patients/s  ({ev:.0f} events/patient)  vs Synthea on 2 cores: "
              f"{pps / ceiling:.0f}x   goal >= 50: {'met' if pps >= 50 else 'NOT met'}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
