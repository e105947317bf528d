"""End to end through the CLI: `fhirsynth train` on generated timelines, then sampling from the model dir."""

from __future__ import annotations

import json

import pytest
import torch
from test_model_helpers import write_dir
from test_sampler import check_constraints

from fhirsynth.cli import main
from fhirsynth.model.checkpoint import model_hash, read_privacy_report
from fhirsynth.model.sampler import sample_timelines
from fhirsynth.model.scoring import sequence_nll

torch.set_num_threads(1)
TINY = ["--max-len", "96", "--d-model", "16", "--layers", "1", "--heads", "2", "--batch-size", "16",
        "--max-physical-batch", "8", "--device", "cpu", "--reference-date", "2026-01-01",
        "--max-items-per-patient", "8"]


def test_train_cli_then_sample(tmp_path, capsys):
    tl = write_dir(tmp_path / "tl", 64, seed=21)
    rc = main(["train", str(tl), "--out", str(tmp_path / "m"), "--epochs", "2", "--epsilon", "8", *TINY])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dp"] is True and "n" not in summary and summary["n_estimate"] > 0 and summary["epsilon_total"] <= 8
    rep = read_privacy_report(tmp_path / "m")
    assert rep["epsilon_total"] == pytest.approx(summary["epsilon_total"])
    tls = list(sample_timelines(tmp_path / "m", 40, seed=1, device="cpu"))
    assert len(tls) == 40 and all(check_constraints(t) == [] for t in tls)
    assert not {t.patient.patient_id for t in tls} & {f"real-21-{i}" for i in range(64)}
    nll = sequence_nll(tmp_path / "m", [t for t in tls[:5]], device="cpu")
    assert nll.shape == (5,)
    assert len(model_hash(tmp_path / "m")) == 64


def test_train_cli_no_dp(tmp_path, capsys):
    tl = write_dir(tmp_path / "tl", 40, seed=22)
    assert main(["train", str(tl), "--out", str(tmp_path / "m"), "--epochs", "1", "--no-dp", *TINY]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dp"] is False and summary["epsilon_total"] is None
    assert read_privacy_report(tmp_path / "m")["epsilon_total"] is None


@pytest.mark.parametrize("argv,needle", [
    (["--epsilon", "0"], "--epsilon"),
    (["--epsilon", "-3"], "--epsilon"),
    (["--delta", "x"], "--delta"),
    (["--epochs", "0"], "--epochs"),
])
def test_train_cli_bad_input_one_line_exit_2(tmp_path, capsys, argv, needle):
    tl = write_dir(tmp_path / "tl", 5, seed=1)
    with pytest.raises(SystemExit) if argv[0] == "--delta" else _nothing():
        rc = main(["train", str(tl), "--out", str(tmp_path / "m"), *argv])
        assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_train_cli_missing_dir(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
