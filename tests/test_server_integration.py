"""Integration: `fhirsynth serve` as a real process on loopback, driven by a real FHIR client (fhirpy) and httpx."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest
from fhirpy import SyncFHIRClient


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, fixtures_dir: Path):
    port = _free_port()
    db = tmp_path_factory.mktemp("srv") / "store.db"
    env = dict(os.environ, FHIRSYNTH_PROGRESS="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fhirsynth", "-q", "serve", "--data", str(fixtures_dir / "server" / "export"),
         "--db", str(db), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {proc.stdout.read().decode()}")
            try:
                if httpx.get(f"{base}/metadata", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        else:
            raise AssertionError("server did not start")
        yield base, db
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def client(server) -> SyncFHIRClient:
    return SyncFHIRClient(server[0])


def test_search_all_pages_counts_add_up(client):
    total = client.resources("Observation").count()
    assert total == 84
    got = client.resources("Observation").limit(10).fetch_all()
    assert len(got) == total and len({o["id"] for o in got}) == total
    mine = client.resources("Observation").search(patient="p01").limit(4).fetch_all()
    assert len(mine) == client.resources("Observation").search(patient="Patient/p01").count()
    assert all(o["subject"]["reference"] == "Patient/p01" for o in mine)
    females = client.resources("Patient").search(gender="female").sort("-birthdate").limit(2).fetch_all()
    assert len(females) == 6 and all(p["gender"] == "female" for p in females)


def test_read(client):
    p = client.reference("Patient", "p05").to_resource()
    assert p["id"] == "p05" and p["resourceType"] == "Patient"
    assert client.resources("Patient").search(_id="p05").get()["gender"] == "male"


def test_include(client):
    bundle = client.resources("Observation").search(patient="p03").include("Observation", "patient").limit(5).fetch_raw()
    modes = [e["search"]["mode"] for e in bundle["entry"]]
    assert modes.count("match") == 5 and modes.count("include") == 1
    inc = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "include"]
    assert inc[0]["id"] == "p03"


def test_everything(client):
    b = client.execute("Patient/p04/$everything", method="get", params={"_count": 5})
    total, seen = b["total"], [e["resource"]["id"] for e in b["entry"]]
    while nxt := [lk["url"] for lk in b["link"] if lk["relation"] == "next"]:
        b = httpx.get(nxt[0]).json()
        seen += [e["resource"]["id"] for e in b["entry"]]
    assert len(seen) == total and seen[0] == "p04"
    n_obs = client.resources("Observation").search(patient="p04").count()
    n_cond = client.resources("Condition").search(patient="p04").count()
    n_enc = client.resources("Encounter").search(patient="p04").count()
    assert total == 1 + n_obs + n_cond + n_enc + 1  # + Provenance


def test_export_kickoff_poll_download(server, client):
    base, _ = server
    with httpx.Client(timeout=10) as http:
        r = http.get(f"{base}/$export", headers={"Prefer": "respond-async", "Accept": "application/fhir+json"})
        assert r.status_code == 202
        poll = r.headers["content-location"]
        for _ in range(500):
            s = http.get(poll)
            if s.status_code == 200:
                break
            assert s.status_code == 202
            time.sleep(float(s.headers.get("retry-after", "1")) / 20)
        manifest = s.json()
        counts = {}
        for out in manifest["output"]:
            n = 0
            with http.stream("GET", out["url"]) as resp:
                assert resp.status_code == 200
                for line in resp.iter_lines():
                    if line:
                        assert orjson.loads(line)["resourceType"] == out["type"]
                        n += 1
            assert n == out["count"]
            counts[out["type"]] = n
        for rtype in ("Patient", "Condition", "Observation", "Encounter", "Provenance"):
            assert counts[rtype] == client.resources(rtype).count()
        assert http.delete(poll).status_code == 202


def test_errors_over_http(server):
    base, _ = server
    r = httpx.get(f"{base}/Patient/none")
    assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome"
    r = httpx.put(f"{base}/Patient/p01", json={"resourceType": "Patient", "id": "p01"})
    assert r.status_code == 405 and r.json()["resourceType"] == "OperationOutcome"
    r = httpx.get(f"{base}/not/a/path/at/all")
    assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome"


def test_serve_refuses_untagged_data(fixtures_dir: Path, tmp_path: Path):
    r = subprocess.run([sys.executable, "-m", "fhirsynth", "serve", "--data", str(fixtures_dir / "server" / "untagged"),
                        "--db", str(tmp_path / "x.db"), "--port", str(_free_port())],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "Patient/real-person" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "fhirsynth", "serve", "--model", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "-n" in r.stderr
