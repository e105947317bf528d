"""Ingest throughput vs a raw orjson.loads pass over the same NDJSON lines, and peak RSS at 1x / 4x cohort size.

    python benchmarks/bench_ingest.py [--data DIR] [--lines N] [--no-rss]   (DIR: ../shared/data/us/ndjson)

Ceiling: gzip-decompress + split lines + orjson.loads every line, nothing else (the same chunked reader ingest
uses), measured in the same process right before and right after ingest (averaged).
Ratio = ingest resources/s / ceiling resources/s (goal >= 0.4); CPU-time and wall-clock ratios are both printed.
RSS: ingest runs in a fresh subprocess on the 1x cohort and on a 4x cohort made of four copies whose ids and
references are rewritten (so they are distinct patients, not duplicates); goal: flat.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fhirsynth.fhir.readers import _iter_chunks  # noqa: E402
from fhirsynth.timeline.adapter import ingest  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "us" / "ndjson"


def _lines(path: Path, limit: int):  # noqa: ANN202
    with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as fh:
        n = 0
        for chunk in _iter_chunks(fh, lambda: None):
            for line in chunk:
                yield line
                n += 1
                if limit and n >= limit:
                    return


def make_subset(src: Path, dst: Path, limit: int, copies: int) -> list[Path]:
    """First `limit` lines of each file (all when 0), `copies` times with ids prefixed per copy."""
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for path in sorted(src.glob("*.ndjson*")):
        target = dst / path.name.replace(".gz", "")
        with open(target, "wb") as fh:
            for k in range(copies):
                buf = []
                for line in _lines(path, limit):
                    if k:
                        p = f"c{k}-".encode()
                        line = (line.replace(b'"id":"', b'"id":"' + p)
                                .replace(b'"reference":"Patient/', b'"reference":"Patient/' + p)
                                .replace(b'"reference":"Encounter/', b'"reference":"Encounter/' + p))
                    buf.append(line)
                    if len(buf) >= 10000:
                        fh.write(b"\n".join(buf) + b"\n")
                        buf = []
                if buf:
                    fh.write(b"\n".join(buf) + b"\n")
        out.append(target)
    return out


def ceiling(files: list[Path]) -> tuple[int, float, float]:
    loads = orjson.loads
    n = 0
    c0, w0 = time.process_time(), time.perf_counter()
    for path in files:
        for line in _lines(path, 0):
            loads(line)
            n += 1
    return n, time.process_time() - c0, time.perf_counter() - w0


def peak_rss_mb(files: list[Path], out: Path) -> float:
    code = (
        "import resource, sys; from fhirsynth.timeline.adapter import ingest; "
        "ingest(sys.argv[2:], sys.argv[1]); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    res = subprocess.run([sys.executable, "-c", code, str(out), *map(str, files)], check=True,
                         capture_output=True, text=True, cwd=REPO)
    return float(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--lines", type=int, default=0, help="first N lines per file (0 = all)")
    ap.add_argument("--no-rss", action="store_true")
    args = ap.parse_args()
    if not args.data.is_dir():
        print(f"no data at {args.data}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmpd:
        tmp = Path(tmpd)
        if args.lines:
            files = make_subset(args.data, tmp / "x1", args.lines, 1)
        else:
            files = sorted(args.data.glob("*.ndjson*"))
        # the ceiling runs before and after ingest and is averaged: on a shared machine load drifts during a run
        n, raw_cpu1, raw_wall1 = ceiling(files)
        c0, w0 = time.process_time(), time.perf_counter()
        report = ingest(files, tmp / "out")
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        _, raw_cpu2, raw_wall2 = ceiling(files)
        raw_cpu, raw_wall = (raw_cpu1 + raw_cpu2) / 2, (raw_wall1 + raw_wall2) / 2
        assert report["totals"]["read"] == n, (report["totals"], n)
        result = {
            "resources": n,
            "events": report["events"]["total"],
            "ceiling_res_per_s_cpu": round(n / raw_cpu),
            "ingest_res_per_s_cpu": round(n / cpu),
            "ratio_cpu": round(raw_cpu / cpu, 3),
            "ceiling_res_per_s_wall": round(n / raw_wall),
            "ingest_res_per_s_wall": round(n / wall),
            "ratio_wall": round(raw_wall / wall, 3),
            "ingest_wall_s": round(wall, 1),
        }
        print(json.dumps(result), flush=True)
        if not args.no_rss:
            x4 = make_subset(args.data, tmp / "x4", args.lines, 4)
            r1 = peak_rss_mb(files, tmp / "o1")
            r4 = peak_rss_mb(x4, tmp / "o4")
            print(json.dumps({"peak_rss_mb_1x": round(r1), "peak_rss_mb_4x": round(r4),
                              "rss_ratio_4x_over_1x": round(r4 / r1, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("FHIRSYNTH_PROGRESS", "0")
    sys.exit(main())
