"""The visit model: its representation keeps whole records, and its samples have the shape of real records
(value kinds per code, complete blood-pressure panels, visits inside the lifetime), trained or not."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import torch
from test_model_helpers import LOINC, make_timelines, tiny_model_dir

from fhirsynth.model.checkpoint import load_model
from fhirsynth.model.config import TokenizerConfig
from fhirsynth.model.dpnoise import NoiseSource
from fhirsynth.model.sampler import sample_timelines
from fhirsynth.model.scoring import sequence_nll
from fhirsynth.model.tokenizer import Tokenizer
from fhirsynth.model.visits import VisitCollate, VisitLayout, encode_visits, visit_tokens
from fhirsynth.model.vocab import build_vocab
from fhirsynth.timeline.io import read_timelines

torch.set_num_threads(1)
BP_PANEL = "85354-9"


@pytest.fixture(scope="module")
def visit_model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("visit") / "model", arch="visit")


def _vocab(timelines, max_len=4096):
    tk = TokenizerConfig(max_len=max_len, reference_date="2026-01-01")
    vocab, _ = build_vocab(timelines, tk, dp=False, epsilon=None, delta=None, noise=NoiseSource.reproducible(0))
    return vocab


def _round_trip(timelines, max_visits=10_000):
    """(patients whose visit encoding gives back their uncompressed token sequence with every repeat, patients,
    stats)."""
    vocab = _vocab(timelines)
    tok, layout = Tokenizer(vocab), VisitLayout(vocab)
    same = n = 0
    stats: Counter = Counter()
    for tl in timelines:
        full = tok.encode_with_days(tl, stats, compress=False, keep_repeats=True)
        p = encode_visits(tok, layout, tl, max_visits, stats)
        if p is None:
            continue
        n += 1
        same += visit_tokens(layout, p) == full[0]
    return same, n, stats


def test_visit_encoding_keeps_every_event_of_the_record():
    same, n, stats = _round_trip(make_timelines(60, seed=4))
    assert n == 60 and same == n
    assert stats["patients_compressed"] == 0  # no length compression: repeated vitals stay


@pytest.mark.parametrize("cohort", ["us", "es-ips"])
def test_visit_encoding_round_trips_the_shared_cohorts(shared_data, tmp_path, cohort):
    """Whole Synthea records (hundreds of visits, vitals at every one) of both locales, through the shared
    transaction / document bundles: every visit and entry survives the visit encoding."""
    from fhirsynth.timeline.adapter import ingest

    bundles = sorted((shared_data / cohort / "bundles").glob("*.json*"))[:12]
    ingest(bundles, tmp_path / "tl", mapping="ips" if cohort == "es-ips" else "us-core")
    tls = list(read_timelines(tmp_path / "tl"))
    same, n, stats = _round_trip(tls)
    assert n == len(tls) >= 10 and same == n, (same, n, dict(stats))


def test_a_long_record_keeps_its_newest_visits_and_no_end():
    tls = make_timelines(20, seed=2, n_visits=(30, 40))
    vocab = _vocab(tls)
    tok, layout = Tokenizer(vocab), VisitLayout(vocab)
    p = encode_visits(tok, layout, tls[0], 8, Counter())
    full = encode_visits(tok, layout, tls[0], 10_000, Counter())
    assert len(p.gap) == 8 and p.truncated and not full.truncated
    assert (p.gap == full.gap[:8]).all() and (p.age == full.age[:8]).all()  # newest first: the window is the newest
    batch = VisitCollate(layout)([(p, [])])
    assert int((batch["eg_tgt"][0] == 0).sum()) == 0  # no END target for a truncated record


def _events_by_visit(tl):
    visits: dict = {}
    for e in tl.events:
        visits.setdefault(e.encounter_id or e.time.date(), []).append(e)
    return visits


def test_samples_have_typed_values_complete_panels_and_lifetimes(visit_model):
    lm = load_model(visit_model, "cpu")
    v = lm.vocab
    layout = VisitLayout(v)
    binned = {(v.item_of(t).system, v.item_of(t).code): v.item_bins(v.item_of(t))
              for t in layout.content_tokens if v.item_bins(v.item_of(t)) is not None}
    visit_concepts = {(it.system, it.code) for it in v.items if it.kind == "value" and it.public}
    tls = list(sample_timelines(visit_model, 400, seed=7, batch_size=200, device="cpu"))
    n_obs = n_bp = 0
    for tl in tls:
        birth = tl.patient.birth_date
        end = tl.patient.death_date
        for e in tl.events:
            assert e.time.date() >= birth
            if end is not None:
                assert e.time <= end and (e.end_time is None or e.end_time <= end)
            if e.kind != "observation":
                continue
            n_obs += 1
            vb = binned.get((e.system, e.code))
            if vb is not None:  # a numeric code: always a quantity in its unit, inside its range, never coded
                assert e.value is not None and e.unit == vb.unit and e.value_code is None, e
                assert vb.edges[0] <= e.value <= vb.edges[-1]
            assert (e.value_system, e.value_code) not in visit_concepts, e  # no visit concept as a result
        for evs in _events_by_visit(tl).values():
            bp = {e.code for e in evs if e.panel_code == BP_PANEL}
            if bp:
                n_bp += 1
                assert bp == {"8480-6", "8462-4"}, bp  # both components or none
    assert n_obs > 1000 and n_bp > 50  # the untrained model really emits observations and panels


def test_visit_nll_scores_each_patient(visit_model):
    tls = make_timelines(9, seed=1)
    nll = sequence_nll(visit_model, tls, device="cpu")
    assert nll.shape == (9,) and np.isfinite(nll).all() and (nll > 0).all()
    # a patient without a birth date cannot be encoded: NaN, not a crash
    tls[0].patient.birth_date = None
    assert np.isnan(sequence_nll(visit_model, tls[:2], device="cpu")[0])


def test_training_reduces_the_visit_loss(tmp_path):
    """A few plain epochs on the random cohort: the per-visit NLL falls well below where it started, and samples
    take the cohort's shape (a vitals set with a blood-pressure panel at every visit)."""
    import json

    from fhirsynth.model.config import ModelConfig
    from fhirsynth.model.train import train_model
    from fhirsynth.timeline.io import write_timelines

    write_timelines(make_timelines(120, seed=5), tmp_path / "tl")
    mc = ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_visits=16, n_components=4)
    train_model(tmp_path / "tl", tmp_path / "m", dp=False, epochs=8, device="cpu", model_config=mc, batch_size=16,
                tokenizer_config=TokenizerConfig(reference_date="2026-01-01"))
    curve = json.loads((tmp_path / "m" / "training-curve.json").read_text())
    assert curve[-1]["loss"] < 0.5 * curve[0]["loss"], (curve[0], curve[-1])
    tls = list(sample_timelines(tmp_path / "m", 60, seed=1, device="cpu"))
    with_bp = [any(e.code == "8480-6" for e in evs) for tl in tls for evs in _events_by_visit(tl).values()]
    assert len(with_bp) > 100 and np.mean(with_bp) > 0.8
    assert all(any(e.system == LOINC for e in tl.events) for tl in tls if tl.events)


