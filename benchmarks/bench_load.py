"""Sustained load on the fhirsynth server over loopback: 64 concurrent keep-alive clients for 60 s; must end
with zero errors. Reports per operation kind: count, throttled (429), errors, p50/p99/max, plus export
throughput, the machine's load during the run, and the read mix's ratio to a ceiling.

    python benchmarks/bench_load.py [--profile mixed|reads] [--data EXPORT_DIR | --shared-patients N]
        [--model MODEL_DIR] [--seconds 60] [--clients 64] [--export-share 0.125] [--synthesize-share 0.0625]
        [--ceiling-seconds 10]

Profiles:
  reads  every client does GET reads and searches (reads, searches, paging, $everything, /metadata).
  mixed  (default) a share of the clients runs full Bulk Data $export cycles -- kick-off (GET or POST with a
         Parameters body, system / Patient / Group level, with _type and _typeFilter) with Prefer: respond-async,
         poll the Content-Location honouring Retry-After, download every file of the manifest (line count must
         equal the manifest's count), then DELETE the job, or leave it to finish (the server reclaims fully
         downloaded jobs), or (1 in 10) cancel it right after kick-off -- and a share calls
         POST /Patient/$synthesize (count 1-3, a random seed, sometimes sex), which adds patients to the store
         while exports and searches read it; the other clients do the reads profile.

An error is any status other than 2xx, except a 429 that carries Retry-After (the server shedding load as the
Bulk Data IG asks; counted as "throttled", the client waits Retry-After and goes on), plus timeouts, connection
failures and export files whose line count differs from the manifest. Exit status 1 when there were errors or
the server logged a traceback.

Server: create_app + uvicorn in its own process (what `fhirsynth serve` runs), on a store built before the run
from --data (default the server fixture export) or from the first N patients of the shared Synthea cohort
(--shared-patients, tagged HTEST while loading, as in bench_server.py). $synthesize needs a model: --model, or a
tiny DP model trained in a temporary dir before the run (~10 s). Ceiling: a bare uvicorn app answering every
request with a fixed body the size of the median read/search response, hit by the same client in the same run:
ratio = read/search req/s of the run / ceiling req/s.
Client: a minimal asyncio HTTP/1.1 keep-alive client (httpx would cost more CPU than the server on 2 cores).
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

import orjson

from bench_server import free_port  # same folder: benchmarks/ is sys.path[0]

REPO = Path(__file__).resolve().parents[1]
REQUEST_TIMEOUT_S = 30.0
SYNTHESIZE_TIMEOUT_S = 120.0  # waits behind other generations by design (one at a time)
KINDS = ("read", "search", "export-kickoff", "export-poll", "export-download", "export-delete", "export-cycle",
         "synthesize")


def wait_ready(port: int, proc: subprocess.Popen, path: str, timeout: float = 120) -> None:
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

# What `fhirsynth serve --db DB` runs (commands/serve.py), plus the model for $synthesize.
SERVER_APP = """
import sys, uvicorn
from pathlib import Path
from fhirsynth.api.app import create_app
from fhirsynth.api.settings import ServerSettings
from fhirsynth.store.sqlite import Store
db, port, model = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
settings = ServerSettings(db_path=db, model_dir=Path(model) if model != "-" else None)
uvicorn.run(create_app(settings, store=Store(db)), host="127.0.0.1", port=port, log_level="warning")
"""


# ------------------------------------------------------------------------------------------------------- client


async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, path: str, *,
               headers: dict[str, str] | None = None, body: bytes = b"", count_lines: bool = False,
               ) -> tuple[int, dict[str, str], bytes, int]:
    """One keep-alive HTTP/1.1 exchange: (status, lower-cased headers, body, newline count).

    count_lines: stream the body, counting newlines without keeping it (export files can be large).
    """
    head = [f"{method} {path} HTTP/1.1", "Host: bench", "Accept: application/fhir+json"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method in ("POST", "PUT"):
        head += ["Content-Type: application/fhir+json", f"Content-Length: {len(body)}"]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    raw = await reader.readuntil(b"\r\n\r\n")
    status = int(raw[9:12])
    hdrs: dict[str, str] = {}
    for line in raw.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k:
            hdrs[k.strip().lower().decode()] = v.strip().decode(errors="replace")
    parts: list[bytes] = []
    lines = 0
    if "chunked" in hdrs.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            if count_lines:
                lines += data.count(b"\n") - 1  # minus the chunk's CRLF
            else:
                parts.append(data[:-2])
    else:
        data = await reader.readexactly(int(hdrs.get("content-length", "0")))
        lines = data.count(b"\n")
        if not count_lines:
            parts.append(data)
    if hdrs.get("connection", "").lower() == "close":
        raise ConnectionResetError("server closed the connection")
    return status, hdrs, b"".join(parts), lines


class Stats:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = {k: [] for k in KINDS}
        self.throttled: dict[str, int] = {k: 0 for k in KINDS}
        self.errors: dict[str, int] = {}
        self.sizes: list[int] = []
        self.export = {"cycles_done": 0, "cycles_cancelled": 0, "deleted": 0, "left_to_finish": 0, "files": 0,
                       "resources": 0}
        self.synth_patients = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def summary(self, elapsed: float) -> dict:
        out = {}
        for kind, lat in self.latency.items():
            if not lat and not self.throttled[kind]:
                continue
            lat = sorted(lat)
            n = len(lat)
            out[kind] = {"n": n, "per_s": round(n / elapsed, 1), "throttled_429": self.throttled[kind],
                         "p50_ms": round(1000 * statistics.median(lat), 1) if n else None,
                         "p99_ms": round(1000 * lat[min(n - 1, int(0.99 * n))], 1) if n else None,
                         "max_ms": round(1000 * lat[-1], 1) if n else None}
        return out


class Conn:
    """A keep-alive connection that reconnects after any failure."""

    def __init__(self, port: int) -> None:
        self.port, self.rw = port, None

    async def call(self, method: str, path: str, timeout: float = REQUEST_TIMEOUT_S, **kw):
        try:
            if self.rw is None:
                self.rw = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port, limit=1 << 22),
                                                 REQUEST_TIMEOUT_S)
            return await asyncio.wait_for(http(*self.rw, method, path, **kw), timeout)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.rw is not None:
            self.rw[1].close()
            self.rw = None


TRANSIENT = (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError)


def _retry_after(hdrs: dict[str, str]) -> float | None:
    try:
        return float(hdrs["retry-after"])
    except (KeyError, ValueError):
        return None


async def timed(stats: Stats, kind: str, conn: Conn, method: str, path: str, **kw):
    """One request; returns (status, headers, body, lines) or None after recording a transport error."""
    t0 = time.perf_counter()
    try:
        res = await conn.call(method, path, **kw)
    except TRANSIENT as exc:
        stats.error(f"{kind}: {type(exc).__name__}")
        return None
    dt = time.perf_counter() - t0
    status, hdrs = res[0], res[1]
    if status == 429 and _retry_after(hdrs) is not None:
        stats.throttled[kind] += 1
    else:
        stats.latency[kind].append(dt)
        if not 200 <= status < 300:
            stats.error(f"{kind}: HTTP {status} {path.split('?')[0]}")
    return res


async def reader_client(port: int, paths: list[str], deadline: float, stats: Stats, rng: random.Random) -> None:
    conn = Conn(port)
    while time.perf_counter() < deadline:
        path = rng.choice(paths)
        kind = "search" if ("?" in path or "$" in path or path == "/metadata") else "read"
        res = await timed(stats, kind, conn, "GET", path)
        if res is not None:
            stats.sizes.append(len(res[2]))
    conn.close()


def export_request(rng: random.Random, base_codes: list[str]) -> tuple[str, str, bytes]:
    """A random kick-off: (method, path, body)."""
    code = rng.choice(base_codes) if base_codes else "http://loinc.org|2339-0"
    tf_obs = "Observation?code=" + quote(code, safe="")
    choice = rng.randrange(5)
    if choice == 0:
        return "GET", "/$export?_type=Patient,Condition,Encounter", b""
    if choice == 1:
        return "GET", "/Patient/$export?_type=Patient,Observation&_typeFilter=" + quote(tf_obs, safe=""), b""
    if choice == 2:
        params = [{"name": "_type", "valueString": "Observation"},
                  {"name": "_typeFilter", "valueString": "Observation?category=laboratory"},
                  {"name": "_outputFormat", "valueString": "application/fhir+ndjson"}]
        return "POST", "/$export", orjson.dumps({"resourceType": "Parameters", "parameter": params})
    if choice == 3:
        return "GET", "/Group/all/$export?_typeFilter=" + quote("Patient?gender=female", safe="") + \
            "&_type=Patient,Condition", b""
    return "GET", "/$export", b""  # everything


async def export_client(port: int, deadline: float, stats: Stats, rng: random.Random, codes: list[str]) -> None:
    conn = Conn(port)
    async_h = {"Prefer": "respond-async"}
    while time.perf_counter() < deadline:
        method, path, body = export_request(rng, codes)
        t_cycle = time.perf_counter()
        res = await timed(stats, "export-kickoff", conn, method, path, headers=async_h, body=body)
        if res is None or res[0] != 202:
            if res is not None and res[0] == 429 and _retry_after(res[1]) is not None:
                await asyncio.sleep(min(_retry_after(res[1]), max(0.0, deadline - time.perf_counter())))
            continue
        poll = res[1]["content-location"].split("127.0.0.1:%d" % port, 1)[-1]
        if rng.random() < 0.1:  # cancel right away
            if (d := await timed(stats, "export-delete", conn, "DELETE", poll)) is not None and d[0] == 202:
                stats.export["cycles_cancelled"] += 1
            continue
        manifest = None
        while True:
            res = await timed(stats, "export-poll", conn, "GET", poll)
            if res is None or res[0] not in (200, 202, 429):
                break
            if res[0] == 200:
                manifest = orjson.loads(res[2])
                break
            wait = _retry_after(res[1])
            if wait is None:
                stats.error("export-poll: 202/429 without Retry-After")
                wait = 1.0
            await asyncio.sleep(wait)
        if manifest is None:
            continue
        ok = True
        for out in manifest["output"]:
            res = await timed(stats, "export-download", conn, "GET", out["url"].split("127.0.0.1:%d" % port, 1)[-1],
                              count_lines=True, timeout=300)
            if res is None or res[0] != 200:
                ok = False
                continue
            stats.export["files"] += 1
            stats.export["resources"] += res[3]
            if res[3] != out["count"]:
                stats.error(f"export-download: {res[3]} lines, manifest says {out['count']} ({out['type']})")
                ok = False
        if ok:
            stats.latency["export-cycle"].append(time.perf_counter() - t_cycle)
            stats.export["cycles_done"] += 1
        if rng.random() < 0.5:
            if (d := await timed(stats, "export-delete", conn, "DELETE", poll)) is not None and d[0] == 202:
                stats.export["deleted"] += 1
        else:
            stats.export["left_to_finish"] += 1
    conn.close()


async def synthesize_client(port: int, deadline: float, stats: Stats, rng: random.Random) -> None:
    conn = Conn(port)
    while time.perf_counter() < deadline:
        params = [{"name": "count", "valueInteger": rng.randint(1, 3)},
                  {"name": "seed", "valueInteger": rng.randrange(1, 1 << 30)}]
        if rng.random() < 0.5:
            params.append({"name": "sex", "valueCode": rng.choice(["male", "female"])})
        body = orjson.dumps({"resourceType": "Parameters", "parameter": params})
        res = await timed(stats, "synthesize", conn, "POST", "/Patient/$synthesize", body=body,
                          timeout=SYNTHESIZE_TIMEOUT_S)
        if res is None:
            continue
        if res[0] == 201:
            entries = orjson.loads(res[2]).get("entry", [])
            stats.synth_patients += sum(1 for e in entries if e["resource"]["resourceType"] == "Patient")
        elif res[0] == 429 and (wait := _retry_after(res[1])) is not None:
            await asyncio.sleep(min(wait, max(0.0, deadline - time.perf_counter())))
    conn.close()


async def load(port: int, paths: list[str], clients: int, seconds: float, *, export_clients: int = 0,
               synth_clients: int = 0, codes: list[str] | None = None, seed: int = 0) -> tuple[Stats, float]:
    stats = Stats()
    deadline = time.perf_counter() + seconds
    tasks = []
    for c in range(clients):
        rng = random.Random(seed * 1000 + c)
        if c < export_clients:
            tasks.append(export_client(port, deadline, stats, rng, codes or []))
        elif c < export_clients + synth_clients:
            tasks.append(synthesize_client(port, deadline, stats, rng))
        else:
            tasks.append(reader_client(port, paths, deadline, stats, rng))
    t0 = time.perf_counter()
    await asyncio.gather(*tasks)
    return stats, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------- workload


def workload(port: int) -> tuple[list[str], list[str]]:
    """Request paths drawn from what the server holds (reads, searches, paging, $everything) + Condition codes."""
    import httpx

    base = f"http://127.0.0.1:{port}"
    ids: dict[str, list[str]] = {}
    codes: list[str] = []
    obs_codes: list[str] = []
    with httpx.Client(timeout=30) as c:
        for rtype in ("Patient", "Condition", "Observation", "Encounter"):
            bundle = c.get(f"{base}/{rtype}", params={"_count": 200}).json()
            ids[rtype] = [e["resource"]["id"] for e in bundle.get("entry", [])]
            for e in bundle.get("entry", []):
                coding = (e["resource"].get("code") or {}).get("coding") or [{}]
                if coding[0].get("code"):
                    (codes if rtype == "Condition" else obs_codes).append(f"{coding[0].get('system')}|"
                                                                          f"{coding[0]['code']}")
    if not ids["Patient"]:
        raise SystemExit("the store holds no patients")
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
    return paths, sorted(set(obs_codes))[:20]


# ------------------------------------------------------------------------------------------ machine load


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    vals = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class MachineLoad:
    """CPU use of the whole machine, the server and this client process over the run (how shared the box was)."""

    def __init__(self, server_pid: int) -> None:
        self.pid = server_pid
        self.load0 = os.getloadavg()
        self.cpu0 = _cpu_times()
        self.srv0 = _proc_cpu_s(server_pid)
        self.me0 = time.process_time()
        self.t0 = time.perf_counter()

    def result(self) -> dict:
        wall = time.perf_counter() - self.t0
        busy, total = (b - a for a, b in zip(self.cpu0, _cpu_times()))
        ncpu = os.cpu_count() or 1
        srv = _proc_cpu_s(self.pid) - self.srv0
        me = time.process_time() - self.me0
        machine = busy / total * ncpu if total else 0.0
        return {"cpus": ncpu, "loadavg_1m_before": round(self.load0[0], 2),
                "loadavg_1m_after": round(os.getloadavg()[0], 2),
                "machine_busy_cores": round(machine, 2), "server_cores": round(srv / wall, 2),
                "client_cores": round(me / wall, 2),
                "other_work_cores": round(max(0.0, machine - srv / wall - me / wall), 2)}


# --------------------------------------------------------------------------------------------------- setup


def build_db(db: Path, data: Path | None, shared_patients: int) -> dict:
    if shared_patients:
        from bench_server import load_shared

        return load_shared(db, shared_patients)
    from fhirsynth.store.loader import build_store

    store, _ = build_store(data, db)
    counts = store.counts()
    store.close()
    return counts


def tiny_model(root: Path, env: dict) -> Path:
    """A tiny DP model (random timelines, one epoch) so $synthesize has something to sample from (~10 s)."""
    script = "import sys; from fhirsynth.model.tiny import train_tiny_model; train_tiny_model(sys.argv[1])"
    subprocess.run([sys.executable, "-W", "ignore", "-c", script, str(root)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return root / "model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=("mixed", "reads"), default="mixed")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--data", type=Path, default=REPO / "fixtures" / "server" / "export", help="export dir to serve")
    src.add_argument("--shared-patients", type=int, default=0,
                     help="serve the first N patients of the shared Synthea cohort instead (tagged HTEST)")
    ap.add_argument("--model", type=Path, default=None, help="model dir for $synthesize (default: train a tiny one)")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--export-share", type=float, default=0.125, help="mixed: share of clients running $export")
    ap.add_argument("--synthesize-share", type=float, default=0.0625,
                    help="mixed: share of clients calling $synthesize (0 = none, no model needed)")
    ap.add_argument("--ceiling-seconds", type=float, default=10.0, help="0 skips the ceiling run")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FHIRSYNTH_PROGRESS": "0"}
    env.pop("FHIRSYNTH_SERVER_TOKEN", None)
    mixed = args.profile == "mixed"
    n_export = round(args.clients * args.export_share) if mixed else 0
    n_synth = round(args.clients * args.synthesize_share) if mixed else 0

    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        db = Path(tmp) / "store.sqlite"
        counts = build_db(db, None if args.shared_patients else args.data, args.shared_patients)
        model = args.model
        if n_synth and model is None:
            model = tiny_model(Path(tmp), env)
        port = free_port()
        server = subprocess.Popen([sys.executable, "-c", SERVER_APP, str(db), str(port), str(model or "-")],
                                  env=env, stderr=subprocess.PIPE)
        try:
            wait_ready(port, server, "/metadata")
            paths, codes = workload(port)
            machine = MachineLoad(server.pid)
            stats, elapsed = asyncio.run(load(port, paths, args.clients, args.seconds, export_clients=n_export,
                                              synth_clients=n_synth, codes=codes))
            machine_load = machine.result()
        finally:
            server.terminate()
            try:
                _, stderr = server.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                _, stderr = server.communicate()
        tracebacks = stderr.decode(errors="replace").count("Traceback")
        if tracebacks:
            print(stderr.decode(errors="replace")[-4000:], file=sys.stderr)

    median_bytes = int(statistics.median(stats.sizes)) if stats.sizes else 0
    ceiling = None
    if args.ceiling_seconds > 0:
        port = free_port()
        bare = subprocess.Popen([sys.executable, "-c", BARE_APP, str(port), str(median_bytes)], env=env)
        try:
            wait_ready(port, bare, "/")
            cstats, celapsed = asyncio.run(load(port, ["/bare"], args.clients, args.ceiling_seconds))
            ceiling = cstats.summary(celapsed)["read"]
        finally:
            bare.terminate()
            bare.wait(15)

    ops = stats.summary(elapsed)
    reads_rps = sum(ops[k]["per_s"] for k in ("read", "search") if k in ops)
    exp = stats.export
    out = {
        "profile": args.profile, "clients": args.clients,
        "roles": {"export": n_export, "synthesize": n_synth, "read/search": args.clients - n_export - n_synth},
        "store": counts, "seconds": round(elapsed, 1), "distinct_read_paths": len(set(paths)),
        "operations": ops,
        "errors": sum(stats.errors.values()), "error_kinds": stats.errors,
        # aggregate: resources streamed to all export clients together per second of the run
        "export": {**exp, "resources_per_s": round(exp["resources"] / elapsed, 1)},
        "synthesized_patients": stats.synth_patients,
        "server_tracebacks": tracebacks,
        "machine": machine_load,
        "ceiling_bare_uvicorn": ceiling,
        "ratio_read_search_rps_vs_ceiling": round(reads_rps / ceiling["per_s"], 3) if ceiling else None,
    }
    print(f"{'operation':16s} {'n':>7s} {'/s':>7s} {'429':>5s} {'p50 ms':>8s} {'p99 ms':>8s} {'max ms':>8s}")
    for kind, r in ops.items():
        print(f"{kind:16s} {r['n']:7d} {r['per_s']:7.1f} {r['throttled_429']:5d} {r['p50_ms'] or 0:8.1f} "
              f"{r['p99_ms'] or 0:8.1f} {r['max_ms'] or 0:8.1f}")
    print(json.dumps(out, indent=2))
    sys.exit(1 if stats.errors or tracebacks else 0)


if __name__ == "__main__":
    main()
