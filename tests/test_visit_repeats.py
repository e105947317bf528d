"""Repeats and leads within a visit (model format 7): an item written twice in one visit with the same value (the
shared US cohort writes a third of its visits' vitals twice: 13% of its events) survives the visit encoding, is
learnt as a count, and is sampled with its value on every copy; an entry dated before its visit's start (a
condition's onset before the encounter that records it) keeps that lead as a gap bucket."""

from __future__ import annotations

import dataclasses
from collections import Counter
from datetime import timedelta

import torch
from test_model_helpers import LOINC, make_timelines

from fhirsynth.model.bins import GAP_EDGES, REPEAT_EDGES, bucket_of, repeat_bucket
from fhirsynth.model.config import ModelConfig, TokenizerConfig
from fhirsynth.model.dpnoise import NoiseSource
from fhirsynth.model.sampler import sample_timelines
from fhirsynth.model.tokenizer import Tokenizer
from fhirsynth.model.visits import VisitCollate, VisitLayout, decode_encoded, encode_visits, visit_tokens
from fhirsynth.model.vocab import build_vocab

torch.set_num_threads(1)
WEIGHT, HEART_RATE = "29463-7", "8867-4"
LEAD_DAYS = 30.0


def _with_weight_twice(timelines):
    """Every body weight written a second time in its visit, same value (as the shared cohort does)."""
    for tl in timelines:
        extra = [dataclasses.replace(e, source_id=f"{e.source_id}-again") for e in tl.events if e.code == WEIGHT]
        tl.events.extend(extra)
        tl.events.sort(key=lambda e: e.time)
    return timelines


def _with_onsets_before_the_encounter(timelines):
    """Every condition's onset LEAD_DAYS before the encounter that records it."""
    for tl in timelines:
        for i, e in enumerate(tl.events):
            if e.kind == "condition" and e.encounter_id:
                tl.events[i] = dataclasses.replace(e, time=e.time - timedelta(days=LEAD_DAYS))
        tl.events.sort(key=lambda e: e.time)
    return timelines


def _leads(tl) -> dict[str, list[float]]:
    """Days before its encounter's start of every event in an encounter, by kind."""
    start = {e.encounter_id: e.time for e in tl.events if e.kind == "encounter"}
    out: dict[str, list[float]] = {}
    for e in tl.events:
        if e.kind != "encounter" and e.encounter_id in start:
            out.setdefault(e.kind, []).append((start[e.encounter_id] - e.time).total_seconds() / 86400)
    return out


def _by_visit(tl) -> dict:
    visits: dict = {}
    for e in tl.events:
        visits.setdefault(e.encounter_id or e.time.date(), []).append(e)
    return visits


def test_repeat_buckets_cover_every_count():
    assert [repeat_bucket(c) for c in (1, 2, 3, 4, 5, 6, 8, 9, 19, 500)] == [0, 1, 2, 3, 3, 4, 4, 5, 7, 7]
    assert repeat_bucket(REPEAT_EDGES[-1]) == len(REPEAT_EDGES) - 1


