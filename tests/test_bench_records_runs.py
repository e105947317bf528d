"""bench_records.py's run specs: ARCH:EPS:SEED[:key=value...] for a DP-regime sweep in one run."""

from __future__ import annotations

import argparse

import pytest
from bench_module import benchmark_module

from fhirsynth.model.config import ModelConfig

br = benchmark_module("bench_records")


def _parse(run: str):
    return br.parse_run(run, argparse.ArgumentParser(prog="bench_records"))


def test_a_sweep_run_names_its_settings_and_shapes_its_network():
    arch, eps, seed, settings, tag = _parse("visit:8:2:batch=256:lr=0.03:width=64:layers=1:epochs=40")
    assert (arch, eps, seed) == ("visit", "8", "2")
    assert settings == {"batch": "256", "lr": "0.03", "width": "64", "layers": "1", "epochs": "40"}
    assert tag == "-batch256-lr0.03-width64-layers1"  # epochs go into the model dir's ep part instead
    mc = br.run_model_config(arch, settings)
    assert (mc.d_model, mc.d_ff, mc.n_layers) == (64, 256, 1)
    plain = br.run_model_config("visit", {})
    assert (plain.d_model, plain.n_layers) == (ModelConfig.d_model, ModelConfig.n_layers)
    assert br.run_model_config("visit", {"init": "/some/prior"}) is None  # the prior's sizes


@pytest.mark.parametrize("run", ["visit:8", "visit:8:1:depth=3", "visit:8:1:width=", "visit:x:1", "visit:8:1:lr=a"])
def test_a_bad_run_spec_is_a_usage_error(run, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(run)
    assert exc.value.code == 2 and run.split(":")[0] in capsys.readouterr().err
