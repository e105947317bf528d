"""Whole-records fidelity table from the command line (the metrics live in fhirsynth/records_metrics.py).

    python benchmarks/records_metrics.py --real HOLDOUT --other SYNTHETIC [--train TRAIN]

--real and --train are timelines dirs; --other is a timelines dir or an NDJSON export dir (`fhirsynth generate`),
ingested first with the us-core mapping as `fhirsynth evaluate` does. With --train the table gets a second
column, train against holdout: what two real samples of one population reach (the ceiling).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fhirsynth.records_metrics import Records, compare, markdown, records_table  # noqa: E402, F401 - re-exported
from fhirsynth.timeline.io import read_timelines  # noqa: E402
from fhirsynth.timeline.types import Timeline  # noqa: E402

log = logging.getLogger("records_metrics")


def load(path: Path, work: Path) -> list[Timeline]:
    """A timelines dir, or an NDJSON export dir ingested (us-core mapping) into work first."""
    from fhirsynth.evaluate.report import (
        _ingest_export,
        is_export_dir,
        is_timelines_dir,
    )

    if not is_timelines_dir(path):
        if not is_export_dir(path):
            raise SystemExit(f"{path}: neither a timelines dir (events.parquet) nor an export dir (*.ndjson)")
        path = _ingest_export(path, work / path.name)
    return list(read_timelines(path))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", required=True, type=Path, help="held-out real timelines dir")
    ap.add_argument("--other", required=True, type=Path, help="synthetic timelines dir or NDJSON export dir")
    ap.add_argument("--train", type=Path, help="training timelines dir: adds the real-vs-real (ceiling) column")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="records-metrics-") as tmp:
        work = Path(tmp)
        real = Records(load(args.real, work))
        other = Records(load(args.other, work))
        log.info("loaded %d real, %d other patients in %.1fs", real.n, other.n, time.perf_counter() - t0)
        t = time.perf_counter()
        columns = {"other": compare(real, other)}
        log.info("other vs real in %.1fs", time.perf_counter() - t)
        if args.train:
            t = time.perf_counter()
            columns["real-vs-real"] = compare(real, Records(load(args.train, work)))
            log.info("train vs real (load + metrics) in %.1fs", time.perf_counter() - t)
    log.info("total %.1fs", time.perf_counter() - t0)
    print(markdown(columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
