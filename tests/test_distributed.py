"""Distributed DP training: `torchrun --nproc_per_node 2 -m fhirsynth train` on CPU (gloo), accounted globally."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from test_model_helpers import write_dir

from fhirsynth.cli import main
from fhirsynth.model.checkpoint import read_privacy_report
from fhirsynth.model.sampler import sample_timelines
from fhirsynth.model.train import default_work_dir

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this torch build")

torch.set_num_threads(1)
TINY = ["--d-model", "16", "--layers", "1", "--heads", "1", "--max-len", "64", "--epochs", "1",
        "--batch-size", "16", "--max-physical-batch", "4", "--device", "cpu", "--reference-date", "2026-01-01",
        "--epsilon", "8"]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def _torchrun(tl, out, *extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", FHIRSYNTH_PROGRESS="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fhirsynth", "train", str(tl), "--out", str(out), *TINY, *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_torchrun_two_processes_matches_single_process_accounting(tmp_path, capsys):
    """With replayable noise (the only way two runs can be compared) the 2-process job accounts exactly like one
    process; by default (secret noise) it runs, accounts its own run, and differs from the replayable one."""
    from opacus.accountants import RDPAccountant

    tl = write_dir(tmp_path / "tl", 64, seed=5)
    proc = _torchrun(tl, tmp_path / "m2", "--reproducible-noise")
    # one summary line: only rank 0 reports (and writes)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, proc.stdout
    assert "rank 1 of 2" in proc.stderr  # both processes really joined the gloo group

    m2 = tmp_path / "m2"
    assert {"config.json", "model.pt", "privacy.json", "vocab.json"} <= {p.name for p in m2.iterdir()}
    assert not default_work_dir(m2).exists() and [p.name for p in m2.rglob("*.pt")] == ["model.pt"]
    rep2 = read_privacy_report(m2)
    assert rep2["world_size"] == 2 and rep2["dp"] is True
    assert rep2["epsilon_total"] <= rep2["epsilon_target"] == 8

    # the same settings in one process: same global sample rate, steps, noise and therefore epsilon
    assert main(["train", str(tl), "--out", str(tmp_path / "m1"), *TINY, "--reproducible-noise"]) == 0
    capsys.readouterr()
    rep1 = read_privacy_report(tmp_path / "m1")
    assert rep1["world_size"] == 1
    for key in ("sample_rate", "steps", "noise_multiplier", "n_estimate", "delta"):
        assert rep2[key] == rep1[key], key
    for key in ("epsilon_total", "epsilon_prv", "epsilon_rdp"):
        assert rep2[key] == pytest.approx(rep1[key], rel=1e-9), key
    # the vocabulary (a DP release) is made once, on rank 0, not once per rank with fresh noise
    assert (m2 / "vocab.json").read_bytes() == (tmp_path / "m1" / "vocab.json").read_bytes()

    # the weights were saved unwrapped (no DDP prefixes): the model dir is usable by the sampler
    got = list(sample_timelines(m2, 3, seed=2, batch_size=3, device="cpu"))
    assert len(got) == 3

    # the default: secret sampling and noise on every rank, accounted for the run it took
    _torchrun(tl, tmp_path / "m2s")
    sec = read_privacy_report(tmp_path / "m2s")
    assert sec["world_size"] == 2 and sec["reproducible_noise"] is False and "n" not in sec
    rdp = RDPAccountant()
    rdp.history = [(sec["noise_multiplier"], sec["sample_rate"], sec["steps"])]
    assert rdp.get_epsilon(sec["delta_conversion"]) == pytest.approx(sec["epsilon_rdp"], rel=1e-6)
    # every rank composed the same releases (the measurements' report is broadcast) into the target
    assert 0.97 * 8 <= sec["epsilon_total"] <= 8 * (1 + 1e-9)
    a = torch.load(m2 / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "m2s" / "model.pt", weights_only=True)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_distributed_flag_outside_torchrun_is_a_clear_error(tmp_path, monkeypatch, capsys):
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    tl = write_dir(tmp_path / "tl", 4, seed=1)
    assert main(["train", str(tl), "--out", str(tmp_path / "m"), "--distributed", *TINY]) == 2
    assert "torchrun" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
