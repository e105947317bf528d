"""$synthesize under a burst, over real HTTP (uvicorn in a thread): one generation runs at a time, at most
`synthesize_queue` calls wait for it, the rest get 429 + Retry-After + OperationOutcome instead of piling up."""

from __future__ import annotations

import asyncio
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

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from fhirsynth.model.tiny import train_tiny_model

    return train_tiny_model(tmp_path_factory.mktemp("synth-burst"))


def test_burst_beyond_queue_is_throttled(tiny_model: Path, tmp_path: Path, fixtures_dir: Path, monkeypatch):
    # the first generation is held at a pause point until the burst has been answered: no timing assumptions
    marker, release = tmp_path / "generating", tmp_path / "release"
    monkeypatch.setenv("FHIRSYNTH_PAUSE_AT", "synthesize-generating")
    monkeypatch.setenv("FHIRSYNTH_PAUSE_MARKER", str(marker))
    monkeypatch.setenv("FHIRSYNTH_PAUSE_RELEASE", str(release))
    monkeypatch.setenv("FHIRSYNTH_PAUSE_SECONDS", "120")
    store, _ = build_store(fixtures_dir / "server" / "export", tmp_path / "s.db")
    app = create_app(ServerSettings(db_path=tmp_path / "s.db", model_dir=tiny_model, synthesize_queue=1),
                     store=store)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    base = f"http://127.0.0.1:{port}"

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as http:
            first = asyncio.create_task(http.post(f"{base}/Patient/$synthesize", params={"count": 3, "seed": 1}))
            while not marker.exists():  # the first call holds the generator now, paused inside it
                assert not first.done(), (await first).text[:300]
                await asyncio.sleep(0.02)
            rest = [asyncio.create_task(http.post(f"{base}/Patient/$synthesize", params={"count": 1, "seed": s}))
                    for s in range(2, 6)]
            while sum(t.done() for t in rest) < 3:  # the turned-away calls answer while the first is held
                await asyncio.sleep(0.02)
            assert not first.done() and sum(t.done() for t in rest) == 3
            release.touch()
            return [await first, *[await t for t in rest]]

    try:
        responses = asyncio.run(asyncio.wait_for(burst(), 120))
        codes = sorted(r.status_code for r in responses)
        # one running, one waiting (synthesize_queue=1), three turned away; nothing else (no 5xx, no timeout)
        assert codes == [201, 201, 429, 429, 429], [(r.status_code, r.text[:200]) for r in responses]
        for r in responses:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["issue"][0]["code"] == "throttled"
        # once the burst is over, generation is available again
        assert httpx.post(f"{base}/Patient/$synthesize", params={"count": 1}, timeout=60).status_code == 201
    finally:
        srv.should_exit = True
        thread.join(10)