def _kinds_cohort(n: int):
    """Every patient has a heart rate with a quantity, a smoking status with a coded answer and a BMI percentile
    recorded without a value; one patient alone has a heart rate without a value."""
    from datetime import datetime, timezone

    from fhirsynth.timeline.types import Event, PatientInfo, Timeline

    out = []
    for i in range(n):
        t = datetime(2020, 1, 1 + i % 28, tzinfo=timezone.utc)
        evs = [Event(time=t, kind="observation", system=LOINC, code="8867-4", value=70.0, unit="/min",
                     category="vital-signs"),
               Event(time=t, kind="observation", system=LOINC, code="72166-2", display="Tobacco smoking status",
                     value_system="http://snomed.info/sct", value_code="266919005", value_display="Never smoked",
                     category="social-history"),
               Event(time=t, kind="observation", system=LOINC, code="59576-9", display="BMI percentile",
                     category="vital-signs")]
        evs.append(Event(time=t, kind="observation", system=LOINC, code="1988-5", display="C reactive protein",
                         value=float(i % 9) + 0.5, unit="mg/L", category="laboratory"))
        if i == 0:
            evs.append(Event(time=t, kind="observation", system=LOINC, code="8867-4", category="vital-signs"))
        out.append(Timeline(PatientInfo(f"p{i}", sex="female", birth_date=datetime(1980, 1, 1).date()), evs))
    return out


