"""DP value bins for numeric observation codes without a public reference range (fhirsynth.model.dpbins)."""

from __future__ import annotations

import random
from collections import Counter
from datetime import datetime, timezone

import numpy as np
import torch
from test_model_helpers import LOINC, make_timelines

from fhirsynth.model.bins import load_value_bins
from fhirsynth.model.config import TokenizerConfig
from fhirsynth.model.dpbins import (
    GRID,
    N_BINS,
    patient_contributions,
    release_value_bins,
)
from fhirsynth.model.dpnoise import NoiseSource
from fhirsynth.model.grammar import Grammar, replay
from fhirsynth.model.tokenizer import Tokenizer
from fhirsynth.model.train import pad_collate
from fhirsynth.model.vocab import Item, Vocab, build_vocab
from fhirsynth.timeline.types import Event, PatientInfo, Timeline

HCT = ("20570-8", "Hematocrit [Volume Fraction] of Blood")  # not in mappings/reference-ranges.toml
PAIN = ("59460-6", "Fall risk total [Morse Fall Scale]")


def _with_private_codes(n: int, seed: int):
    """Synthetic timelines where every visit also has a hematocrit (%, a few in a second unit) and a pain
    score (integers, many zeros): codes without public bins."""
    rng = random.Random(seed)
    tls = make_timelines(n, seed=seed)
    for tl in tls:
        base = rng.gauss(42, 4)
        for ev in [e for e in tl.events if e.kind == "encounter"]:
            unit = "%" if rng.random() < 0.9 else "L/L"
            value = base + rng.gauss(0, 1) if unit == "%" else (base + rng.gauss(0, 1)) / 100
            for code, disp, val, u in ((HCT[0], HCT[1], round(value, 2), unit),
                                       (PAIN[0], PAIN[1], float(rng.choice([0, 0, 0, 15, 25, 45, 70])), "{score}")):
                tl.events.append(Event(time=ev.time, kind="observation", system=LOINC, code=code, display=disp,
                                       value=val, unit=u, category="laboratory", encounter_id=ev.encounter_id,
                                       status="final"))
        tl.events.sort(key=lambda e: e.time)
    return tls


def _items() -> list[Item]:
    return [Item("observation", LOINC, c, d, "laboratory") for c, d in (HCT, PAIN)]


def test_public_codes_do_not_exist_in_the_reference_ranges():
    vb, _ = load_value_bins()
    assert (LOINC, HCT[0]) not in vb and (LOINC, PAIN[0]) not in vb


def test_each_patient_contributes_at_most_m_codes_one_value_each():
    tl = next(t for t in _with_private_codes(20, seed=3) if t.events)
    codes = {(LOINC, HCT[0]), (LOINC, PAIN[0])}
    assert len(patient_contributions(tl, codes, 2)) == 2
    one = patient_contributions(tl, codes, 1)
    assert len(one) == 1
    (value, unit), = one.values()
    assert isinstance(value, float) and unit in ("%", "L/L", "{score}")


def test_exact_bins_follow_the_data():
    tls = _with_private_codes(300, seed=1)
    bins, rep = release_value_bins(tls, _items(), public_codes=set(), m=16, dp=False, epsilon=None, delta=None,
                                   min_count=2, noise=NoiseSource.reproducible(0))
    hct = bins[(LOINC, HCT[0])]
    assert hct.unit == "%"  # the majority unit
    assert list(hct.edges) == sorted(set(hct.edges)) and 2 <= hct.n_bins <= N_BINS
    medians = np.array([v for tl in tls for (s, c), (v, u) in
                        patient_contributions(tl, {(LOINC, HCT[0])}, 16).items() if u == "%"])
    # the inner edges sit near the data's octiles (linear inside a 15%-wide grid cell: within a few %)
    inner = np.array(hct.edges[1:-1])
    octiles = np.quantile(medians, np.arange(1, N_BINS) / N_BINS)
    assert len(inner) == N_BINS - 1
    assert np.all(np.abs(inner - octiles) / octiles < 0.05), (inner, octiles)
    assert hct.edges[0] <= medians.min() and hct.edges[-1] >= np.quantile(medians, 0.99)
    # a score with many zeros: the range starts at 0, not at a negative grid edge
    pain = bins[(LOINC, PAIN[0])]
    assert pain.edges[0] == 0.0 and pain.edges[-1] >= 5
    assert rep["codes_with_bins"] == 2


