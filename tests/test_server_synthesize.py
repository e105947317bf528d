"""POST /Patient/$synthesize with a real (tiny, DP-trained) model: sampled patients are stored and returned."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fhirsynth.api.app import create_app
from fhirsynth.api.settings import ServerSettings
from fhirsynth.store.loader import build_store
from fhirsynth.store.params import is_synthetic

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from fhirsynth.model.tiny import train_tiny_model

    return train_tiny_model(tmp_path_factory.mktemp("synth"))


def test_synthesize_stores_and_returns_patients(tiny_model: Path, tmp_path: Path, fixtures_dir: Path):
    store, _ = build_store(fixtures_dir / "server" / "export", tmp_path / "s.db")
    app = create_app(ServerSettings(db_path=tmp_path / "s.db", model_dir=tiny_model), store=store)
    with TestClient(app) as c:
        before = c.get("/Group/all").json()["quantity"]
        params = {"resourceType": "Parameters", "parameter": [{"name": "count", "valueInteger": 3},
                                                              {"name": "seed", "valueInteger": 5},
                                                              {"name": "sex", "valueCode": "female"}]}
        r = c.post("/Patient/$synthesize", json=params)
        assert r.status_code == 201, r.text
        bundle = r.json()
        resources = [e["resource"] for e in bundle["entry"]]
        patients = [x for x in resources if x["resourceType"] == "Patient"]
        assert len(patients) == 3 and all(p["gender"] == "female" for p in patients)
        assert all(is_synthetic(x) for x in resources)
        for x in resources:  # every returned resource is now served
            assert c.get(f"/{x['resourceType']}/{x['id']}").status_code == 200
        assert c.get("/Group/all").json()["quantity"] == before + 3
        # the same seed again: new ids (the store's counter), nothing overwritten
        again = c.post("/Patient/$synthesize", params={"count": 3, "seed": 5, "sex": "female"}).json()
        new_ids = {e["resource"]["id"] for e in again["entry"] if e["resource"]["resourceType"] == "Patient"}
        assert len(new_ids) == 3 and not new_ids & {p["id"] for p in patients}
        assert c.get("/Patient", params={"_summary": "count"}).json()["total"] == before + 6


def test_serve_model_generates_at_start(tiny_model: Path, tmp_path: Path):
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "fhirsynth", "-q", "serve", "--model", str(tiny_model), "-n", "4",
                             "--db", str(tmp_path / "m.db"), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                cs = httpx.get(f"{base}/metadata", timeout=1).json()
                break
            except httpx.TransportError:
                time.sleep(0.05)
        ops = {o["name"] for o in cs["rest"][0]["resource"][0]["operation"]}
        assert "synthesize" in ops
        assert httpx.get(f"{base}/Patient", params={"_summary": "count"}).json()["total"] == 4
        r = httpx.post(f"{base}/Patient/$synthesize", params={"count": 2}, timeout=60)
        assert r.status_code == 201
        assert httpx.get(f"{base}/Patient", params={"_summary": "count"}).json()["total"] == 6
    finally:
        proc.terminate()
        proc.wait(timeout=10)