@pytest.mark.parametrize("dp", [False, True])
def test_value_kinds_are_released_per_code(dp):
    from fhirsynth.model.valuekinds import release_value_kinds

    tls = _kinds_cohort(400)
    tk = TokenizerConfig(reference_date="2026-01-01")
    vocab, _ = build_vocab(tls, tk, dp=dp, epsilon=4.0 if dp else None, delta=1e-6 if dp else None,
                           noise=NoiseSource.reproducible(1))
    kinds = {vocab.items[i].code: k for i, k in vocab.value_kinds.items()}
    assert kinds["8867-4"] == ["quantity"]  # one patient without a value is not a kind of the code
    assert kinds["72166-2"] == ["coded"]
    assert kinds["59576-9"] == ["none"]  # the data records it without a value: no made-up quantity
    layout = VisitLayout(vocab)
    j = {vocab.item_of(t).code: layout.content_index[t] for t in layout.content_tokens}
    assert not layout.allowed[j["59576-9"], 1:].any() and layout.allowed[j["59576-9"], 0]
    assert not layout.allowed[j["8867-4"], 0]
    assert kinds["1988-5"] == ["quantity"]
    item = {it.code: i for i, it in enumerate(vocab.items) if it.kind == "observation"}
    assert vocab.value_withheld(item["1988-5"]) == ((LOINC, "1988-5") not in vocab.private_value_bins)
    # without value bins for it (none released), a numeric code is sampled with its value withheld, never with a
    # value of another kind
    vocab.private_value_bins.pop((LOINC, "1988-5"), None)
    bare = VisitLayout(vocab)
    assert vocab.value_withheld(item["1988-5"]) and not vocab.value_withheld(item["8867-4"])
    assert bare.allowed[j["1988-5"]].tolist() == [True] + [False] * (bare.n_values - 1)
    if dp:  # a real release: secret noise by default, the mechanism in the report
        _, rep = release_value_kinds(tls, vocab, k=8, dp=True, epsilon=1.0, delta=1e-6,
                                     noise=NoiseSource.reproducible(2))
        assert rep["sigma"] > 0 and rep["epsilon"] == 1.0


def test_codes_under_the_kinds_floor_take_public_knowledge_before_noise():
    """A cohort so small that no count should clear the floor (the es-ips case): a code with value bins gets a
    quantity, never what the noise happens to favour; a public prior's kinds come first; a code with neither gets
    none or coded, or, when the noise alone puts its quantity count a noise SD ahead, a quantity without bins (it
    is then never sampled): rarely. (A pure-noise count clears the 3-sigma floor with probability 0.13%: the few
    cells that do keep their released kinds, so the checks count violations.)"""
    from fhirsynth.model.valuekinds import release_value_kinds

    tls = _kinds_cohort(12)
    vocab, _ = build_vocab(tls, TokenizerConfig(reference_date="2026-01-01"), dp=False, epsilon=None, delta=None,
                           noise=NoiseSource.reproducible(1))
    obs = [i for i, it in enumerate(vocab.items) if it.kind == "observation"]
    with_bins = [i for i in obs if vocab.item_bins(vocab.items[i]) is not None]
    smoking = next(i for i in obs if vocab.items[i].code == "72166-2")
    heart = next(i for i in obs if vocab.items[i].code == "8867-4" and vocab.items[i].panel_code is None)
    assert smoking not in with_bins and heart in with_bins
    prior = {vocab.items[smoking].key: ["coded"], vocab.items[heart].key: ["quantity", "none"]}
    bad_bins = bad_prior = checks = withheld = 0
    for draw in range(10):  # sigma about 30, the floor about 90: far above 12 patients, every count is noise
        kinds, rep = release_value_kinds(tls, vocab, k=8, dp=True, epsilon=0.5, delta=1e-6,
                                         noise=NoiseSource.reproducible(draw))
        bad_bins += sum(kinds[i] != ["quantity"] for i in with_bins)
        checks += len(with_bins)
        assert kinds[smoking] in (["none"], ["coded"], ["none", "coded"], ["quantity"])
        withheld += kinds[smoking] == ["quantity"]
        with_prior, rep_p = release_value_kinds(tls, vocab, k=8, dp=True, epsilon=0.5, delta=1e-6,
                                                noise=NoiseSource.reproducible(draw), prior_kinds=prior)
        bad_prior += (with_prior[smoking] != ["coded"]) + (with_prior[heart] != ["quantity", "none"])
        assert rep_p["codes_under_the_floor"].get("prior", 0) >= 1
    assert bad_bins <= 0.02 * checks and bad_prior <= 1 and withheld <= 3, (bad_bins, checks, bad_prior, withheld)


