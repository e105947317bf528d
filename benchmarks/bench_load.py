"""Sustained load on `fhirsynth serve` over loopback: 64 concurrent keep-alive clients for 60 s, mixed reads and
searches; must end with zero errors. Reports total requests, errors, req/s, p50/p99 and the ratio to a ceiling.

    python benchmarks/bench_load.py [--data EXPORT_DIR] [--seconds 60] [--clients 64] [--ceiling-seconds 10]

Server: the real CLI (`python -m fhirsynth serve --data EXPORT_DIR`, one uvicorn process), default data the
server fixture export (fixtures/server/export). Ceiling: a bare uvicorn app in its own process answering every
request with a fixed body the size of the median fhirsynth response, hit by the same client in the same run:
ratio = fhirsynth req/s / ceiling req/s (what the FHIR work costs on top of HTTP itself on this machine).
Client: a minimal asyncio HTTP/1.1 keep-alive client (httpx would cost more CPU than the server on 2 cores);
any non-2xx status, timeout or connection failure counts as an error and the client reconnects.
Exit status 1 when there were errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from bench_server import _request as http_get  # same folder: benchmarks/ is sys.path[0]
from bench_server import free_port

REPO = Path(__file__).resolve().parents[1]
REQUEST_TIMEOUT_S = 30.0


def wait_ready(port: int, proc: subprocess.Popen, path: str, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not start")


BARE_APP = """
import sys, uvicorn
body = b'{"resourceType":"Basic","id":"bare","text":"' + b"x" * int(sys.argv[2]) + b'"}'
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/fhir+json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


# ------------------------------------------------------------------------------------------------------- client


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> tuple[int, int]:
    """(status, body bytes) of one keep-alive GET, with bench_server's minimal HTTP/1.1 client."""
    status, body = await http_get(reader, writer, path)
    return status, len(body)


async def load(port: int, paths: list[str], clients: int, seconds: float, seed: int = 0) -> dict:
    latencies: list[float] = []
    sizes: list[int] = []
    errors: dict[str, int] = {}
    deadline = time.perf_counter() + seconds

    def error(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    async def client(c: int) -> None:
        rng = random.Random(seed * 1000 + c)
        conn = None
        while time.perf_counter() < deadline:
            path = rng.choice(paths)
            try:
                if conn is None:
                    conn = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), REQUEST_TIMEOUT_S)
                t0 = time.perf_counter()
                status, size = await asyncio.wait_for(request(*conn, path), REQUEST_TIMEOUT_S)
                latencies.append(time.perf_counter() - t0)
                sizes.append(size)
                if not 200 <= status < 300:
                    error(f"HTTP {status} {path.split('?')[0]}")
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                error(type(exc).__name__)
                if conn is not None:
                    conn[1].close()
                conn = None
        if conn is not None:
            conn[1].close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "seconds": round(elapsed, 2),
        "rps": round(n / elapsed, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 2) if n else None,
        "p99_ms": round(1000 * latencies[min(n - 1, int(0.99 * n))], 2) if n else None,
        "max_ms": round(1000 * latencies[-1], 2) if n else None,
        "median_bytes": int(statistics.median(sizes)) if sizes else 0,
    }


# --------------------------------------------------------------------------------------------------- workload


def workload(port: int) -> list[str]:
    """A mixed list of request paths drawn from what the server holds: reads, searches, paging, $everything."""
    import httpx

    base = f"http://127.0.0.1:{port}"
    ids: dict[str, list[str]] = {}
    codes: list[str] = []
    with httpx.Client(timeout=30) as c:
        for rtype in ("Patient", "Condition", "Observation", "Encounter"):
            bundle = c.get(f"{base}/{rtype}", params={"_count": 200}).json()
            ids[rtype] = [e["resource"]["id"] for e in bundle.get("entry", [])]
            if rtype == "Condition":
                for e in bundle.get("entry", []):
                    coding = e["resource"]["code"]["coding"][0]
                    codes.append(f"{coding['system']}|{coding['code']}")
    if not ids["Patient"]:
        raise SystemExit("the export holds no patients")
    paths: list[str] = []
    for rtype, rids in ids.items():  # reads: half of the mix
        paths += [f"/{rtype}/{rid}" for rid in rids[:50]] * (4 if rtype == "Patient" else 2)
    pids = ids["Patient"][:50]
    searches = (
        [f"/Observation?patient={p}&_count=20" for p in pids]
        + [f"/Condition?subject=Patient/{p}" for p in pids]
        + [f"/Encounter?patient={p}&_sort=-date&_count=10" for p in pids]
        + [f"/Condition?code={quote(code, safe='')}&_count=20" for code in sorted(set(codes))[:30]]
        + ["/Patient?gender=female&_count=20", "/Patient?birthdate=ge1970&_count=20", "/Patient?_count=50",
           "/Observation?date=ge2015-01-01&_count=50", "/Observation?category=laboratory&_count=50",
           "/Patient?name=a&_count=10", "/Patient?_summary=count", "/Condition?_count=50&_include=Condition:subject",
           "/metadata"]
        + [f"/Patient/{p}/$everything?_count=50" for p in pids[:10]]
    )
    reads = len(paths)
    paths += searches * max(1, reads // max(1, len(searches)))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / "fixtures" / "server" / "export", help="export dir to serve")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--ceiling-seconds", type=float, default=10.0, help="0 skips the ceiling run")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FHIRSYNTH_SERVER_TOKEN", None)

    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "fhirsynth", "-q", "serve", "--data", str(args.data), "--db",
             str(Path(tmp) / "store.sqlite"), "--port", str(port)], env=env, stderr=subprocess.PIPE)
        try:
            wait_ready(port, server, "/metadata")
            paths = workload(port)
            result = asyncio.run(load(port, paths, args.clients, args.seconds))
        finally:
            server.terminate()
            try:
                _, stderr = server.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                _, stderr = server.communicate()
        tracebacks = stderr.decode(errors="replace").count("Traceback")

    ceiling = None
    if args.ceiling_seconds > 0:
        port = free_port()
        bare = subprocess.Popen([sys.executable, "-c", BARE_APP, str(port), str(result["median_bytes"])], env=env)
        try:
            wait_ready(port, bare, "/")
            ceiling = asyncio.run(load(port, ["/bare"], args.clients, args.ceiling_seconds))
        finally:
            bare.terminate()
            bare.wait(15)

    out = {
        "data": str(args.data),
        "clients": args.clients,
        "distinct_paths": len(set(paths)),
        "fhirsynth": result,
        "server_tracebacks": tracebacks,
        "ceiling_bare_uvicorn": ceiling,
        "ratio_rps_vs_ceiling": round(result["rps"] / ceiling["rps"], 3) if ceiling and ceiling["rps"] else None,
    }
    print(json.dumps(out, indent=2))
    sys.exit(1 if result["errors"] or tracebacks else 0)


if __name__ == "__main__":
    main()