def test_dp_release_thresholds_and_spends_its_budget():
    tls = _with_private_codes(300, seed=2)
    kw = dict(public_codes=set(), m=4, dp=True, delta=1e-5, min_count=2)
    # tiny epsilon: the unit threshold is far above 300 patients, nothing is released
    bins, rep = release_value_bins(tls, _items(), epsilon=0.01, noise=NoiseSource.reproducible(0), **kw)
    assert bins == {} and rep["threshold"] > 300 and rep["epsilon"] == 0.01
    # large epsilon: close to the exact release
    bins, rep = release_value_bins(tls, _items(), epsilon=20.0, noise=NoiseSource.reproducible(0), **kw)
    assert bins[(LOINC, HCT[0])].unit == "%"
    assert 35 < np.median(bins[(LOINC, HCT[0])].edges) < 50
    assert rep["sigma"] > 0 and rep["threshold"] > 1


def test_a_code_no_patient_has_values_for_gets_no_bins():
    tls = make_timelines(50, seed=4)
    bins, rep = release_value_bins(tls, _items(), public_codes=set(), m=8, dp=False, epsilon=None, delta=None,
                                   min_count=2, noise=NoiseSource.reproducible(0))
    assert bins == {} and rep["candidate_codes"] == 2


def test_values_of_private_codes_survive_the_round_trip():
    tls = _with_private_codes(80, seed=5)
    cfg = TokenizerConfig(max_len=512, reference_date="2026-01-01")
    vocab, rep = build_vocab(tls, cfg, dp=False, epsilon=None, delta=None, noise=NoiseSource.reproducible(0))
    assert rep["value_bins"]["codes_with_bins"] >= 2
    again = Vocab.from_json(cfg, vocab.to_json())
    assert again.private_value_bins == vocab.private_value_bins and again.size == vocab.size
    tok = Tokenizer(again)
    g = Grammar(again, None, cfg.max_len, torch.device("cpu"))
    stats: Counter = Counter()
    seqs = [tok.encode(t, stats) for t in tls]
    batch = pad_collate([torch.tensor(s) for s in seqs])
    draws = replay(g, batch, torch.Generator().manual_seed(0))
    hct = again.private_value_bins[(LOINC, HCT[0])]
    decoded = [e for i, s in enumerate(seqs) for e in tok.decode(s, draws[i].tolist(), f"p{i}").events
               if e.code == HCT[0]]
    valued = [e for e in decoded if e.value is not None]
    assert len(valued) >= 0.8 * len(decoded) and all(e.unit == "%" for e in valued)
    assert all(hct.edges[0] <= e.value <= hct.edges[-1] for e in valued)
    # the minority unit cannot be binned in "%": counted, not silently mixed in
    assert stats["values_unit_mismatch"] > 0


def test_grid_is_symmetric_and_increasing():
    assert np.all(np.diff(GRID) > 0) and np.allclose(GRID, -GRID[::-1])


def _one_value(pid: str, value: float, unit: str = "%") -> Timeline:
    ev = Event(time=datetime(2020, 1, 1, tzinfo=timezone.utc), kind="observation", system=LOINC, code=HCT[0],
               value=value, unit=unit, category="laboratory")
    return Timeline(PatientInfo(pid, sex="female"), [ev])


def test_each_patient_counts_once_toward_the_unit_and_the_grid_cell():
    """A patient adds exactly 1 to their unit's count and to their value's grid cell (the L2 sensitivity sqrt(2m)
    assumes it): at min_count 2, one patient releases no unit, and two patients in different cells no support."""
    items = [Item("observation", LOINC, HCT[0], HCT[1], "laboratory")]

    def release(tls):
        return release_value_bins(tls, items, public_codes=set(), m=1, dp=False, epsilon=None, delta=None,
                                  min_count=2, noise=NoiseSource.reproducible(0))[0]

    assert release([_one_value("a", 40.0)]) == {}  # one patient: the unit count 1 is below 2
    assert release([_one_value("a", 40.0), _one_value("b", 4.0)]) == {}  # unit count 2, but 1 per cell
    # the same cell twice, but in two units that each count 1: no unit is released
    assert release([_one_value("a", 40.0), _one_value("b", 40.1, "L/L")]) == {}
    both = release([_one_value("a", 40.0), _one_value("b", 40.1)])  # the same cell twice, one unit: released
    assert list(both) == [(LOINC, HCT[0])] and both[(LOINC, HCT[0])].unit == "%"


