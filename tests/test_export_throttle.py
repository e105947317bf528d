"""Export admission over real HTTP (uvicorn in a thread on loopback): a burst of kick-offs beyond the queue gets
429 + Retry-After + OperationOutcome, queued jobs report progress, and a full job table reclaims only jobs whose
client already fetched everything."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from fhirsynth.api.app import create_app
from fhirsynth.api.settings import ServerSettings
from fhirsynth.store.loader import build_store
from serverproc import free_port

ASYNC = {"Prefer": "respond-async"}


@pytest.fixture()
def server(tmp_path: Path, fixtures_dir: Path):
    db = tmp_path / "store.db"
    store, _ = build_store(fixtures_dir / "server" / "export", db)
    app = create_app(ServerSettings(db_path=db, export_jobs=3, export_pending=2, export_workers=1), store=store)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:  # never carry on against a server that is not listening
        assert thread.is_alive() and time.monotonic() < deadline, "the export server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", app.state.context
    srv.should_exit = True
    thread.join(10)


def _finish(http: httpx.Client, poll: str) -> dict:
    for _ in range(300):
        s = http.get(poll)
        if s.status_code == 200:
            return s.json()
        time.sleep(0.02)
    raise AssertionError("export never finished")


def _throttled(r: httpx.Response) -> str:
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1
    doc = r.json()
    assert doc["resourceType"] == "OperationOutcome" and doc["issue"][0]["code"] == "throttled"
    return doc["issue"][0]["diagnostics"]


def test_burst_beyond_queue_gets_429_then_jobs_complete(server):
    base, ctx = server
    ctx.export_slots.acquire()  # the only worker is busy: kick-offs stay queued
    try:
        with httpx.Client(timeout=30) as http:
            polls = [http.get(f"{base}/$export", headers=ASYNC).headers["content-location"] for _ in range(2)]
            s = http.get(polls[0])
            assert s.status_code == 202 and s.headers["x-progress"] == "queued"
            assert "queued or running" in _throttled(http.get(f"{base}/$export", headers=ASYNC))
            assert "queued or running" in _throttled(http.post(f"{base}/Patient/$export", headers=ASYNC,
                                                               json={"resourceType": "Parameters"}))
    finally:
        ctx.export_slots.release()
    with httpx.Client(timeout=30) as http:
        manifests = [_finish(http, p) for p in polls]
        assert all(m["output"] for m in manifests)
        # both finished: the queue has room again
        r = http.get(f"{base}/$export", headers=ASYNC)
        assert r.status_code == 202
        for p in [*polls, r.headers["content-location"]]:
            assert http.delete(p).status_code == 202


def test_full_table_reclaims_only_fully_downloaded_jobs(server):
    base, ctx = server
    with httpx.Client(timeout=30) as http:
        polls = []
        for _ in range(3):  # export_jobs=3: the table is full once all three finished
            polls.append(http.get(f"{base}/$export", params={"_type": "Patient,Condition"},
                                  headers=ASYNC).headers["content-location"])
            _finish(http, polls[-1])
        assert "none has been fully downloaded" in _throttled(http.get(f"{base}/$export", headers=ASYNC))
        # the client of job 1 fetches the manifest and only one of its two files: still not reclaimable
        manifest = http.get(polls[1]).json()
        assert http.get(manifest["output"][0]["url"]).status_code == 200
        _throttled(http.get(f"{base}/$export", headers=ASYNC))
        # ... and the second: now it is the one taken back, the others stay
        assert http.get(manifest["output"][1]["url"]).status_code == 200
        r = http.get(f"{base}/$export", headers=ASYNC)
        assert r.status_code == 202
        assert http.get(polls[1]).status_code == 404
        assert http.get(polls[0]).status_code == 200 and http.get(polls[2]).status_code == 200
