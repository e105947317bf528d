"""Public code lists (mappings/public-codes.toml) enter the vocabulary for free and replace the data's strings."""

from __future__ import annotations

from datetime import datetime, timezone

from test_model_helpers import make_timelines

from fhirsynth.model.bins import load_value_bins
from fhirsynth.model.config import TokenizerConfig
from fhirsynth.model.dpnoise import NoiseSource
from fhirsynth.model.tokenizer import Tokenizer
from fhirsynth.model.vocab import (
    ItemMatcher,
    Vocab,
    load_public_codes,
    public_items,
    select_items,
)
from fhirsynth.timeline.types import Event

SNOMED = "http://snomed.info/sct"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


def test_public_lists_load_and_cover_visits_and_conditions():
    codes = load_public_codes()
    assert (ACT, "AMB") in codes["encounter_class"] and (ACT, "EMER") in codes["encounter_class"]
    assert (SNOMED, "44054006") in codes["condition"]
    assert (SNOMED, "162673000") in codes["encounter_type"]


def test_public_items_survive_a_threshold_no_cohort_can_pass():
    vb, panels = load_value_bins()
    codes = load_public_codes()
    pub = public_items(vb, panels, codes)
    tls = make_timelines(30, seed=3)
    sel = select_items(tls, matcher=ItemMatcher(vb, panels, codes), public=pub, k=4, max_items=100, dp=True,
                       epsilon=0.1, delta=1e-6, min_count=2, noise=NoiseSource.reproducible(0))
    assert sel.report["selected_items"] == 0  # nothing private passes the threshold ...
    kinds = {i.kind for i in sel.items}
    assert {"encounter", "condition", "value", "observation"} <= kinds  # ... yet visits and diagnoses exist
    assert len({i.key for i in sel.items}) == len(sel.items)  # public items are never counted twice


def test_encoding_uses_the_public_display_not_the_data_display():
    vb, panels = load_value_bins()
    codes = load_public_codes()
    vocab = Vocab(TokenizerConfig(), public_items(vb, panels, codes), vb)
    tok = Tokenizer(vocab)
    t = datetime(2020, 1, 1, tzinfo=timezone.utc)
    ev = Event(time=t, kind="condition", system=SNOMED, code="44054006", display="a hospital's own wording",
               category="problem-list-item")
    key = tok.matcher.event_key(ev)
    assert key is not None and vocab.item_token(key) is not None
    assert key[3] == codes["condition"][(SNOMED, "44054006")]
    enc = Event(time=t, kind="encounter", system=ACT, code="AMB", display="local", value_system=SNOMED,
                value_code="185349003", value_display="local type")
    assert vocab.item_token(tok.matcher.event_key(enc)) is not None
    assert vocab.item_token(tok.matcher.value_key(enc)) is not None
    unknown = Event(time=t, kind="condition", system=SNOMED, code="999999999", display="rare")
    assert vocab.item_token(tok.matcher.event_key(unknown)) is None
