"""Known answers for the pieces of the DP value-bin release (fhirsynth.model.dpbins): the grid cell of a value,
3-significant-digit rounding, the edges drawn from a grid histogram, the display decimals, each patient's
contribution, and what release_value_bins reports. Every expected value here is worked out by hand from the grid's
definition (16 cells per decade from 1e-4 to 1e6, negatives mirrored, one cell around 0), not by the code under
test."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from test_model_helpers import LOINC

from fhirsynth.model.dpbins import (
    GRID,
    N_BINS,
    _cell,
    _decimals,
    _edges,
    _round_sig,
    patient_contributions,
    release_value_bins,
)
from fhirsynth.model.dpnoise import NoiseSource
from fhirsynth.model.vocab import Item
from fhirsynth.timeline.types import Event, PatientInfo, Timeline

ZERO = 160  # the cell [-1e-4, 1e-4): 161 negative edges come first (-1e6 .. -1e-4)
ONE = ZERO + 1 + 64  # the cell [1, 10 ** (1/16)): 1e-4 is GRID[161], and 64 cells later comes 1


def test_grid_is_what_the_module_says():
    assert len(GRID) == 322 and GRID[ZERO] == pytest.approx(-1e-4) and GRID[ZERO + 1] == pytest.approx(1e-4)
    assert GRID[ONE] == pytest.approx(1.0) and GRID[ONE + 16] == pytest.approx(10.0)


def test_a_value_on_an_edge_belongs_to_the_cell_it_opens():
    assert _cell(float(GRID[ONE])) == ONE  # [GRID[i], GRID[i+1]): the left edge is inside
    assert _cell(float(GRID[ONE + 16])) == ONE + 16
    assert _cell(0.0) == ZERO and _cell(1.0) == ONE and _cell(1.1) == ONE
    assert _cell(-1.0) == ZERO - 64  # [-1, -10 ** (-1/16)): negative cells are closed on their left too


def test_values_beyond_the_grid_go_to_its_outer_cells():
    assert _cell(-1e9) == 0
    assert _cell(1e9) == len(GRID) - 2 and _cell(1e6) == len(GRID) - 2


@pytest.mark.parametrize("x, expected", [(123456.0, 123000.0), (1.23456, 1.23), (0.00123456, 0.00123),
                                         (98765.0, 98800.0), (-4.5678, -4.57), (0.0, 0.0), (7.0, 7.0)])
def test_round_to_three_significant_digits(x, expected):
    assert _round_sig(x) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("edges, expected", [
    ((0.0,), 0),  # nothing but 0: no decimals
    ((0.0, 5.0, 50.0), 2),  # smallest non-zero magnitude 5: 5.00
    ((0.5, 7.0), 3),  # 0.500
    ((500.0, 900.0), 0),  # 500
    ((5000.0, 9000.0), 0),  # never negative
    ((0.05, 1.0), 4),  # 0.0500
    ((0.0005, 1.0), 4),  # would be 6: capped at 4
    ((-0.5, 3.0), 3),  # magnitudes
])
def test_decimals_give_three_significant_digits_of_the_smallest_edge(edges, expected):
    assert _decimals(edges) == expected


def _hist(cells: dict[int, float]) -> np.ndarray:
    counts = np.zeros(len(GRID) - 1)
    for i, c in cells.items():
        counts[i] = c
    return counts


def test_uniform_mass_puts_one_edge_on_each_cell_boundary():
    counts = _hist({ONE + k: 10.0 for k in range(N_BINS)})
    assert _edges(counts, 5.0) == tuple(_round_sig(float(GRID[ONE + k])) for k in range(N_BINS + 1))


def test_edges_interpolate_inside_a_cell():
    # mass 10, 1, 10 in three cells (total 21): the quantile 4/8 (10.5) lies halfway through the middle cell
    counts = _hist({ONE: 10.0, ONE + 1: 1.0, ONE + 2: 10.0})
    edges = _edges(counts, 0.5)
    a, b = float(GRID[ONE + 1]), float(GRID[ONE + 2])
    assert _round_sig(a + 0.5 * (b - a)) in edges
    assert edges[0] == _round_sig(float(GRID[ONE])) and edges[-1] == _round_sig(float(GRID[ONE + 3]))
    # the other inner edges (targets 2.625, 5.25, 7.875 and 13.125, 15.75, 18.375) in the outer cells
    first = [_round_sig(float(GRID[ONE]) + t / 10 * float(GRID[ONE + 1] - GRID[ONE])) for t in (2.625, 5.25, 7.875)]
    last = [_round_sig(float(GRID[ONE + 2]) + (t - 11) / 10 * float(GRID[ONE + 3] - GRID[ONE + 2]))
            for t in (13.125, 15.75, 18.375)]
    assert edges == tuple(sorted({edges[0], *first, _round_sig(a + 0.5 * (b - a)), *last, edges[-1]}))


def test_an_empty_cell_inside_the_support_holds_no_edge_but_its_bounds():
    # 10, 0, 10: the median (10) falls where the empty cell begins and ends; searching from the right puts it at
    # the end of the empty cell, the start of the third
    counts = _hist({ONE: 10.0, ONE + 2: 10.0})
    edges = _edges(counts, 5.0)
    assert _round_sig(float(GRID[ONE + 2])) in edges and _round_sig(float(GRID[ONE + 1])) not in edges


def test_negative_noisy_counts_inside_the_support_count_as_zero():
    assert _edges(_hist({ONE: 10.0, ONE + 1: -10.0, ONE + 2: 10.0}), 5.0) == _edges(
        _hist({ONE: 10.0, ONE + 2: 10.0}), 5.0)


def test_cells_under_the_threshold_outside_the_support_carry_no_mass():
    assert _edges(_hist({ONE: 10.0, ONE + 1: 10.0, ONE + 2: 4.0}), 5.0) == _edges(
        _hist({ONE: 10.0, ONE + 1: 10.0}), 5.0)
    assert _edges(_hist({ONE: 10.0}), 11.0) is None


def test_a_heavy_last_cell_holds_the_upper_quantiles():
    # mass 1 in seven cells, 100 in the eighth (total 107): from 2/8 on every quantile lies in the last cell
    counts = _hist({**{ONE + k: 1.0 for k in range(7)}, ONE + 7: 100.0})
    edges = _edges(counts, 0.5)
    a, b = float(GRID[ONE + 7]), float(GRID[ONE + 8])
    expected_last = _round_sig(a + (7 / 8 * 107 - 7) / 100 * (b - a))
    assert expected_last in edges and edges[-1] == _round_sig(b)
    assert all(e < b for e in edges[:-1])


def test_support_ending_just_below_zero_ends_at_zero():
    # values in [-1.3e-4, -1e-4) only: the upper edge is 0 itself, not -1e-4
    counts = _hist({ZERO - 2: 10.0, ZERO - 1: 10.0})
    edges = _edges(counts, 5.0)
    assert edges[-1] == 0.0 and edges[0] == _round_sig(float(GRID[ZERO - 2]))


def test_support_starting_at_the_zero_cell_starts_at_zero():
    edges = _edges(_hist({ZERO: 10.0, ZERO + 1: 10.0}), 5.0)
    assert edges[0] == 0.0 and edges[-1] == _round_sig(float(GRID[ZERO + 2]))


T0 = datetime(2020, 1, 1, tzinfo=timezone.utc)


def _obs(code: str, value: float, unit: str, day: int, system: str = LOINC) -> Event:
    return Event(time=T0 + timedelta(days=day), kind="observation", system=system, code=code, display=None,
                 value=value, unit=unit, category="laboratory", status="final")


def _patient(pid: str, events: list[Event]) -> Timeline:
    return Timeline(PatientInfo(pid, sex="female"), events)


def test_contributions_keep_the_codes_with_most_values_and_their_main_unit():
    tl = _patient("p", [_obs("A", 1.0, "mg", 0), _obs("B", 2.0, "mg", 1), _obs("B", 4.0, "mg", 2),
                        _obs("B", 400.0, "g", 3), _obs("C", 5.0, "mg", 4), _obs("C", 7.0, "mg", 5),
                        _obs("C", 9.0, "mg", 6), _obs("C", 11.0, "mg", 7)])
    codes = {(LOINC, c) for c in "ABC"}
    assert patient_contributions(tl, codes, 1) == {(LOINC, "C"): (8.0, "mg")}
    # B: three values, two in mg (median 3.0)
    assert patient_contributions(tl, codes, 2) == {(LOINC, "C"): (8.0, "mg"), (LOINC, "B"): (3.0, "mg")}
    # ties in the number of values go to the smaller code
    assert patient_contributions(_patient("q", [_obs("B", 1.0, "mg", 0), _obs("A", 2.0, "mg", 1)]), codes, 1) == \
        {(LOINC, "A"): (2.0, "mg")}


def test_contributions_take_the_most_frequent_unit_not_the_first():
    tl = _patient("p", [_obs("A", 1.0, "g", 0), _obs("A", 2000.0, "mg", 1), _obs("A", 3000.0, "mg", 2)])
    assert patient_contributions(tl, {(LOINC, "A")}, 1) == {(LOINC, "A"): (2500.0, "mg")}


def _cohort(n: int, code: str, unit: str, base: float, *, system: str = LOINC) -> list[Timeline]:
    return [_patient(f"{code}{i}", [_obs(code, base * (1 + i / n), unit, 0, system)]) for i in range(n)]


def _release(tls, items, **kw):
    args = dict(public_codes=set(), m=2, dp=False, epsilon=None, delta=None, min_count=2,
                noise=NoiseSource.reproducible(0))
    args.update(kw)
    return release_value_bins(tls, items, **args)


def test_exact_report_and_bins_fields():
    tls = _cohort(12, "A", "mg/dL", 10.0)
    bins, report = _release(tls, [Item("observation", LOINC, "A")])
    assert report == {"mechanism": "exact counts (no DP)", "min_count": 2, "epsilon": None, "delta": None,
                      "candidate_codes": 1, "codes_with_bins": 1, "bins_per_code": N_BINS}
    vb = bins[(LOINC, "A")]
    # no display or category in the vocabulary: the code stands for its display, a lab by default
    assert (vb.system, vb.code, vb.display, vb.category, vb.unit, vb.unit_aliases) == \
        (LOINC, "A", "A", "laboratory", "mg/dL", ())
    assert vb.edges[0] == 10.0 and vb.decimals == 1  # three significant digits of 10: one decimal
    assert vb.edges[0] <= 10.0 and vb.edges[-1] >= 10.0 * (1 + 11 / 12)


def test_the_vocabulary_display_and_category_are_kept():
    bins, _ = _release(_cohort(6, "A", "mg", 3.0), [Item("observation", LOINC, "A", "Alpha", "vital-signs")])
    vb = bins[(LOINC, "A")]
    assert (vb.display, vb.category) == ("Alpha", "vital-signs")


def test_only_private_observation_items_are_candidates():
    tls = _cohort(6, "A", "mg", 3.0) + _cohort(6, "B", "mg", 3.0) + _cohort(6, "C", "mg", 3.0)
    items = [Item("observation", LOINC, "A"), Item("condition", LOINC, "B"),
             Item("observation", LOINC, "C", public=True)]
    bins, report = _release(tls, items)
    assert set(bins) == {(LOINC, "A")} and report["candidate_codes"] == 1
    _, report = _release(tls, [Item("observation", LOINC, "A")], public_codes={(LOINC, "A")})
    assert report["candidate_codes"] == 0


def test_an_item_without_system_matches_events_without_one():
    tls = _cohort(6, "A", "mg", 3.0, system="")
    bins, _ = _release(tls, [Item("observation", None, "A")])
    assert ("", "A") in bins


def test_a_code_without_bins_does_not_stop_the_codes_after_it():
    # A: one patient only (under min_count 2), B: six patients
    tls = _cohort(1, "A", "mg", 3.0) + _cohort(6, "B", "mg", 3.0)
    bins, report = _release(tls, [Item("observation", LOINC, "A"), Item("observation", LOINC, "B")])
    assert set(bins) == {(LOINC, "B")} and report["codes_with_bins"] == 1


def test_without_dp_every_code_of_a_patient_counts():
    # m bounds a patient's codes only under DP: with m=1 and dp off, both codes of each patient get bins
    tls = [_patient(f"p{i}", [_obs("A", 3.0, "mg", 0), _obs("A", 3.0, "mg", 1), _obs("B", 5.0, "mg", 2)])
           for i in range(6)]
    bins, _ = _release(tls, [Item("observation", LOINC, "A"), Item("observation", LOINC, "B")], m=1)
    assert set(bins) == {(LOINC, "A"), (LOINC, "B")}


def test_under_dp_each_patient_gives_at_most_m_codes():
    # epsilon so large that the discrete Gaussian rounds to 0 (sigma 0.035): what is released is what was
    # counted. With m=1 every patient gives A (two values) and never B (one value).
    tls = [_patient(f"p{i}", [_obs("A", 3.0, "mg", 0), _obs("A", 3.0, "mg", 1), _obs("B", 5.0, "mg", 2)])
           for i in range(6)]
    items = [Item("observation", LOINC, "A"), Item("observation", LOINC, "B")]
    bins, report = _release(tls, items, m=1, dp=True, epsilon=1000.0, delta=1e-6)
    assert set(bins) == {(LOINC, "A")}
    assert report["mechanism"] == \
        "discrete gaussian grid histograms of per-patient medians + thresholded unit counts"
    assert report["max_codes_per_patient"] == 1 and report["threshold"] == pytest.approx(
        1 + report["sigma"] * math.sqrt(2 * math.log(2 / 1e-6)))
    bins, _ = _release(tls, items, m=2, dp=True, epsilon=1000.0, delta=1e-6)
    assert set(bins) == {(LOINC, "A"), (LOINC, "B")}


def test_dp_needs_epsilon_and_delta():
    for eps, delta in ((None, 1e-6), (1.0, None)):
        with pytest.raises(ValueError, match=r"^release_value_bins with dp=True needs epsilon and delta$"):
            _release(_cohort(3, "A", "mg", 3.0), [Item("observation", LOINC, "A")], dp=True, epsilon=eps,
                     delta=delta)


def test_a_unit_at_exactly_the_threshold_is_released_and_ties_go_to_the_first_unit():
    # two patients in mg, two in mmol: both at min_count 2; the tie goes to the unit first in order ("mg")
    tls = _cohort(2, "A", "mg", 3.0) + _cohort(2, "A", "mmol", 3.0)
    bins, _ = _release(tls, [Item("observation", LOINC, "A")], min_count=2)
    assert bins[(LOINC, "A")].unit == "mg"


def test_a_value_in_the_top_cell_is_counted():
    bins, _ = _release(_cohort(4, "A", "cells", 2e6), [Item("observation", LOINC, "A")])
    assert bins[(LOINC, "A")].edges[-1] == _round_sig(float(GRID[-1]))
