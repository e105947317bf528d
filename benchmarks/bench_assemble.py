"""Assembly + NDJSON serialization throughput on one core, against a ceiling measured in the same run.

ceiling = orjson.dumps of the very same resource dicts (what serialization alone costs), so
ratio = pipeline rate / ceiling rate says how much assembly adds on top of writing JSON.
Goal: >= 50k resources/s for assemble + serialize (written to os.devnull: disk speed is not measured).
The benchmark's inputs (all timelines, and the pre-assembled dicts for the ceiling) are moved out of the
garbage collector's view with gc.freeze(): in `generate` they stream and die young, while here they would make
every full collection walk ~1M long-lived objects (measured: ~35% of the pipeline time, an artifact).

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/bench_assemble.py [--patients 400] [--visits 20]
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import orjson

from fhirsynth.timeline.assembler import GeneratorInfo, assemble_patient
from fhirsynth.timeline.samples import random_timelines


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=400)
    ap.add_argument("--visits", type=int, default=20)
    ap.add_argument("--profile", default="us-core")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    timelines = random_timelines(args.patients, seed=1, visits=args.visits)
    gen = GeneratorInfo(model_hash="0" * 64, epsilon=8.0, delta=1e-5, recorded="2026-01-01T00:00:00+00:00")
    assembled = [assemble_patient(tl, profile=args.profile, seed=1, index=i, generator=gen)
                 for i, tl in enumerate(timelines)]  # warm-up (profile load) and the ceiling's input
    gc.collect()
    gc.freeze()
    n = sum(len(rs) for rs in assembled)
    events = sum(len(tl.events) for tl in timelines)

    def pipeline() -> None:
        dumps = orjson.dumps
        with open(os.devnull, "wb") as sink:
            for i, tl in enumerate(timelines):
                rs = assemble_patient(tl, profile=args.profile, seed=1, index=i, generator=gen)
                sink.write(b"\n".join(dumps(r) for r in rs) + b"\n")

    def ceiling() -> None:
        dumps = orjson.dumps
        with open(os.devnull, "wb") as sink:
            for rs in assembled:
                sink.write(b"\n".join(dumps(r) for r in rs) + b"\n")

    def assemble_only() -> None:
        for i, tl in enumerate(timelines):
            assemble_patient(tl, profile=args.profile, seed=1, index=i, generator=gen)

    t_pipe = _best(pipeline, args.repeats)
    t_ceil = _best(ceiling, args.repeats)
    t_asm = _best(assemble_only, args.repeats)
    rate, ceil = n / t_pipe, n / t_ceil
    print(f"patients={args.patients} events={events} resources={n} profile={args.profile}")
    print(f"assemble only:          {n / t_asm:>12,.0f} resources/s")
    print(f"assemble + serialize:   {rate:>12,.0f} resources/s   (goal >= 50,000: {'met' if rate >= 50_000 else 'NOT met'})")
    print(f"orjson.dumps ceiling:   {ceil:>12,.0f} resources/s")
    print(f"ratio pipeline/ceiling: {rate / ceil:.3f}")


if __name__ == "__main__":
    main()
