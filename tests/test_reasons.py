"""The closure that puts a drug's indication into its record (model/reasons.py), on hand-made visits: token ids
are small integers, 1xx drugs, 2xx conditions, 9 a duration value."""

from __future__ import annotations

from collections import Counter

from test_rest_model import _model_dir

from fhirsynth.model.checkpoint import load_model
from fhirsynth.model.reasons import close_reasons, reason_conditions
from fhirsynth.model.visits import VisitLayout

REASONS = {101: 201, 102: 202}  # drug -> its reason condition
DUR = 9


def _close(visits, allowed=lambda tok, day: True):
    stats: Counter = Counter()
    close_reasons(visits, REASONS, lambda t: t == DUR, allowed, stats)
    return stats


def test_the_condition_goes_into_the_oldest_visit_that_needs_it_with_the_course_duration():
    # newest first: the drug at day 300 and, older, at day 100 with a course duration ending on day 110
    visits = [([0, 101], [300.0, 0.0]), ([0, 7, 101, DUR], [100.0, 0.0, 0.0, 110.0])]
    stats = _close(visits)
    assert visits[1] == ([0, 7, 101, DUR, 201, DUR], [100.0, 0.0, 0.0, 110.0, 0.0, 110.0])
    assert visits[0] == ([0, 101], [300.0, 0.0])  # held from then on: once
    assert stats == Counter(reason_conditions_added=1)


def test_a_condition_held_before_the_drug_asks_for_nothing_and_a_later_one_does_not_count():
    held = [([0, 101], [300.0, 0.0]), ([0, 201], [50.0, 0.0])]
    assert _close(held) == Counter() and held[0] == ([0, 101], [300.0, 0.0])
    later = [([0, 202], [300.0, 0.0]), ([0, 102], [100.0, 0.0])]  # the onset after the drug's start
    _close(later)
    assert later[1] == ([0, 102, 202], [100.0, 0.0, 0.0])


def test_a_drug_whose_condition_is_not_allowed_is_removed_with_its_value():
    visits = [([0, 101, DUR, 102], [40.0, 0.0, 45.0, 0.0])]
    stats = _close(visits, allowed=lambda tok, day: tok != 201)
    assert visits == [([0, 102, 202], [40.0, 0.0, 0.0])]
    assert stats == Counter(reason_items_removed=1, reason_conditions_added=1)


def test_a_drug_without_a_known_reason_is_left_alone():
    visits = [([0, 150, DUR], [10.0, 0.0, 20.0])]
    assert _close(visits) == Counter() and visits == [([0, 150, DUR], [10.0, 0.0, 20.0])]


def test_reason_items_map_to_the_condition_item_of_their_code(tmp_path):
    """From a vocabulary: every drug item whose reason is a condition of the vocabulary maps to it."""
    lm = load_model(_model_dir(tmp_path / "m", "visit"), "cpu")
    layout = VisitLayout(lm.vocab)
    got = reason_conditions(layout)
    v = lm.vocab
    assert len(got) >= 3
    for drug, cond in got.items():
        d, c = v.item_of(drug), v.item_of(cond)
        assert d.kind in ("medication", "procedure") and c.kind == "condition"
        assert (d.panel_system, d.panel_code) == (c.system, c.code)
    drugs = {v.item_of(t).code for t in got}
    assert {"860975", "197361", "308182"} <= drugs
