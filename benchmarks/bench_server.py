"""Load benchmark of the FHIR server on loopback, against a bare FastAPI endpoint (the ceiling) in the same run.

    python benchmarks/bench_server.py [--patients 1000] [--concurrency 32] [--seconds 5] [--db PATH]

Data: the shared Synthea cohort (../shared/data/us/ndjson), which is third-party synthetic data without the HTEST
marker; the benchmark tags it HTEST while loading (the store refuses untagged data). `--data EXPORT_DIR` loads an
already tagged export dir instead. The server runs in its own process (uvicorn, one worker); the load generator
is a minimal asyncio HTTP/1.1 keep-alive client, bounded by request count and time, so the client costs little.

Reports req/s, ratio to the bare endpoint, p50/p99 latency at N concurrent clients for: bare endpoint with a body
the size of a Patient, GET /Patient/{id}, GET /Observation?patient=..&_count=50 (pages of 50), and $export
(resources/s streamed, server peak RSS before/after).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FHIRSYNTH_SHARED_DATA", REPO.parent / "shared" / "data")) / "us" / "ndjson"
HTEST = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HTEST"}


# ------------------------------------------------------------------ data

def load_shared(db: Path, patients: int) -> dict:
    """Load the first `patients` patients of the shared cohort and all their resources, tagged HTEST."""
    from fhirsynth.store.sqlite import Store

    store = Store(db)
    keep: set[str] = set()
    n = 0
    with store.transaction(bulk=True) as conn:
        for rtype in ("Patient", "Encounter", "Condition", "Observation"):
            with gzip.open(SHARED / f"{rtype}.ndjson.gz", "rb") as fh:
                for line in fh:
                    r = orjson.loads(line)
                    if rtype == "Patient":
                        if len(keep) >= patients:
                            continue
                        keep.add(r["id"])
                    elif r.get("subject", {}).get("reference", "").split("/")[-1] not in keep:
                        continue
                    r.setdefault("meta", {}).setdefault("security", []).append(HTEST)
                    store.insert(conn, r)
                    n += 1
        store.refresh_all_group(conn)
    counts = store.counts()
    store.close()
    return counts


# ------------------------------------------------------------------ server process

def serve(db: Path, port: int, bare_size: int) -> None:
    import uvicorn
    from fastapi import FastAPI, Response

    from fhirsynth.api.router import build_router
    from fhirsynth.api.settings import ServerSettings

    app = FastAPI()
    body = orjson.dumps({"resourceType": "Basic", "id": "bare", "text": "x" * max(0, bare_size - 40)})

    @app.get("/bare")
    async def bare() -> Response:
        return Response(body, media_type="application/fhir+json")

    app.include_router(build_router(ServerSettings(db_path=db)))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# ------------------------------------------------------------------ client

async def _request(reader, writer, path: str) -> tuple[int, bytes]:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: application/fhir+json\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = None
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        if k == b"content-length":
            length = int(v)
        elif k == b"transfer-encoding" and b"chunked" in v.lower():
            chunked = True
    if chunked:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)  # drop chunk extensions
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(data[:-2])
        return status, b"".join(parts)
    return status, await reader.readexactly(length or 0)


async def load(port: int, paths: list[str], concurrency: int, max_requests: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    counter = 0
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal counter, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while counter < max_requests and time.perf_counter() < deadline:
            path = paths[counter % len(paths)]
            counter += 1
            t0 = time.perf_counter()
            status, _ = await _request(reader, writer, path)
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                errors += 1
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return {"latencies": latencies, "elapsed": time.perf_counter() - t0, "errors": errors}


def summarize(runs: list[dict]) -> dict:
    latencies = sorted(x for r in runs for x in r["latencies"])
    elapsed = sum(r["elapsed"] for r in runs)
    return {"requests": len(latencies), "errors": sum(r["errors"] for r in runs), "rps": len(latencies) / elapsed,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


async def _download(port: int, path: str) -> tuple[int, int]:
    """Stream one NDJSON download over a raw connection; returns (lines, bytes) without keeping the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"200", head
    assert b"transfer-encoding: chunked" in head.lower(), head
    lines = nbytes = 0
    while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
        left = size
        while left:
            chunk = await reader.read(min(left, 1 << 20))
            lines += chunk.count(b"\n")
            left -= len(chunk)
        nbytes += size
        await reader.readexactly(2)
    writer.close()
    return lines, nbytes


async def export(port: int, pid: int, types: str | None) -> dict:
    import httpx

    base = f"http://127.0.0.1:{port}"
    # RssAnon = heap; VmRSS would also count the SQLite file pages mapped via mmap (page cache, not growth)
    rss0 = rss_kb(pid, "RssAnon")
    peak = rss0
    done = False

    async def sample() -> None:
        nonlocal peak
        while not done:
            peak = max(peak, rss_kb(pid, "RssAnon"))
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    async with httpx.AsyncClient(timeout=120) as http:
        t0 = time.perf_counter()
        q = f"?_type={types}" if types else ""
        r = await http.get(f"{base}/$export{q}", headers={"Prefer": "respond-async"})
        poll = r.headers["content-location"]
        while (s := await http.get(poll)).status_code == 202:
            await asyncio.sleep(0.05)
        manifest = s.json()
        n = nbytes = 0
        for out in manifest["output"]:
            lines, size = await _download(port, out["url"][len(base):])
            n += lines
            nbytes += size
        elapsed = time.perf_counter() - t0
    done = True
    await sampler
    expected = sum(o["count"] for o in manifest["output"])
    return {"resources": n, "expected": expected, "MB": nbytes / 1e6, "seconds": elapsed,
            "per_s": n / elapsed, "rss_before_MB": rss0 / 1024, "rss_peak_MB": peak / 1024}


