"""composition.py: every release of a training run composed in Renyi DP (issue 15: privacy that still pays)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fhirsynth.errors import PrivacyBudgetError
from fhirsynth.model import composition as C
from fhirsynth.model.dpnoise import gaussian_sigma

A = np.asarray(C.ORDERS)


def test_a_gaussian_release_is_rho_zcdp_and_a_laplace_one_is_capped_at_epsilon():
    g = C.gaussian("g", sigma=4.0, sensitivity=2.0)
    assert g.rho == pytest.approx(4 / 32) and g.threshold_delta == 0.0
    assert g.rdp() == pytest.approx(A * 4 / 32)
    lap = C.laplace("l", 0.5)
    assert lap.rdp() == pytest.approx(np.minimum(0.5, A * 0.125))
    assert lap.rdp()[0] == pytest.approx(1.1 * 0.125) and lap.rdp()[-1] == pytest.approx(0.5)
    for bad in ((0.0, 1.0), (1.0, 0.0), (-1.0, 1.0)):
        with pytest.raises(PrivacyBudgetError, match="needs sigma > 0"):
            C.gaussian("x", *bad)
    with pytest.raises(PrivacyBudgetError, match="needs epsilon > 0"):
        C.laplace("x", 0.0)


def test_rho_budget_converts_back_to_the_target_and_grows_with_delta():
    for eps, delta in ((8.0, 1e-5), (1.0, 1e-6), (0.3, 1e-7)):
        rho = C.rho_budget(eps, delta)
        assert C.epsilon_of(A * rho, delta) == pytest.approx(eps, rel=1e-6)
        assert C.epsilon_of(A * rho * 1.01, delta) > eps
    assert C.rho_budget(1.0, 1e-4) > C.rho_budget(1.0, 1e-8)


def test_nominal_epsilon_gives_the_release_its_rho():
    for rho in (0.01, 0.3, 1.2):
        for s in (1.0, 8.0):
            sigma = gaussian_sigma(C.nominal_epsilon(rho, 1e-6), 1e-6, s)
            assert s * s / (2 * sigma * sigma) == pytest.approx(rho, rel=2e-3)
    with pytest.raises(PrivacyBudgetError, match="positive share"):
        C.nominal_epsilon(0.0, 1e-6)


def _reports(sigma_items: float = 30.0, with_measurements: bool = True) -> tuple[dict, dict | None]:
    vocab = {"mechanism": "set union", "sigma": sigma_items, "max_items_per_patient": 16, "epsilon": 1.0,
             "delta": 4e-7,
             "sex_marginal": {"epsilon": 0.2, "delta": 0.0}, "death_by_birth_band": {"epsilon": 0.2, "delta": 0.0},
             "value_bins": {"sigma": 50.0, "max_codes_per_patient": 8, "epsilon": 0.2, "delta": 5e-7},
             "value_kinds": {"sigma": 80.0, "max_pairs_per_patient": 16, "epsilon": 0.2, "delta": 5e-8},
             "epsilon_total": 2.0, "delta_total": 9.5e-7}
    meas = {"epsilon": 1.6, "delta": 1e-6,
            "families": {"cells": {"sigma": 10.0, "sensitivity": 1.0}, "prevalence": {"sigma": 40.0,
                                                                                     "sensitivity": 8.0}}}
    return vocab, meas if with_measurements else None


def test_releases_of_reads_every_mechanism_of_the_reports():
    vocab, meas = _reports()
    rel = {r.name: r for r in C.releases_of(vocab, meas)}
    assert set(rel) == {"vocabulary items", "sex_marginal", "death_by_birth_band", "value_bins", "value_kinds",
                        "measurements.cells", "measurements.prevalence"}
    assert rel["vocabulary items"].rho == pytest.approx(16 / (2 * 900))
    assert rel["vocabulary items"].threshold_delta == pytest.approx(2e-7)  # half its delta: the threshold's
    assert rel["value_bins"].rho == pytest.approx(16 / (2 * 2500)) and rel["value_bins"].threshold_delta == 2.5e-7
    assert rel["value_kinds"].rho == pytest.approx(16 / (2 * 6400)) and rel["value_kinds"].threshold_delta == 0
    assert rel["sex_marginal"].pure_epsilon == 0.2 and rel["measurements.prevalence"].rho == pytest.approx(0.02)
    assert len(C.releases_of(vocab, None)) == 5


def test_an_unknown_release_in_the_report_is_an_error_not_left_out():
    vocab, meas = _reports()
    vocab["new_histogram"] = {"epsilon": 0.3, "delta": 0.0}
    with pytest.raises(PrivacyBudgetError, match="does not know: new_histogram"):
        C.releases_of(vocab, meas)


def test_compose_adds_every_part_and_beats_basic_composition():
    vocab, meas = _reports()
    rel = C.releases_of(vocab, meas)
    history = [(1.1, 0.08, 130)]
    out = C.compose(rel, history, 1e-5)
    assert out["delta_thresholds"] == pytest.approx(2e-7 + 2.5e-7)
    assert out["delta_conversion"] == pytest.approx(1e-5 - 4.5e-7)
    recomputed = C.epsilon_of(sum(r.rdp() for r in rel) + C.sgd_rdp(history), out["delta_conversion"])
    assert out["epsilon"] == pytest.approx(recomputed)
    releases_alone = C.epsilon_of(C.released_rdp(rel), out["delta_conversion"])
    training_alone = C.epsilon_of(C.sgd_rdp(history), out["delta_conversion"])
    assert max(releases_alone, training_alone) < out["epsilon"] < releases_alone + training_alone
    # each part counts: a noisier vocabulary, no measurements, fewer steps all spend less
    assert C.compose(C.releases_of(*_reports(sigma_items=60.0)), history, 1e-5)["epsilon"] < out["epsilon"]
    assert C.compose(C.releases_of(*_reports(with_measurements=False)), history, 1e-5)["epsilon"] < out["epsilon"]
    assert C.compose(rel, [(1.1, 0.08, 65)], 1e-5)["epsilon"] < out["epsilon"]
    assert out["rho"]["sex_marginal"] == pytest.approx(0.02) and out["rho"]["measurements.cells"] == 0.005


def test_compose_refuses_thresholds_that_take_all_of_delta():
    with pytest.raises(PrivacyBudgetError, match="leaves nothing"):
        C.compose([C.gaussian("g", 10.0, 1.0, threshold_delta=1e-5)], [], 1e-5)
    with pytest.raises(PrivacyBudgetError, match="leaves nothing"):
        C.conversion_delta([C.gaussian("g", 10.0, 1.0, threshold_delta=6e-6)] * 2, 1e-5)
    assert C.conversion_delta([C.gaussian("g", 10.0, 1.0, threshold_delta=2e-6)] * 2, 1e-5) == pytest.approx(6e-6)


def test_sgd_rdp_sums_the_history_entries():
    one = C.sgd_rdp([(1.0, 0.1, 50)])
    assert C.sgd_rdp([(1.0, 0.1, 25), (1.0, 0.1, 25)]) == pytest.approx(one)
    assert C.sgd_rdp([]) == pytest.approx(np.zeros(len(A)))
    assert C.epsilon_of(np.zeros(len(A)), 1e-5) == 0.0
    with pytest.raises(PrivacyBudgetError, match="0 < delta < 1"):
        C.epsilon_of(one, 0.0)
    assert math.isfinite(C.epsilon_of(one, 1e-5))


def test_edges_of_the_inputs():
    # a scale under 1 is a valid (strong) release; delta must be a probability strictly under 1
    assert C.gaussian("g", 0.5, 1.0).rho == pytest.approx(2.0)
    with pytest.raises(PrivacyBudgetError, match="0 < delta < 1"):
        C.epsilon_of(C.sgd_rdp([(1.0, 0.1, 5)]), 1.0)
    assert C.released_rdp([]).shape == (len(A),) and not C.released_rdp([]).any()
    out = C.compose([C.laplace("l", 0.1)], [(1.0, 0.1, 5)], 1e-5)
    assert out["delta"] == 1e-5 and out["delta_thresholds"] == 0.0 and out["delta_conversion"] == 1e-5