def test_a_numeric_code_under_the_floor_without_bins_is_withheld_not_written_as_none():
    """70 patients with a private lab recorded with numbers (C reactive protein), its bins not released, and a
    noise SD of about 30 (the floor about 90): when the quantity count leads none and coded by a noise SD, the
    code gets "quantity" (its value then withheld, test_dpbins.py), where the larger of none and coded
    would have written a numeric lab as one recorded without a value (US at epsilon 8: five specific-IgE codes,
    524 observations)."""
    from fhirsynth.model import valuekinds as vk

    tls = _kinds_cohort(70)
    vocab, _ = build_vocab(tls, TokenizerConfig(reference_date="2026-01-01"), dp=False, epsilon=None, delta=None,
                           noise=NoiseSource.reproducible(1))
    vocab.private_value_bins.pop((LOINC, "1988-5"), None)
    crp = next(i for i, it in enumerate(vocab.items) if it.kind == "observation" and it.code == "1988-5")
    assert vocab.item_bins(vocab.items[crp]) is None
    got = []
    for draw in range(20):
        kinds, rep = vk.release_value_kinds(tls, vocab, k=8, dp=True, epsilon=0.5, delta=1e-6,
                                            noise=NoiseSource.reproducible(draw))
        got.append(kinds[crp])
    assert sum(k == ["quantity"] for k in got) >= 14, got
    assert all(k == ["quantity"] or "quantity" not in k for k in got)


def test_an_empty_first_poisson_batch_is_a_noise_only_step():
    """Opacus builds the first batch, when it is empty, from the shapes and dtypes of the dataset's first item;
    the visit model's batches then still give a zero-size loss, not a crash (a DP step with noise only)."""
    from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty

    from fhirsynth.model.archs import build_arch
    from fhirsynth.model.config import ModelConfig

    tls = make_timelines(12, seed=3)
    mc = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, max_visits=8, n_components=2)
    arch = build_arch(mc, _vocab(tls), tls, Counter())
    first = arch.dataset[0]
    collate = wrap_collate_with_empty(collate_fn=arch.collate, sample_empty_shapes=[[0, *shape_safe(x)] for x in first],
                                      dtypes=[dtype_safe(x) for x in first])
    empty = arch.to_device(collate([]), torch.device("cpu"))
    per, units = arch.loss(arch.model, empty)
    assert per.shape == (0,) and units == 0
    full = arch.to_device(collate([arch.dataset[i] for i in range(4)]), torch.device("cpu"))
    per, units = arch.loss(arch.model, full)
    assert per.shape == (4,) and bool(torch.isfinite(per).all()) and units > 4