# ------------------------------------------------------------------ main

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=1000)
    ap.add_argument("--data", type=Path, default=None, help="tagged export dir instead of the shared cohort")
    ap.add_argument("--db", type=Path, default=None, help="reuse/keep the store database here")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=6.0, help="time bound per scenario (all rounds)")
    ap.add_argument("--requests", type=int, default=30000, help="request bound per scenario (all rounds)")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds per scenario")
    ap.add_argument("--export-types", default=None, help="_type for $export (default: everything)")
    ap.add_argument("--serve", nargs=3, metavar=("DB", "PORT", "BARE_SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), int(args.serve[1]), int(args.serve[2]))
        return

    tmp = tempfile.TemporaryDirectory(prefix="bench-server-")
    db = args.db or Path(tmp.name) / "store.db"
    t0 = time.perf_counter()
    if not db.exists():
        if args.data:
            from fhirsynth.store.loader import build_store

            store, _ = build_store(args.data, db)
            counts = store.counts()
            store.close()
        else:
            counts = load_shared(db, args.patients)
        print(f"loaded {sum(counts.values())} resources {counts} in {time.perf_counter() - t0:.1f}s")
    from fhirsynth.store.sqlite import Store

    store = Store(db)
    patient_ids = [r[0] for r in store.query("SELECT id FROM resources WHERE type='Patient' ORDER BY rid")]
    busy = [r[0] for r in store.query(
        "SELECT patient FROM resources WHERE type='Observation' GROUP BY patient HAVING count(*) >= 50")]
    sizes = [len(store.read("Patient", i)) for i in patient_ids[:200]]
    store.close()
    bare_size = int(statistics.mean(sizes))

    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(db), str(port), str(bare_size)])
    try:
        import httpx

        for _ in range(200):
            try:
                httpx.get(f"http://127.0.0.1:{port}/metadata", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        c, rounds = args.concurrency, args.rounds
        n, s = args.requests // rounds, args.seconds / rounds
        run = lambda paths: asyncio.run(load(port, paths, c, n, s))  # noqa: E731
        run(["/bare"] * 10 + [f"/Patient/{i}" for i in patient_ids[:50]])  # warm-up
        # Scenarios interleaved in short rounds so that a busy machine slows all of them alike.
        scenarios = {"bare": ["/bare"], "read": [f"/Patient/{i}" for i in patient_ids],
                     "search": [f"/Observation?patient={i}&_count=50" for i in busy]}
        runs: dict[str, list[dict]] = {k: [] for k in scenarios}
        for _ in range(rounds):
            for k, paths in scenarios.items():
                runs[k].append(run(paths))
        bare, read, search = (summarize(runs[k]) for k in ("bare", "read", "search"))
        exports = sorted((asyncio.run(export(port, proc.pid, args.export_types)) for _ in range(3)),
                         key=lambda e: e["per_s"])
        exp = exports[1]  # the median of three
        exp["rss_peak_MB"] = max(e["rss_peak_MB"] for e in exports)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        tmp.cleanup()

    print(f"\nserver: uvicorn 1 worker, loopback, {c} concurrent keep-alive clients, bare body {bare_size} B "
          f"(= mean Patient size)")
    print(f"{'scenario':34s} {'req/s':>9s} {'x bare':>7s} {'p50 ms':>7s} {'p99 ms':>7s} {'n':>7s} {'err':>4s}")
    for name, r in (("bare FastAPI endpoint (ceiling)", bare), ("GET /Patient/{id}", read),
                    ("GET /Observation?patient&_count=50", search)):
        print(f"{name:34s} {r['rps']:9.0f} {r['rps'] / bare['rps']:7.2f} {r['p50_ms']:7.1f} {r['p99_ms']:7.1f} "
              f"{r['requests']:7d} {r['errors']:4d}")
    print(f"\n$export: {exp['resources']} resources ({exp['expected']} in manifest), {exp['MB']:.0f} MB in "
          f"{exp['seconds']:.2f}s = {exp['per_s']:.0f} resources/s (median of 3); server heap (RssAnon) "
          f"{exp['rss_before_MB']:.0f} MB before, {exp['rss_peak_MB']:.0f} MB peak")
    goals = {"read >= 0.5x bare": read["rps"] >= 0.5 * bare["rps"],
             "search >= 500 pages/s": search["rps"] >= 500,
             "p99 < 50 ms (read, search)": max(read["p99_ms"], search["p99_ms"]) < 50,
             "$export >= 100k resources/s": exp["per_s"] >= 100_000}
    for g, ok in goals.items():
        print(f"  {'MET ' if ok else 'MISS'} {g}")
    print(json.dumps({"bare": bare, "read": read, "search": search, "export": exp}))


if __name__ == "__main__":
    main()