def test_the_visit_encoding_counts_repeats_and_decodes_every_copy():
    tls = _with_weight_twice(make_timelines(12, seed=3))
    tk = TokenizerConfig(reference_date="2026-01-01")
    vocab, _ = build_vocab(tls, tk, dp=False, epsilon=None, delta=None, noise=NoiseSource.reproducible(0))
    tok, layout = Tokenizer(vocab), VisitLayout(vocab)
    stats: Counter = Counter()
    patients = [encode_visits(tok, layout, tl, 10_000, stats) for tl in tls]
    weight_j = {layout.content_index[t] for t in layout.content_tokens if vocab.item_of(t).code == WEIGHT}
    counts = [c for p in patients for j, c in zip(p.item.tolist(), p.count.tolist()) if j in weight_j]
    others = [c for p in patients for j, c in zip(p.item.tolist(), p.count.tolist()) if j not in weight_j]
    assert counts and set(counts) == {2} and set(others) == {1}
    assert stats["repeats_in_visit_counted"] == len(counts) and stats["repeats_in_visit_dropped"] == 0
    # the token sequence written back holds both copies, and the decoder gives back every event
    assert all(visit_tokens(layout, p) == tok.encode_with_days(tl, Counter(), compress=False, keep_repeats=True)[0]
               for p, tl in zip(patients, tls))
    back = decode_encoded(tok, layout, patients)
    for tl, rt in zip(tls, back):
        assert Counter(e.code for e in rt.events) == Counter(e.code for e in tl.events)
    # a condition dated before its encounter keeps the lead's bucket; nothing else has one
    tls2 = _with_onsets_before_the_encounter(make_timelines(12, seed=3))
    patients2 = [encode_visits(tok, layout, tl, 10_000, Counter()) for tl in tls2]
    cond_j = {j for j in range(layout.NC) if layout.is_condition[j]}
    leads = Counter((int(j) in cond_j, int(b)) for p in patients2 for j, b in zip(p.item, p.lead))
    assert leads[(True, bucket_of(LEAD_DAYS, GAP_EDGES))] > 10 and leads[(True, 0)] == 0
    assert leads[(False, 0)] > 100 and sum(n for (c, b), n in leads.items() if not c and b) == 0
    lo, hi = GAP_EDGES[bucket_of(LEAD_DAYS, GAP_EDGES)], GAP_EDGES[bucket_of(LEAD_DAYS, GAP_EDGES) + 1]
    back: dict[str, list[float]] = {}
    for rt in decode_encoded(tok, layout, patients2):
        for kind, days in _leads(rt).items():
            back.setdefault(kind, []).extend(days)
    assert len(back["condition"]) > 10 and all(lo <= d < hi for d in back["condition"]), back["condition"]
    assert len(back["observation"]) > 100 and all(d == 0 for d in back["observation"])
    # the batch holds the count's bucket of every entry, beside its value
    batch = VisitCollate(layout)([(p, [[] for _ in p.gap]) for p in patients[:3]])
    m = len(patients[0].item)
    assert batch["vi_rep"][0, :m].tolist() == [repeat_bucket(c) for c in patients[0].count.tolist()]


def test_a_trained_model_writes_the_repeats_and_leads_the_data_has(tmp_path):
    """Trained without DP on a cohort whose every visit writes the weight twice and the heart rate once, and whose
    conditions begin LEAD_DAYS before their encounter: sampled visits write the weight twice (both copies with one
    value) and the heart rate once, and date their conditions about LEAD_DAYS before the encounter."""
    from fhirsynth.model.train import train_model
    from fhirsynth.timeline.io import write_timelines

    cohort = _with_onsets_before_the_encounter(_with_weight_twice(make_timelines(120, seed=5)))
    write_timelines(cohort, tmp_path / "tl")
    mc = ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_visits=16, n_components=4)
    train_model(tmp_path / "tl", tmp_path / "m", dp=False, epochs=12, device="cpu", model_config=mc, batch_size=16,
                tokenizer_config=TokenizerConfig(reference_date="2026-01-01"))
    twice = hr_twice = n_weight = n_hr = 0
    leads: dict[str, list[float]] = {}
    for tl in sample_timelines(tmp_path / "m", 60, seed=1, device="cpu"):
        for kind, days in _leads(tl).items():
            leads.setdefault(kind, []).extend(days)
        for key, evs in _by_visit(tl).items():
            if not isinstance(key, str):  # days without an encounter may merge: encounters only
                continue
            w = [e for e in evs if e.code == WEIGHT and e.system == LOINC]
            h = [e for e in evs if e.code == HEART_RATE and e.system == LOINC]
            if w:
                n_weight += 1
                twice += len(w) == 2
                assert len({e.value for e in w}) == 1, [e.value for e in w]  # the copies carry one value
            if h:
                n_hr += 1
                hr_twice += len(h) > 1
    assert n_weight > 100 and n_hr > 100
    assert twice / n_weight > 0.8, (twice, n_weight)  # 0.92 at seed 5
    assert hr_twice / n_hr < 0.1, (hr_twice, n_hr)
    near = [16 <= d < 45 for d in leads["condition"]]
    assert len(near) > 50 and sum(near) / len(near) > 0.7, (sum(near), len(near))  # 0.85 at seed 5
    assert sum(d > 0 for d in leads["observation"]) / len(leads["observation"]) < 0.08  # 0.034