def test_the_entry_weight_scales_the_repeat_and_lead_terms_of_the_training_loss():
    """arch.loss (what training minimises) is the sum of loss_terms over max_visits, the repeat and lead terms
    times entry_weight; 0 drops them, and a patient with entries has non-zero repeat and lead terms to drop."""
    from fhirsynth.model.archs import build_arch
    from fhirsynth.model.config import ModelConfig
    from fhirsynth.model.visitmodel import ENTRY_TERMS
    from fhirsynth.model.visits import VisitLayout

    tls = make_timelines(6, seed=4)
    for weight in (1.0, 0.25, 0.0):
        mc = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, max_visits=8, n_components=2)
        torch.manual_seed(0)
        arch = build_arch(mc, _vocab(tls), tls, Counter(), entry_weight=weight)
        batch = arch.to_device(arch.collate([arch.dataset[i] for i in range(4)]), torch.device("cpu"))
        per, _ = arch.loss(arch.model, batch)
        terms = arch.model.loss_terms(**batch, allowed=torch.as_tensor(VisitLayout(_vocab(tls)).allowed))
        assert all(bool((terms[k] > 0).all()) for k in ENTRY_TERMS)
        want = sum(t * (weight if k in ENTRY_TERMS else 1.0) for k, t in terms.items()) / mc.max_visits
        assert torch.allclose(per, want)


