"""Scale: does a 10x larger cohort cost 10x time and the same peak memory? (issue 7, "Scale")

    nice python benchmarks/bench_scale.py [--patients 80] [--export-patients 1500] [--generate-patients 600]
                                          [--factor 10] [--repeat-small 2] [--data DIR] [--keep DIR]
                                          [--stages ingest,export,generate,store]
(about 7 minutes with the defaults on 2 shared cores)

Stages, each run at 1x and at FACTORx in a fresh subprocess (so peak memory is per stage and per size):
  ingest    fhirsynth.timeline.adapter.ingest over an NDJSON cohort: the first --patients patients of DIR
            (default ../shared/data/us/ndjson, else fixtures/sample) with all their resources; the FACTORx
            cohort is FACTOR copies whose ids and references are rewritten per copy (distinct patients)
  export    fhirsynth.export.writer.write_export of a lazily generated stream of synthetic timelines
            (fhirsynth.timeline.samples.random_timeline), NDJSON
  generate  the `fhirsynth generate MODEL -n N --out DIR` command (sample_timelines -> write_export) with a
            tiny model trained here in seconds (1 epoch, DP, 40 random patients)
  store     fhirsynth.store.loader.build_store (what `fhirsynth serve --data` runs) over the export stage's output

Memory: the child reports VmHWM (peak resident set, as ru_maxrss) and the peak of RssAnon sampled every 20 ms
(heap only: the SQLite mmap and memory-mapped Arrow spill files are file pages the kernel can drop, and they
grow with the data size by design). "base" is the child's RSS after imports, before the work.
Goals: time ratio <= ~FACTOR * 1.1 (the ceiling is linear scaling measured on the 1x run of the same stage in
this run); memory ratio ~1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "us" / "ndjson"
SAMPLE = REPO / "fixtures" / "sample"
STAGES = ("ingest", "export", "generate", "store")
_REF = re.compile(rb'"reference":"([A-Za-z]+)/')


# ------------------------------------------------------------------------------------------- cohort preparation

def _lines(path: Path):  # noqa: ANN202 - iterator of raw NDJSON lines (gz or plain)
    import gzip

    with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as fh:
        for line in fh:
            if line.strip():
                yield line.rstrip(b"\n")


def _patient_of(obj: dict) -> str | None:
    for key in ("subject", "patient"):
        ref = obj.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str) and ref["reference"].startswith("Patient/"):
            return ref["reference"][8:]
    return None


def make_cohort(src: Path, n_patients: int, dst: Path, factor: int) -> dict[str, int]:
    """Write dst/x1 (the first n_patients and their resources) and dst/xFACTOR (FACTOR id-rewritten copies)."""
    import orjson

    files = sorted(p for p in src.iterdir() if p.name.endswith((".ndjson", ".ndjson.gz")))
    patient_file = next(p for p in files if p.name.startswith("Patient."))
    keep: set[str] = set()
    for line in _lines(patient_file):
        keep.add(orjson.loads(line)["id"])
        if len(keep) >= n_patients:
            break
    one, many = dst / "x1", dst / f"x{factor}"
    one.mkdir(parents=True)
    many.mkdir(parents=True)
    counts: dict[str, int] = {}
    for path in files:
        name = path.name.removesuffix(".gz")
        picked = []
        for line in _lines(path):
            obj = orjson.loads(line)
            pid = obj["id"] if obj.get("resourceType") == "Patient" else _patient_of(obj)
            if pid in keep:
                picked.append(line)
        counts[name.split(".")[0]] = len(picked)
        (one / name).write_bytes(b"\n".join(picked) + b"\n")
        with open(many / name, "wb") as fh:
            for k in range(factor):
                if k == 0:
                    fh.write(b"\n".join(picked) + b"\n")
                    continue
                tag = f"x{k}-".encode()
                fh.write(b"\n".join(_REF.sub(rb'"reference":"\1/' + tag,
                                             line.replace(b'"id":"', b'"id":"' + tag)) for line in picked) + b"\n")
    return counts


# ------------------------------------------------------------------------------------------- child: one stage

class _Sampler(threading.Thread):
    """Peak RssAnon (heap, not file pages) of this process, sampled every 20 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_anon = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            self.peak_anon = max(self.peak_anon, _status_kb("RssAnon"))


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _random_stream(n: int):  # noqa: ANN202 - timelines made one at a time, never a list
    import random

    from fhirsynth.timeline.samples import random_timeline

    rng = random.Random(7)
    for i in range(n):
        yield random_timeline(rng, f"syn-{i}", visits=8)


