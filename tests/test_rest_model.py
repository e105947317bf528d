"""The generator learns medications, immunizations, procedures and allergies as items of a visit (issue 18):
encoding keeps them, and samples of both architectures follow the event contract and the clinical constraints
(no vaccine before birth, nothing after death, courses that end inside the record)."""

from __future__ import annotations

import random
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
from test_model_helpers import SNOMED, make_timelines

from fhirsynth.model.archs import build_network, visit_sizes
from fhirsynth.model.checkpoint import write_model_dir
from fhirsynth.model.constraints import load_constraints
from fhirsynth.model.config import ModelConfig, TokenizerConfig, to_json, versions
from fhirsynth.model.dpnoise import NoiseSource
from fhirsynth.model.sampler import sample_timelines
from fhirsynth.model.tokenizer import Tokenizer
from fhirsynth.model.visits import VisitLayout, encode_visits, visit_tokens
from fhirsynth.model.vocab import build_vocab
from fhirsynth.timeline.types import CRITICALITY_SYSTEM, Event, Timeline

torch.set_num_threads(1)
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CVX = "http://hl7.org/fhir/sid/cvx"
DRUGS = {"44054006": ("860975", "metformin"), "59621000": ("197361", "amlodipine"),
         "444814009": ("308182", "amoxicillin")}
VACCINES = [("08", "Hep B"), ("140", "Influenza"), ("113", "Td")]
PROCS = [("430193006", "Medication reconciliation"), ("710824005", "Assessment of health")]
ALLERGIES = [("91935009", "Peanut", "food"), ("1191", "Aspirin", "medication")]


def with_rest(timelines: list[Timeline], seed: int = 0) -> list[Timeline]:
    """Synthea-like records plus the new kinds: a drug for each treatable condition (its reason, a course),
    vaccines at visits, procedures (some with a reason), one allergy with criticality for some patients."""
    rng = random.Random(seed)
    for tl in timelines:
        extra: list[Event] = []
        for ev in tl.events:
            if ev.kind == "condition" and ev.code in DRUGS:
                code, disp = DRUGS[ev.code]
                extra.append(Event(time=ev.time, kind="medication", system=RXNORM, code=code, display=disp,
                                   encounter_id=ev.encounter_id, status="active", value_system=SNOMED,
                                   value_code=ev.code, value_display=ev.display,
                                   end_time=ev.time + timedelta(days=rng.choice([10, 30, 90]))))
            if ev.kind == "encounter":
                if rng.random() < 0.4:
                    code, disp = rng.choice(VACCINES)
                    extra.append(Event(time=ev.time, kind="immunization", system=CVX, code=code, display=disp,
                                       encounter_id=ev.encounter_id, status="completed"))
                if rng.random() < 0.5:
                    code, disp = rng.choice(PROCS)
                    extra.append(Event(time=ev.time, kind="procedure", system=SNOMED, code=code, display=disp,
                                       encounter_id=ev.encounter_id, status="completed",
                                       value_display="dental_referral" if code == PROCS[1][0] else None))
        first = next((e for e in tl.events if e.kind == "encounter"), None)
        if first is not None and rng.random() < 0.5:
            code, disp, cat = rng.choice(ALLERGIES)
            extra.append(Event(time=first.time, kind="allergy", system=SNOMED, code=code, display=disp, category=cat,
                               encounter_id=first.encounter_id, status="active", value_system=CRITICALITY_SYSTEM,
                               value_code=rng.choice(["low", "high"])))
        tl.events.extend(extra)
        tl.sorted()
    return timelines


def _model_dir(path: Path, arch: str, n: int = 80, max_len: int = 256) -> Path:
    """An untrained model dir (random weights explore the grammar widely) over a vocabulary with the new kinds."""
    tk = TokenizerConfig(max_len=max_len, reference_date="2026-01-01")
    vocab, report = build_vocab(with_rest(make_timelines(n, 0)), tk, dp=False, epsilon=None, delta=None,
                                noise=NoiseSource.reproducible(0))
    mc = ModelConfig(arch=arch, vocab_size=vocab.size, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=max_len,
                     max_visits=24, n_components=3)
    if arch == "visit":
        mc.visit_sizes = visit_sizes(vocab)
    torch.manual_seed(0)
    model = build_network(mc)
    config = {**versions(), "model": to_json(mc), "tokenizer": to_json(tk), "training": {}}
    write_model_dir(path, state_dict=model.state_dict(), config=config, vocab=vocab.to_json(),
                    privacy={"unit": "patient", "dp": False, "vocabulary": report}, curve=[])
    return path


