"""kill -9 during ingest, generate (export) and train: nothing complete-looking is left behind, and rerunning the
same command finishes with the same result as an uninterrupted run.

Kills are timed on observable progress (a temp file or checkpoint appearing), not on wall time alone; a process
that finished before the kill is accepted (the rerun and comparison still run).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fhirsynth.model.train import default_work_dir

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Tiny DP model: the smallest settings `train` allows; 80 patients / batch 8 = 10 steps per epoch, so there are
# several epoch checkpoints before the end.
TRAIN_ARGS = ["--epsilon", "8", "--epochs", "4", "--batch-size", "8", "--d-model", "8", "--layers", "1",
              "--heads", "1", "--max-len", "64", "--device", "cpu", "--seed", "7", "--reference-date", "2025-01-01",
              # the resumed run must continue the same noise as the uninterrupted one: replayable noise
              "--reproducible-noise"]


def cmd(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "fhirsynth", "-q", *map(str, args)]


def run_ok(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd(*args), capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def kill_at(args: list[str], point: str, marker_dir: Path, *, timeout: float = 240) -> None:
    """Run the command with the pause point `point` armed (fhirsynth/testpoint.py): it stops there, and is
    SIGKILLed while stopped, so the crash happens exactly at that moment on every run. Finishing first fails."""
    marker = marker_dir / f".pause-{point}"
    marker.unlink(missing_ok=True)
    env = {**ENV, "FHIRSYNTH_PAUSE_AT": point, "FHIRSYNTH_PAUSE_MARKER": str(marker)}
    proc = subprocess.Popen(cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + timeout
    try:
        while not marker.is_file():
            if proc.poll() is not None:
                pytest.fail(f"{args[0]} ended (rc {proc.returncode}) before reaching {point}: "
                            f"{proc.stderr.read().decode(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{args[0]}: pause point {point} never reached")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        marker.unlink(missing_ok=True)


def visible(d: Path) -> set[str]:
    return {p.name for p in d.iterdir() if not p.name.startswith(".")} if d.is_dir() else set()


def hidden_matching(d: Path, pattern: str) -> bool:
    return d.is_dir() and any(d.glob(pattern))


# ----------------------------------------------------------------------------------------------------- ingest


def ingest_summary(d: Path) -> dict:
    report = json.loads((d / "ingest-report.json").read_text())
    return {
        "events": pq.read_metadata(d / "events.parquet").num_rows,
        "patients": pq.read_metadata(d / "patients.parquet").num_rows,
        "totals": report["totals"],
        "types": report["resource_types"],
    }


@pytest.fixture(scope="module")
def sample_timelines(tmp_path_factory: pytest.TempPathFactory, fixtures_dir: Path) -> Path:
    """The uninterrupted reference ingest of fixtures/sample (also the training input below)."""
    out = tmp_path_factory.mktemp("crash") / "timelines"
    run_ok("ingest", fixtures_dir / "sample", "--out", out)
    return out


def test_kill_during_ingest_then_rerun(tmp_path: Path, fixtures_dir: Path, sample_timelines: Path,
                                       reference_model: Background) -> None:  # starts the reference training
    out = tmp_path / "tl"
    args = ["ingest", str(fixtures_dir / "sample"), "--out", str(out)]
    # the hidden spill dir appears once reading has started; give it a moment to be mid-way
    kill_at(args, "ingest-between-passes", tmp_path)
    # killed between the passes: spill files written, nothing that looks like a result
    assert hidden_matching(out, ".ingest-*") and visible(out) == set(), visible(out)
    run_ok(*args)
    assert ingest_summary(out) == ingest_summary(sample_timelines)
    # the killed run's spill dir is not a result, only disk the user did not ask for: the rerun removes it
    assert not sorted(p.name for p in out.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------------------ train


class Background:
    """A command running in the background; .result() waits for it and returns its output path."""

    def __init__(self, args: list[str], out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)

    def result(self, timeout: float = 300) -> Path:
        _, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err.decode(errors="replace")[-3000:]
        return self.out


@pytest.fixture(scope="module")
def reference_model(tmp_path_factory: pytest.TempPathFactory, sample_timelines: Path):
    """The uninterrupted DP training run, started in the background so it overlaps the tests before it."""
    out = tmp_path_factory.mktemp("crash") / "model-ref"
    job = Background(["train", str(sample_timelines), "--out", str(out), *TRAIN_ARGS], out)
    yield job
    if job.proc.poll() is None:
        job.proc.kill()
        job.proc.wait()


def test_kill_during_train_then_resume(tmp_path: Path, sample_timelines: Path, reference_model: Background) -> None:
    import torch

    out = tmp_path / "model"
    args = ["train", str(sample_timelines), "--out", str(out), *TRAIN_ARGS]
    state = default_work_dir(out) / "state.pt"
    kill_at(args, "train-after-checkpoint", tmp_path)
    # killed right after a checkpoint: a model dir is complete when privacy.json exists (written last)
    assert not (out / "privacy.json").exists(), visible(out)
    assert state.is_file()
    assert not out.exists() or not list(out.rglob("*.pt")), "private training state inside the model dir"
    run_ok(*args, timeout=300)
    assert not default_work_dir(out).exists(), "checkpoint left behind after a finished run"
    reference = reference_model.result()
    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert not leftovers, f"train rerun left the killed run's temp files: {leftovers}"

    got = json.loads((out / "privacy.json").read_text())
    want = json.loads((reference / "privacy.json").read_text())
    for key in ("epsilon_total", "delta", "steps", "noise_multiplier", "n_estimate", "dp"):
        assert got[key] == want[key], (key, got[key], want[key])
    # the resumed run continues the same Poisson batches and noise: the weights are the uninterrupted run's
    a = torch.load(out / "model.pt", weights_only=True)
    b = torch.load(reference / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert (out / "vocab.json").read_bytes() == (reference / "vocab.json").read_bytes()


# --------------------------------------------------------------------------------------------------- generate


def export_summary(d: Path) -> dict:
    manifest = json.loads((d / "manifest.json").read_text())
    files = {}
    for o in manifest["output"]:
        lines = [ln for ln in (d / o["url"]).read_bytes().splitlines() if ln.strip()]
        assert len(lines) == o["count"], o
        if o["type"] == "Bundle":  # one Bundle per patient: its entries' ids
            files[o["url"]] = [e["resource"]["id"] for e in json.loads((d / o["url"]).read_bytes())["entry"]]
        else:
            files[o["url"]] = sorted(json.loads(ln)["id"] for ln in lines)
    return {"counts": {o["url"]: o["count"] for o in manifest["output"]},
            "ids": files, "patients": manifest["extension"]["fhirsynth"]["patients"]}


GENERATE_N = {"ndjson": "600", "transaction": "150"}


@pytest.fixture(scope="module")
def reference_export(tmp_path_factory: pytest.TempPathFactory, reference_model: Background) -> Path:
    """The uninterrupted NDJSON export (also what the store-build test serves)."""
    out = tmp_path_factory.mktemp("crash") / "export-ref"
    run_ok("generate", reference_model.result(), "-n", GENERATE_N["ndjson"], "--out", out, "--seed", "5",
           "--device", "cpu")
    return out


@pytest.mark.parametrize("fmt", ["ndjson", "transaction"])
def test_kill_during_generate_then_rerun(tmp_path: Path, reference_model: Background, reference_export: Path,
                                         fmt: str) -> None:
    model = reference_model.result()
    n = GENERATE_N[fmt]
    if fmt == "ndjson":
        ref = reference_export
    else:
        ref = tmp_path / "ref"
        run_ok("generate", model, "-n", n, "--out", ref, "--seed", "5", "--format", fmt, "--device", "cpu")
    out = tmp_path / "ex"
    args = ["generate", str(model), "-n", n, "--out", str(out), "--seed", "5", "--format", fmt, "--device", "cpu"]
    kill_at(args, "generate-mid-export", tmp_path)
    # killed with two patients written: no manifest (written last), so nothing looks finished
    assert not (out / "manifest.json").exists()
    if fmt == "ndjson":
        assert visible(out) == set(), visible(out)  # NDJSON parts stay hidden until the end
    else:
        assert len(visible(out)) == 2, visible(out)  # Bundles are final files, one per patient written
    rerun = args if fmt == "ndjson" else [*args, "--force"]  # Bundles are final files: overwriting needs --force
    run_ok(*rerun)
    assert export_summary(out) == export_summary(ref)
    assert not any(p.name.endswith(".part") for p in out.iterdir()), sorted(p.name for p in out.iterdir())
    if fmt == "transaction":
        # the interrupted run's Bundles are the same patients (same seed), so nothing stale is left over
        assert visible(out) == visible(ref)


# ----------------------------------------------------------------------------------------------- serve (store)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kill_during_store_build_then_rerun(tmp_path: Path, reference_export: Path) -> None:
    """`serve --data --db` builds the SQLite store in a temp file: a kill never leaves a half store at --db."""
    import httpx

    db = tmp_path / "store.sqlite"
    args = ["serve", "--data", str(reference_export), "--db", str(db), "--port", str(_free_port())]
    kill_at(args, "store-before-rename", tmp_path)
    # killed with a full temp store written, before the rename: nothing at --db
    assert hidden_matching(tmp_path, ".store.sqlite.*.tmp") and not db.exists()
    port = _free_port()
    proc = subprocess.Popen(cmd("serve", "--data", reference_export, "--db", db, "--port", port),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                resp = httpx.get(f"http://127.0.0.1:{port}/Patient", params={"_summary": "count"}, timeout=5)
                if resp.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        assert resp.json()["total"] == int(GENERATE_N["ndjson"])
    finally:
        proc.terminate()
        proc.wait(15)
    # the killed build's temp database (a whole store's worth of bytes) was cleaned up by the rerun
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".store.sqlite")) == []
