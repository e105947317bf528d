"""Random Synthea-like timelines for the model tests (no ingest needed), and checks of the generator itself."""

from __future__ import annotations

import random
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from fhirsynth.model.dpnoise import NoiseSource
from fhirsynth.timeline.io import TimelineWriter
from fhirsynth.timeline.types import Event, PatientInfo, Timeline

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONDITIONS = [
    ("44054006", "Diabetes mellitus type 2 (disorder)"),
    ("59621000", "Essential hypertension (disorder)"),
    ("444814009", "Viral sinusitis (disorder)"),
    ("195662009", "Acute viral pharyngitis (disorder)"),
    ("314529007", "Medication review due (situation)"),
]
FEMALE_ONLY = ("72892002", "Normal pregnancy (finding)")
MALE_ONLY = ("126906006", "Neoplasm of prostate (disorder)")
SMOKING = [("266919005", "Never smoked tobacco (finding)"), ("449868002", "Smokes tobacco daily (finding)")]
ENC_TYPES = [("185349003", "Encounter for check up"), ("50849002", "Emergency room admission")]



class CodeVocab:
    """The one attribute measurements.vocab_codes reads, `items`, built from (kind, system, code) triples or Items:
    a stand-in for a Vocab in tests of the measurements, calibration and repair (a real one needs a released
    cohort)."""

    def __init__(self, codes) -> None:
        from fhirsynth.model.vocab import Item

        self.items = [c if isinstance(c, Item) else Item(kind=c[0], system=c[1], code=c[2]) for c in codes]

def random_timeline(rng: random.Random, pid: str, *, n_visits: tuple[int, int] = (2, 12)) -> Timeline:
    sex = rng.choice(["male", "female"])
    birth = date(rng.randint(1930, 2015), rng.randint(1, 12), rng.randint(1, 28))
    info = PatientInfo(patient_id=pid, sex=sex, birth_date=birth,
                       race_code=rng.choice(["2106-3", "2054-5", "2028-9", None]),
                       ethnicity_code=rng.choice(["2135-2", "2186-5"]))
    t = datetime(birth.year, birth.month, birth.day, 9, tzinfo=timezone.utc) + timedelta(days=rng.randint(0, 60 * 365))
    end = datetime(2025, 12, 31, tzinfo=timezone.utc)
    events: list[Event] = []
    for v in range(rng.randint(*n_visits)):
        if t >= end:
            break
        eid = f"{pid}-e{v}"
        etype = rng.choice(ENC_TYPES)
        events.append(Event(time=t, kind="encounter", system=ACT, code=rng.choice(["AMB", "AMB", "EMER"]),
                            display=None, value_system=SNOMED, value_code=etype[0], value_display=etype[1],
                            encounter_id=eid, end_time=t + timedelta(minutes=rng.choice([15, 30, 60])),
                            status="finished"))
        age = (t.date() - birth).days / 365.25
        height = min(60 + age * 6, 175) + rng.gauss(0, 5)
        for code, value, unit in (("8302-2", height, "cm"), ("29463-7", height * 0.4 + rng.gauss(0, 5), "kg"),
                                  ("8867-4", rng.uniform(60, 100), "/min")):
            events.append(Event(time=t, kind="observation", system=LOINC, code=code, value=round(value, 1),
                                unit=unit, category="vital-signs", encounter_id=eid, status="final"))
        for code, value in (("8480-6", rng.gauss(120, 15)), ("8462-4", rng.gauss(80, 10))):
            events.append(Event(time=t, kind="observation", system=LOINC, code=code, value=round(value),
                                unit="mm[Hg]", category="vital-signs", encounter_id=eid, panel_system=LOINC,
                                panel_code="85354-9", panel_display="Blood pressure panel", status="final"))
        sm = rng.choice(SMOKING)
        events.append(Event(time=t, kind="observation", system=LOINC, code="72166-2",
                            display="Tobacco smoking status", value_system=SNOMED, value_code=sm[0],
                            value_display=sm[1], category="social-history", encounter_id=eid))
        if rng.random() < 0.5:
            code, disp = rng.choice(CONDITIONS)
            abate = t + timedelta(days=rng.randint(5, 40)) if rng.random() < 0.5 else None
            events.append(Event(time=t, kind="condition", system=SNOMED, code=code, display=disp,
                                category="encounter-diagnosis", encounter_id=eid, end_time=abate))
        if rng.random() < 0.2 and 18 <= age <= 45 and sex == "female":
            events.append(Event(time=t, kind="condition", system=SNOMED, code=FEMALE_ONLY[0],
                                display=FEMALE_ONLY[1], category="encounter-diagnosis", encounter_id=eid,
                                end_time=t + timedelta(days=270)))
        if rng.random() < 0.2 and age >= 50 and sex == "male":
            events.append(Event(time=t, kind="condition", system=SNOMED, code=MALE_ONLY[0], display=MALE_ONLY[1],
                                category="encounter-diagnosis", encounter_id=eid))
        t += timedelta(days=rng.choice([1, 30, 180, 365, 700]), hours=rng.randint(0, 5))
    if rng.random() < 0.15 and t < end:
        info.deceased = True
        info.death_date = t
    return Timeline(patient=info, events=events).sorted()


def make_timelines(n: int, seed: int = 0, **kw) -> list[Timeline]:
    rng = random.Random(seed)
    return [random_timeline(rng, f"real-{seed}-{i}", **kw) for i in range(n)]


def write_dir(path: Path, n: int, seed: int = 0, **kw) -> Path:
    with TimelineWriter(path) as w:
        for tl in make_timelines(n, seed, **kw):
            w.add(tl)
    return path


def test_generator_is_deterministic_and_sorted():
    a, b = make_timelines(5, seed=3), make_timelines(5, seed=3)
    assert [len(t.events) for t in a] == [len(t.events) for t in b]
    for tl in a:
        times = [e.time for e in tl.events]
        assert times == sorted(times)


def tiny_model_dir(path: Path, *, n_patients: int = 80, max_len: int = 64, seed: int = 0, d_model: int = 16,
                   reference_date: str = "2026-01-01", arch: str = "token") -> Path:
    """An UNTRAINED model dir (random weights, exact-count vocabulary) for sampler / constraint tests:
    near-uniform next-token distributions explore the grammar far more widely than a trained model.
    arch: "token" (transformer.py) or "visit" (visitmodel.py)."""
    import torch

    from fhirsynth.model.archs import build_network, visit_sizes
    from fhirsynth.model.checkpoint import write_model_dir
    from fhirsynth.model.config import ModelConfig, TokenizerConfig, to_json, versions
    from fhirsynth.model.vocab import build_vocab

    tk = TokenizerConfig(max_len=max_len, reference_date=reference_date)
    vocab, report = build_vocab(make_timelines(n_patients, seed), tk, dp=False, epsilon=None, delta=None,
                                noise=NoiseSource.reproducible(seed))
    mc = ModelConfig(arch=arch, vocab_size=vocab.size, d_model=d_model, n_layers=1, n_heads=2, d_ff=2 * d_model,
                     max_len=max_len, max_visits=24, n_components=3)
    if arch == "visit":
        mc.visit_sizes = visit_sizes(vocab)
    torch.manual_seed(seed)
    model = build_network(mc)
    config = {**versions(), "model": to_json(mc), "tokenizer": to_json(tk), "training": {}}
    write_model_dir(path, state_dict=model.state_dict(), config=config, vocab=vocab.to_json(),
                    privacy={"unit": "patient", "dp": False, "vocabulary": report}, curve=[])
    return path