def run_stage(stage: str, spec: dict) -> dict:
    """Import what the stage needs, then time it and watch memory. Returns the measurement."""
    import logging

    logging.disable(logging.WARNING)  # no per-file warnings in the timing
    from fhirsynth import __version__
    from fhirsynth.cli import main as cli_main
    from fhirsynth.export.writer import write_export
    from fhirsynth.store.loader import build_store
    from fhirsynth.timeline.adapter import ingest
    from fhirsynth.timeline.assembler import GeneratorInfo

    if stage == "generate":
        import importlib

        importlib.import_module("torch")  # imported before the baseline, like the other stages' libraries

    base = _status_kb("VmRSS")
    sampler = _Sampler()
    sampler.start()
    c0, w0 = time.process_time(), time.perf_counter()
    items = 0
    if stage == "ingest":
        report = ingest([spec["input"]], spec["out"], max_examples=1)
        items = report["totals"]["read"]
    elif stage == "export":
        gen = GeneratorInfo(model_hash="bench", epsilon=None, delta=None, fhirsynth_version=__version__)
        summary = write_export(_random_stream(spec["n"]), Path(spec["out"]), generator=gen, total=spec["n"])
        items = sum(summary["resources"].values())
    elif stage == "generate":
        rc = cli_main(["generate", spec["model"], "-n", str(spec["n"]), "--out", spec["out"], "--device", "cpu",
                       "--seed", "1"])
        if rc != 0:
            raise SystemExit(f"generate failed with exit code {rc}")
        manifest = json.loads((Path(spec["out"]) / "manifest.json").read_text())
        items = sum(o["count"] for o in manifest["output"])
    elif stage == "store":
        store, summary = build_store(spec["input"], spec["out"])
        store.close()
        items = sum(summary["loaded"].values())
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    sampler.stop.set()
    sampler.join()
    peak_anon = max(sampler.peak_anon, _status_kb("RssAnon"))
    return {"wall": wall, "cpu": cpu, "items": items, "base_kb": base, "hwm_kb": _status_kb("VmHWM"),
            "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "anon_kb": peak_anon}


def child(stage: str, spec_json: str) -> None:
    result = run_stage(stage, json.loads(spec_json))
    print("RESULT " + json.dumps(result), flush=True)


def measure(stage: str, spec: dict) -> dict:
    out = Path(spec["out"])  # every run starts from nothing (a repeated 1x run must not find its own output)
    if out.is_dir():
        shutil.rmtree(out)
    out.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FHIRSYNTH_PROGRESS": "0", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, __file__, "--_stage", stage, json.dumps(spec)], capture_output=True,
                          text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"stage {stage} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


# ------------------------------------------------------------------------------------------- parent

def _mb(kb: int) -> str:
    return f"{kb / 1024:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--factor", type=int, default=10, help="size of the big run relative to 1x (default 10)")
    ap.add_argument("--patients", type=int, default=80, help="ingest: real patients in the 1x cohort (default 80)")
    ap.add_argument("--export-patients", type=int, default=1500, help="export/store: patients at 1x (default 1500)")
    ap.add_argument("--generate-patients", type=int, default=600, help="generate: patients at 1x (default 600)")
    ap.add_argument("--repeat-small", type=int, default=2,
                    help="run each 1x stage this many times and keep the fastest (short runs are the noisiest "
                         "on a shared machine; keeping the fastest makes the ratios conservative)")
    ap.add_argument("--data", type=Path, default=SHARED if SHARED.is_dir() else SAMPLE,
                    help="NDJSON cohort to replicate (default ../shared/data/us/ndjson, else fixtures/sample)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    ap.add_argument("--keep", type=Path, help="work in this directory and keep it (default: a temp dir, removed)")
    ap.add_argument("--_stage", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._stage:
        child(*args._stage)
        return
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if unknown := set(stages) - set(STAGES):
        ap.error(f"unknown stage(s): {', '.join(sorted(unknown))}")
    if "store" in stages and "export" not in stages:
        stages.insert(stages.index("store"), "export")  # the store is built from the export stage's output
    f = args.factor
    work = Path(tempfile.mkdtemp(prefix="bench-scale-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    sizes = {"ingest": args.patients, "export": args.export_patients, "generate": args.generate_patients,
             "store": args.export_patients}
    rows = []
    try:
        t0 = time.perf_counter()
        specs: dict[str, tuple[dict, dict]] = {}
        if "ingest" in stages:
            counts = make_cohort(args.data, args.patients, work / "cohort", f)
            print(f"cohort: {args.patients} patients from {args.data}: {counts} "
                  f"(x{f}: {sum(counts.values()) * f} resources) in {time.perf_counter() - t0:.0f}s", flush=True)
            specs["ingest"] = ({"input": str(work / "cohort" / "x1"), "out": str(work / "tl1")},
                               {"input": str(work / "cohort" / f"x{f}"), "out": str(work / f"tl{f}")})
        if "export" in stages:
            n = args.export_patients
            specs["export"] = ({"n": n, "out": str(work / "exp1")}, {"n": n * f, "out": str(work / f"exp{f}")})
        if "generate" in stages:
            from fhirsynth.model.tiny import train_tiny_model

            t1 = time.perf_counter()
            model = train_tiny_model(work / "train")  # a real DP model: generate runs the real sampler
            print(f"tiny model trained in {time.perf_counter() - t1:.0f}s", flush=True)
            n = args.generate_patients
            specs["generate"] = ({"model": str(model), "n": n, "out": str(work / "gen1")},
                                 {"model": str(model), "n": n * f, "out": str(work / f"gen{f}")})
        if "store" in stages:
            specs["store"] = ({"input": str(work / "exp1"), "out": str(work / "store1.db")},
                              {"input": str(work / f"exp{f}"), "out": str(work / f"store{f}.db")})
        for stage in stages:
            small, big = specs[stage]
            a = min((measure(stage, small) for _ in range(max(1, args.repeat_small))), key=lambda r: r["wall"])
            b = measure(stage, big)
            rows.append((stage, a, b))
            print(f"{stage}: 1x {a['wall']:.1f}s ({a['items']} items), {f}x {b['wall']:.1f}s ({b['items']} items)",
                  flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"factor {f}; sizes at 1x: " + ", ".join(f"{s} {sizes[s]} patients" for s in stages))
    print(f"{'stage':9s} {'items 1x':>9s} {'items ' + str(f) + 'x':>10s} {'time 1x':>8s} {'time ' + str(f) + 'x':>9s} "
          f"{'ratio':>6s} {'cpu ratio':>9s} {'per item':>8s} | {'base':>5s} {'peak 1x':>8s} "
          f"{'peak ' + str(f) + 'x':>8s} {'ratio':>6s} | {'anon 1x':>8s} {'anon ' + str(f) + 'x':>8s} {'ratio':>6s}")
    for stage, a, b in rows:
        # per item: CPU seconds per item at FACTORx over 1x (wall time also counts other processes and fsync)
        per_item = (b["cpu"] / max(b["items"], 1)) / (a["cpu"] / max(a["items"], 1))
        print(f"{stage:9s} {a['items']:9d} {b['items']:10d} {a['wall']:7.1f}s {b['wall']:8.1f}s "
              f"{b['wall'] / a['wall']:6.2f} {b['cpu'] / a['cpu']:9.2f} {per_item:8.2f} | {_mb(a['base_kb']):>5s} "
              f"{_mb(a['hwm_kb']):>7s}M {_mb(b['hwm_kb']):>7s}M {b['hwm_kb'] / a['hwm_kb']:6.2f} | "
              f"{_mb(a['anon_kb']):>7s}M {_mb(b['anon_kb']):>7s}M {b['anon_kb'] / a['anon_kb']:6.2f}")
    print(f"goals: time ratio <= ~{f * 1.1:.0f} and per-item CPU ratio <= ~1.1 (the ceiling: the same stage's 1x run, "
          "scaled linearly); memory ratio ~1. Sizes in MB; base = RSS after imports, peak = VmHWM (incl. file "
          "pages), anon = peak heap (RssAnon)")


if __name__ == "__main__":
    main()