def test_a_numeric_code_without_released_bins_is_written_with_its_value_withheld(tmp_path):
    """A code recorded with numbers whose bins the DP release did not give (value kinds say quantity only): the
    decoder writes it with dataAbsentReason "masked", never with a value of another kind; the Observation is valid,
    ingest reads the reason back, and the evaluator counts it as withheld, not as a value-kind mismatch."""
    from fhirsynth.export.writer import write_export
    from fhirsynth.fhir.validate import validate_resource
    from fhirsynth.records_metrics import Records, compare
    from fhirsynth.timeline import adapter
    from fhirsynth.timeline.assembler import GeneratorInfo, assemble_patient
    from fhirsynth.timeline.io import read_timelines
    from fhirsynth.timeline.types import DATA_ABSENT_SYSTEM, VALUE_WITHHELD

    tls = _with_private_codes(80, seed=5)
    cfg = TokenizerConfig(max_len=512, reference_date="2026-01-01")
    vocab, _ = build_vocab(tls, cfg, dp=False, epsilon=None, delta=None, noise=NoiseSource.reproducible(0))
    hct = next(i for i, it in enumerate(vocab.items) if it.kind == "observation" and it.code == HCT[0])
    assert not vocab.value_withheld(hct)  # bins released: values drawn from them
    vocab.private_value_bins.pop((LOINC, HCT[0]))
    vocab.value_kinds = {**(vocab.value_kinds or {}), hct: ["quantity"]}
    assert vocab.value_withheld(hct)
    tok = Tokenizer(vocab)
    g = Grammar(vocab, None, cfg.max_len, torch.device("cpu"))
    seqs = [tok.encode(t) for t in tls]
    draws = replay(g, pad_collate([torch.tensor(s) for s in seqs]), torch.Generator().manual_seed(0))
    synth = [tok.decode(s, draws[i].tolist(), f"s{i}") for i, s in enumerate(seqs)]
    ours = [e for tl in synth for e in tl.events if e.code == HCT[0]]
    assert ours and all(e.value is None and (e.value_system, e.value_code) == (DATA_ABSENT_SYSTEM, VALUE_WITHHELD)
                        for e in ours)
    others = [e for tl in synth for e in tl.events if e.kind == "observation" and e.code != HCT[0]]
    assert not any(e.value_system == DATA_ABSENT_SYSTEM for e in others)
    gen = GeneratorInfo(model_hash="ab" * 32, epsilon=8.0, delta=1e-5, recorded="2026-01-02T03:04:05+00:00")
    res = [r for r in assemble_patient(next(t for t in synth if any(e.code == HCT[0] for e in t.events)),
                                       profile="us-core", seed=3, index=0, generator=gen)
           if r["resourceType"] == "Observation" and r["code"]["coding"][0]["code"] == HCT[0]]
    assert res and all(validate_resource(r) == [] for r in res)
    assert all("valueQuantity" not in r and r["dataAbsentReason"]["coding"][0]["code"] == "masked" for r in res)
    write_export(iter(synth), tmp_path / "export", fmt="ndjson", profile="us-core", seed=3, generator=gen)
    adapter.ingest([tmp_path / "export"], tmp_path / "t", mapping="us-core")
    back = [e for tl in read_timelines(tmp_path / "t") for e in tl.events if e.code == HCT[0]]
    assert len(back) == len(ours) and all(e.value_code == VALUE_WITHHELD for e in back)
    m = compare(Records(tls), Records(synth))
    assert m["value_withheld"] == len(ours) and m["value_kind_mismatch"] == 0