def test_decoded_visit_times_stay_in_their_age_year():
    """The encode/decode ceiling places each visit inside its gap bucket AND its own age year (a feasible interval
    per visit, visits.visit_time_draws), the birth inside its band and its age at the reference date: long
    records (60-120 visits) come back with their visits in the age years they had, on as many distinct days.
    Uniform in-bucket gap draws alone (grammar.replay without times) put 878 of these 1,119 visits into another
    age year."""
    from fhirsynth.model.bins import DAYS_PER_YEAR
    from fhirsynth.model.visits import decode_encoded

    tls = make_timelines(30, seed=5, n_visits=(60, 120))
    vocab = _vocab(tls)
    tok, layout = Tokenizer(vocab), VisitLayout(vocab)
    patients = [encode_visits(tok, layout, tl, 10_000, Counter()) for tl in tls]
    back = decode_encoded(tok, layout, patients, seed=3)
    assert len(back) == len(tls)
    ref = vocab.cfg.ref_date
    n_vis = same_year = real_days = days = 0
    for tl, p, rt in zip(tls, patients, back):
        age = lambda b: int(((ref - b).days + 1) // DAYS_PER_YEAR)  # noqa: E731
        assert age(rt.patient.birth_date) == age(tl.patient.birth_date)  # same age at the reference date
        starts = sorted({min(e.time for e in evs) for evs in _events_by_visit(rt).values()}, reverse=True)
        birth = datetime.combine(rt.patient.birth_date, datetime.min.time(), tzinfo=timezone.utc)
        if starts:  # inside the lifetime
            assert starts[0] <= datetime.combine(ref, datetime.min.time(), tzinfo=timezone.utc) + timedelta(days=1)
            assert starts[-1] >= birth
        for t, a in zip(starts, p.age.tolist()):
            same_year += int((t - birth).total_seconds() / 86400 // DAYS_PER_YEAR) == a
        n_vis += len(p.gap)
        real_days += len({min(e.time for e in evs).date() for evs in _events_by_visit(tl).values()})
        days += len({t.date() for t in starts})
    assert n_vis > 1000
    assert same_year >= 0.97 * n_vis, (same_year, n_vis)
    assert days >= 0.98 * real_days, (days, real_days)


def test_a_code_listed_alone_and_in_its_panel_gets_one_value_per_visit(visit_model):
    """Systolic pressure is a vocabulary item alone (public list) and as a blood-pressure panel member; in the data
    both carry the same value at a visit. The sampler draws it once: two unrelated values per visit broke every
    trajectory (lag-1 correlation ~0.05 against 0.84 real)."""
    from fhirsynth.model.visitsampler import same_code_items

    lm = load_model(visit_model, "cpu")
    layout = VisitLayout(lm.vocab)
    canon = same_code_items(layout)
    twins = [j for j in range(layout.NC) if canon[j] != j]
    assert any(lm.vocab.item_of(layout.content_tokens[j]).code == "8480-6" for j in twins)
    both = 0
    for tl in sample_timelines(visit_model, 300, seed=5, batch_size=150, device="cpu"):
        for key, evs in _events_by_visit(tl).items():
            if not isinstance(key, str):  # visits without an encounter share a day: one visit per encounter only
                continue
            for code in ("8480-6", "8462-4"):
                vals = [e.value for e in evs if e.code == code]
                if len(vals) > 1:
                    both += 1
                    assert len(set(vals)) == 1, (code, vals)
    assert both >= 3  # the untrained model really draws both items together (5 visits at seed 5)


def test_criticality_is_an_allergy_value_only():
    """An allergy's criticality (low / high / unable-to-assess) is a value item like an observation's coded answer
    or an encounter type; neither sampler may give it to an observation or an encounter."""
    from item_timelines import item_timelines

    from fhirsynth.model.grammar import ST_AALG, ST_AENC, ST_AOBS, Grammar
    from fhirsynth.timeline.types import CRITICALITY_SYSTEM

    v = _vocab(_kinds_cohort(200) + item_timelines(60, seed=1))
    layout = VisitLayout(v)
    crit = [t for t in layout.answer_tokens if v.item_of(t).system == CRITICALITY_SYSTEM]
    assert crit
    crit_vals = [layout.answer_value(layout.answer_index[t]) for t in crit]
    coded = [layout.content_index[t] for t in layout.content_tokens if v.item_of(t).code == "72166-2"]
    assert coded and layout.allowed[coded[0], 1 + layout.n_val: 1 + layout.n_val + layout.NA].any()
    for t in layout.content_tokens:
        if v.item_of(t).kind != "allergy":
            assert not layout.allowed[layout.content_index[t], crit_vals].any(), v.item_of(t)
    assert not layout.type_ok[[layout.type_index[t] for t in crit]].any() and layout.type_ok[0]
    g = Grammar(v, None, 4096, torch.device("cpu"))
    assert not g.allowed[ST_AOBS, crit].any() and not g.allowed[ST_AENC, crit].any()
    assert g.allowed[ST_AALG, crit].all()


def _infants(n: int, seed: int = 0):
    """Infants born up to three years before the reference date (2026-01-01), seen on a well-child schedule
    (0, 1, 2, 4, 6, 9, 12, 15, 18, 24, 30 months, a few days late), a weight at each visit."""
    import random

    from fhirsynth.timeline.types import Event, PatientInfo, Timeline
    from test_model_helpers import ACT, SNOMED

    rng = random.Random(seed)
    ref = datetime(2026, 1, 1, tzinfo=timezone.utc)
    out = []
    for i in range(n):
        birth = ref - timedelta(days=rng.randint(5, 3 * 365))
        evs = []
        for m in (0, 1, 2, 4, 6, 9, 12, 15, 18, 24, 30):
            t = birth + timedelta(days=round(m * 30.44) + rng.randint(0, 3), hours=9)
            if t >= ref:
                break
            eid = f"p{i}-{m}"
            evs += [Event(time=t, kind="encounter", system=ACT, code="AMB", value_system=SNOMED,
                          value_code="410620009", value_display="Well child visit", encounter_id=eid,
                          end_time=t + timedelta(minutes=30), status="finished"),
                    Event(time=t, kind="observation", system=LOINC, code="29463-7", value=3.5 + 0.4 * m, unit="kg",
                          category="vital-signs", encounter_id=eid, status="final")]
        out.append(Timeline(PatientInfo(f"p{i}", sex=rng.choice(["male", "female"]), birth_date=birth.date()),
                            evs).sorted())
    return out


def test_infant_visits_carry_their_week_or_month():
    """Under three years a visit's age enters the model in weeks and months (bins.early_age_id), from the exact
    days since birth of the encoding (tokenizer.encode_with_days), and the encode/decode ceiling places every
    infant visit back inside its own week or month; from three years on the early-age id is 0."""
    from fhirsynth.model.bins import EARLY_AGE_EDGES, early_age_id
    from fhirsynth.model.visits import decode_encoded

    tls = _infants(40, seed=2)
    vocab = _vocab(tls)
    tok, layout = Tokenizer(vocab), VisitLayout(vocab)
    patients = [encode_visits(tok, layout, tl, 10_000, Counter()) for tl in tls]
    n_vis = 0
    for tl, p in zip(tls, patients):
        birth = datetime.combine(tl.patient.birth_date, datetime.min.time(), tzinfo=timezone.utc)
        days = sorted({(e.time - birth).total_seconds() / 86400 for e in tl.events}, reverse=True)  # newest first
        assert p.early.tolist() == [early_age_id(d) for d in days]
        assert p.end_early == early_age_id((datetime(2026, 1, 2, tzinfo=timezone.utc) - birth).days)
        n_vis += len(days)
    assert n_vis > 150 and len({e for p in patients for e in p.early.tolist()}) >= 10
    back = decode_encoded(tok, layout, patients, seed=1)
    same = 0
    for rt, p in zip(back, patients):
        birth = datetime.combine(rt.patient.birth_date, datetime.min.time(), tzinfo=timezone.utc)
        starts = sorted({min(e.time for e in evs) for evs in _events_by_visit(rt).values()}, reverse=True)
        same += sum(early_age_id((t - birth).total_seconds() / 86400) == e for t, e in zip(starts, p.early.tolist()))
    assert same >= 0.97 * n_vis, (same, n_vis)
    # the week / month edges: the first week, half months to two months, months to three years
    assert EARLY_AGE_EDGES[:3] == (0.0, 7.0, pytest.approx(365.25 / 24)) and early_age_id(3 * 365.25) == 0


def test_the_sampler_reads_the_early_age_as_training_wrote_it(visit_model):
    """The sampler's batched early-age ids (exact draws in days since birth) equal bins.early_age_id, the
    function the training encoding uses, at every edge and between them."""
    from fhirsynth.model.bins import EARLY_AGE_EDGES, early_age_id
    from fhirsynth.model.grammar import Grammar
    from fhirsynth.model.visitsampler import VisitSampler

    lm = load_model(visit_model, "cpu")
    layout = VisitLayout(lm.vocab)
    sampler = VisitSampler(lm.model, layout, Grammar(lm.vocab, None, 64, torch.device("cpu")))
    days = sorted({0.0, 0.5, 2000.0, 40_000.0, *EARLY_AGE_EDGES, *(e - 1e-6 for e in EARLY_AGE_EDGES[1:]),
                   *(e + 0.3 for e in EARLY_AGE_EDGES)})
    got = sampler._early(torch.tensor(days, dtype=torch.float64)).tolist()
    assert got == [early_age_id(d) for d in days]
    assert len(set(got)) == len(EARLY_AGE_EDGES)  # 0 and every bucket


def test_the_static_position_reads_the_age_at_the_reference_date_as_in_training(visit_model):
    """Training gives the static position the age at the reference date (PatientVisits.end_age), for the
    deceased too; the sampler must feed the same, not the age at death (it did until the fourteenth session)."""
    from fhirsynth.model.bins import early_age_id
    from fhirsynth.model.constraints import load_constraints
    from fhirsynth.model.grammar import Grammar
    from fhirsynth.model.tokenizer import age_id
    from fhirsynth.model.visitsampler import VisitSampler

    lm = load_model(visit_model, "cpu")
    v = lm.vocab
    layout = VisitLayout(v)
    grammar = Grammar(v, load_constraints(), 64, torch.device("cpu"))
    sampler = VisitSampler(lm.model, layout, grammar)
    seen = []
    real = lm.model.time_embedding
    lm.model.time_embedding = lambda g, a, e: (seen.append((a.clone(), e.clone())), real(g, a, e))[1]
    toks, draws = sampler.generate(200, torch.Generator().manual_seed(4))
    ages, earlies = seen[0]
    dead = [len(t) > 5 and t[5] == v.DEATH for t in toks]
    assert sum(dead) >= 5
    for b, d in enumerate(draws):
        lived = grammar.ref_end - d[2]  # d[2]: the birth day number
        assert int(ages[b]) == age_id(lived) and int(earlies[b]) == early_age_id(lived)
    # the training side: the encoded end_age of a deceased patient is its age at the reference date
    tls = [tl for tl in make_timelines(60, seed=9) if tl.patient.death_date is not None]
    vocab = _vocab(tls)
    tok, lay = Tokenizer(vocab), VisitLayout(vocab)
    for tl in tls[:5]:
        p = encode_visits(tok, lay, tl, 10_000, Counter())
        ref_days = (datetime(2026, 1, 2) - datetime.combine(tl.patient.birth_date, datetime.min.time())).days
        assert p.dead and p.end_age == age_id(ref_days)