def test_visit_encoding_keeps_the_new_kinds() -> None:
    tls = with_rest(make_timelines(40, seed=3), seed=3)
    tk = TokenizerConfig(max_len=4096, reference_date="2026-01-01")
    vocab, _ = build_vocab(tls, tk, dp=False, epsilon=None, delta=None, noise=NoiseSource.reproducible(0))
    kinds = Counter(it.kind for it in vocab.items)
    assert all(kinds[k] > 0 for k in ("medication", "immunization", "procedure", "allergy")), kinds
    tok, layout = Tokenizer(vocab), VisitLayout(vocab)
    stats: Counter = Counter()
    for tl in tls:
        full = tok.encode_with_ages(tl, stats, compress=False)
        p = encode_visits(tok, layout, tl, 10_000, stats)
        assert visit_tokens(layout, p) == full[0]
    # a drug's reason, a course, a criticality survive encode -> decode
    tl = next(t for t in tls if any(e.kind == "medication" for e in t.events)
              and any(e.kind == "allergy" for e in t.events))
    toks = tok.encode(tl)
    back = tok.decode(toks, [float(i) for i in range(len(toks))], "p")
    meds = [e for e in back.events if e.kind == "medication"]
    assert meds and all(e.value_system == SNOMED and e.value_code in DRUGS for e in meds)
    assert all(DRUGS[e.value_code][0] == e.code for e in meds)  # each drug with its own indication
    assert all(e.end_time is not None and e.status == "completed" for e in meds)
    allergy = next(e for e in back.events if e.kind == "allergy")
    assert allergy.value_system == CRITICALITY_SYSTEM and allergy.value_code in ("low", "high")
    assert allergy.category in ("food", "medication") and allergy.status == "active"
    assert {e.kind: e.status for e in back.events if e.kind in ("immunization", "procedure")} == {
        "immunization": "completed", "procedure": "completed"}


@pytest.mark.parametrize("arch", ["visit", "token"])
def test_samples_of_the_new_kinds_follow_the_contract_and_constraints(tmp_path: Path, arch: str) -> None:
    model = _model_dir(tmp_path / "m", arch)
    tls = list(sample_timelines(model, 150, seed=5, batch_size=150, device="cpu"))
    kinds = Counter(e.kind for tl in tls for e in tl.events)
    assert all(kinds[k] > 0 for k in ("medication", "immunization", "procedure", "allergy")), kinds
    ref_end = datetime(2026, 1, 2, tzinfo=timezone.utc)
    limits = load_constraints().age_limits
    assert limits[(CVX, "113")][0] == 7 and limits[(CVX, "140")][0] == 0.5
    given: Counter = Counter()
    for tl in tls:
        birth = datetime.combine(tl.patient.birth_date, datetime.min.time(), tzinfo=timezone.utc)
        end = tl.patient.death_date or ref_end
        for e in tl.events:
            assert birth <= e.time <= end, (e.kind, e.time, birth, end)  # no vaccine before birth, none after death
            if e.end_time is not None:
                assert e.time <= e.end_time <= end, (e.kind, e.end_time, end)  # no medication after death
            if e.kind == "medication":
                assert e.system == RXNORM and e.status in ("active", "completed")
                assert e.value_code is None or e.value_code in DRUGS
                assert e.panel_code is None
            elif e.kind == "allergy":
                assert e.end_time is None and e.value_system in (None, CRITICALITY_SYSTEM)
                assert e.category in ("food", "medication")
            elif e.kind == "immunization":
                assert e.system == CVX and e.end_time is None and e.status == "completed"
                lo, hi = limits.get((CVX, e.code), (0.0, 130.0))  # the schedule's minimum age (constraints.toml)
                assert lo <= (e.time - birth).days / 365.25 < hi, (e.code, (e.time - birth).days / 365.25)
                given[e.code] += 1
    assert given["113"] and given["140"]  # the age-limited vaccines were drawn, inside their limits


def test_every_sampled_drug_has_its_indication_in_the_record(tmp_path: Path) -> None:
    """A drug drawn with a reason (metformin for diabetes, ...) finds that condition in its record at or before
    its start (reasons.py): an untrained model draws visit items independently, so without the closure most of
    its drugs would treat a disease the patient never had."""
    model = _model_dir(tmp_path / "m", "visit")
    tls = list(sample_timelines(model, 120, seed=3, batch_size=120, device="cpu"))
    n_drugs = 0
    for tl in tls:
        onsets: dict[str, datetime] = {}
        for e in tl.events:
            if e.kind == "condition":
                onsets[e.code] = min(onsets.get(e.code, e.time), e.time)
        for e in tl.events:
            if e.kind == "medication" and e.value_code is not None:
                n_drugs += 1
                assert e.value_code in onsets and onsets[e.value_code] <= e.time, (e.code, e.value_code)
    assert n_drugs > 30
