"""Sampler: determinism, 100% decodable output, every clinical constraint on thousands of samples,
conditioning, and model-dir validation. Uses an untrained tiny model: constraints must hold regardless."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone

import pytest
import torch
from test_model_helpers import SNOMED, tiny_model_dir

from fhirsynth.errors import ModelDirError, UsageError
from fhirsynth.model.checkpoint import load_model, model_hash, read_privacy_report
from fhirsynth.model.constraints import load_constraints
from fhirsynth.model.sampler import sample_timelines
from fhirsynth.model.scoring import sequence_nll

torch.set_num_threads(1)
REF_END = datetime(2026, 1, 2, tzinfo=timezone.utc)
_CONS = load_constraints()


@pytest.fixture(scope="module", params=["visit", "token"])
def model_dir(request, tmp_path_factory):
    """Both architectures: every constraint and conditioning rule holds for each."""
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", arch=request.param)


@pytest.fixture(scope="module")
def token_model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-token") / "model", arch="token")


def _age_days(tl, t):
    b = tl.patient.birth_date
    return (t - datetime(b.year, b.month, b.day, tzinfo=timezone.utc)).total_seconds() / 86400


def check_constraints(tl) -> list[str]:
    """Every rule of mappings/constraints.toml plus the structural ones; returns the violations."""
    cons = _CONS
    bad = []
    p = tl.patient
    if p.birth_date is None or p.sex is None:
        bad.append("missing demographics")
        return bad
    for e in tl.events:
        key = (e.system, e.code)
        only = cons.sex_only.get(key)
        if only is not None and p.sex != only:
            bad.append(f"{e.code} for a {p.sex} patient")
        lim = cons.age_limits.get(key)
        age = _age_days(tl, e.time) / 365.25
        if lim is not None and not lim[0] <= age < lim[1]:
            bad.append(f"{e.code} at age {age:.2f} outside {lim}")
        if age < 0:
            bad.append("event before birth")
        if e.end_time is not None and e.end_time < e.time:
            bad.append(f"{e.code}: abatement before onset")
        for t in (e.time, e.end_time):
            if t is None:
                continue
            if p.death_date is not None and t > p.death_date:
                bad.append(f"{e.kind} {e.code} after death")
            if t > REF_END:
                bad.append("event after the reference date")
        if e.value is not None:
            lo, hi, unit = cons.value_ranges[key]
            if not lo <= e.value <= hi or e.unit != unit:
                bad.append(f"{e.code} value {e.value} {e.unit} outside [{lo}, {hi}] {unit}")
    if p.death_date is not None and p.death_date > REF_END:
        bad.append("death after the reference date")
    return bad


def test_thousands_of_samples_decode_and_satisfy_every_constraint(model_dir):
    tls = list(sample_timelines(model_dir, 2000, seed=11, batch_size=500, device="cpu"))
    assert len(tls) == 2000
    problems = [(t.patient.patient_id, b) for t in tls for b in check_constraints(t)]
    assert problems == []
    # the untrained model really explores: constrained codes, deaths and values do occur
    codes = {e.code for t in tls for e in t.events}
    assert {"72892002", "126906006"} & codes
    assert any(t.patient.deceased for t in tls)
    assert any(e.value is not None for t in tls for e in t.events)
    assert all(t.patient.patient_id == f"syn-11-{i}" for i, t in enumerate(tls))


def test_sampling_is_deterministic_by_seed(model_dir):
    def fingerprint(seed):
        return [(t.patient.birth_date, t.patient.sex, [(e.time, e.code, e.value) for e in t.events])
                for t in sample_timelines(model_dir, 60, seed=seed, batch_size=32, device="cpu")]

    a, b, c = fingerprint(5), fingerprint(5), fingerprint(6)
    assert a == b
    assert a != c
    # two worker processes give exactly the same patients as one
    d = [(t.patient.birth_date, t.patient.sex, [(e.time, e.code, e.value) for e in t.events])
         for t in sample_timelines(model_dir, 60, seed=5, batch_size=32, device="cpu", workers=2)]
    assert d == a


def test_top_p_and_temperature_still_valid(model_dir):
    tls = list(sample_timelines(model_dir, 200, seed=2, temperature=0.7, top_p=0.9, device="cpu"))
    assert all(check_constraints(t) == [] for t in tls)


def test_conditioning_sex_age_condition(model_dir):
    tls = list(sample_timelines(model_dir, 150, seed=3, sex="female", age=(30, 45),
                                condition=(SNOMED, "72892002"), device="cpu"))
    assert len(tls) == 150
    for t in tls:
        assert t.patient.sex == "female"
        end = t.patient.death_date or REF_END
        age = int(_age_days(t, end) // 365.25)
        assert 30 <= age <= 45, age
        assert any(e.code == "72892002" for e in t.events)
        assert check_constraints(t) == []
    tls = list(sample_timelines(model_dir, 100, seed=3, sex="male", device="cpu"))
    assert all(t.patient.sex == "male" and not any(e.code == "72892002" for e in t.events) for t in tls)


def test_bad_sampling_arguments(model_dir):
    with pytest.raises(UsageError, match="--condition"):
        list(sample_timelines(model_dir, 1, condition=(SNOMED, "000000"), device="cpu"))
    with pytest.raises(UsageError, match="not allowed for sex male"):
        list(sample_timelines(model_dir, 1, sex="male", condition=(SNOMED, "72892002"), device="cpu"))
    with pytest.raises(UsageError, match="--sex"):
        list(sample_timelines(model_dir, 1, sex="x", device="cpu"))
    with pytest.raises(UsageError, match="--age"):
        list(sample_timelines(model_dir, 1, age=(50, 20), device="cpu"))


def test_model_dir_validation(model_dir, tmp_path):
    import shutil

    h = model_hash(model_dir)
    assert h == model_hash(model_dir) and len(h) == 64
    assert read_privacy_report(model_dir)["unit"] == "patient"
    bad = tmp_path / "corrupt"
    shutil.copytree(model_dir, bad)
    (bad / "model.pt").write_bytes(b"not a zip file at all")
    with pytest.raises(ModelDirError, match="corrupt"):
        load_model(bad, "cpu")
    assert model_hash(bad) != h
    other = tmp_path / "other-version"
    shutil.copytree(model_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["format_version"] = 999
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match="format version"):
        load_model(other, "cpu")
    with pytest.raises(ModelDirError, match="missing"):
        load_model(tmp_path, "cpu")


def test_sequence_nll_per_patient(token_model_dir):
    from test_model_helpers import make_timelines

    tls = make_timelines(7, seed=1)
    nll = sequence_nll(token_model_dir, tls, device="cpu")
    assert nll.shape == (7,)
    # an untrained model is close to uniform over the vocabulary
    import math

    v = load_model(token_model_dir, "cpu").vocab.size
    assert all(abs(x - math.log(v)) < 1.0 for x in nll)


def test_visits_count_back_from_the_end_of_the_record(token_model_dir):
    """Newest visit first: the first visit lies one sampled gap before the record's end (the death, else the end
    of the reference date), every later one one sampled gap before the previous, all inside their gap buckets
    and never before birth. Checked on the sampler's own draws for every sequence."""
    from fhirsynth.model.bins import GAP_EDGES
    from fhirsynth.model.grammar import Grammar
    from fhirsynth.model.sampler import generate
    from fhirsynth.model.tokenizer import day_number

    lm = load_model(token_model_dir, "cpu")
    v = lm.vocab
    g = Grammar(v, load_constraints(), lm.model_config.max_len, torch.device("cpu"))
    toks, draws = generate(lm.model, g, 400, torch.Generator().manual_seed(4))
    ref_end = day_number(REF_END.date())
    g0, _ = v.offsets["gap"]
    visits = deaths = 0
    for seq, drw in zip(toks.tolist(), draws.tolist()):
        birth = drw[2]  # the birth band's draw: the birth day number
        end = ref_end - birth
        for i, t in enumerate(seq):
            if t == v.DEATH:
                end = drw[i + 1]
                assert 0 <= end <= ref_end - birth
                deaths += 1
            elif v.group_of(t) == "gap":
                gap = end - drw[i]
                lo, hi = GAP_EDGES[t - g0], GAP_EDGES[t - g0 + 1]
                assert drw[i] >= 0 and lo - 1e-6 <= gap <= hi + 1e-6, (gap, lo, hi)
                end = drw[i]
                visits += 1
            elif t == v.END:
                break
    assert visits > 100 and deaths > 0


def test_sex_is_drawn_from_the_released_shares(model_dir, tmp_path):
    import json
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    vj = json.loads((d / "vocab.json").read_text())
    assert vj["sex_shares"] is not None  # written by training
    vj["sex_shares"] = [0.0, 1.0, 0.0, 0.0]
    (d / "vocab.json").write_text(json.dumps(vj))
    tls = list(sample_timelines(d, 200, seed=3, batch_size=100, device="cpu"))
    assert {t.patient.sex for t in tls} == {"female"}
    # forcing sex still wins over the shares
    tls = list(sample_timelines(d, 50, seed=3, sex="male", device="cpu"))
    assert {t.patient.sex for t in tls} == {"male"}


def test_codes_are_not_repeated_beyond_the_recent_visits(token_model_dir, tmp_path):
    """Compressed training sequences keep one occurrence of a code outside the RECENT_VISITS newest visits; the
    sampler holds every sequence to that. The model here always wants short visits and three favourite
    conditions, so without the mask nearly every old visit would repeat one of them."""
    import shutil

    from fhirsynth.model.grammar import Grammar
    from fhirsynth.model.sampler import generate
    from fhirsynth.model.tokenizer import RECENT_VISITS

    d = tmp_path / "repeater"
    shutil.copytree(token_model_dir, d)
    v = load_model(token_model_dir, "cpu").vocab
    sd = torch.load(d / "model.pt", weights_only=True)
    # constant final hidden state e_0; the head turns it into fixed logits: a new visit (its GAP tokens together
    # weigh e^4) and three conditions favoured
    sd["ln_f.weight"] = torch.zeros_like(sd["ln_f.weight"])
    sd["ln_f.bias"] = torch.zeros_like(sd["ln_f.bias"])
    sd["ln_f.bias"][0] = 1.0
    sd["head.weight"] = torch.zeros_like(sd["head.weight"])
    favourites = [v.start("item") + i for i, it in enumerate(v.items) if it.kind == "condition"][:3]
    g0, g1 = v.offsets["gap"]
    sd["head.weight"][g0:g1, 0] = 4.0 - math.log(g1 - g0)
    sd["head.weight"][favourites, 0] = 3.0
    sd["head.weight"][v.END, 0] = -20.0
    torch.save(sd, d / "model.pt")
    lm = load_model(d, "cpu")
    g = Grammar(v, load_constraints(), lm.model_config.max_len, torch.device("cpu"))
    toks, _ = generate(lm.model, g, 200, torch.Generator().manual_seed(8))
    repeats_recent = old_items = 0
    for seq in toks.tolist():
        seen: set[int] = set()
        n_visit = 0
        for t in seq:
            if t == v.END:
                break
            n_visit += v.group_of(t) == "gap"
            if v.group_of(t) != "item" or v.item_of(t).kind not in ("condition", "observation"):
                continue
            if n_visit > RECENT_VISITS:
                assert t not in seen, f"{v.describe(t)} repeated in visit {n_visit}"
                old_items += 1
            elif t in seen:
                repeats_recent += 1
            seen.add(t)
    assert old_items > 200 and repeats_recent > 50  # the recent visits do repeat codes


def test_death_is_drawn_from_the_released_shares_per_birth_band(model_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    vj = json.loads((d / "vocab.json").read_text())
    assert vj["death_shares"] is not None and len(vj["death_shares"]) == load_model(model_dir, "cpu").vocab.n_bands
    v = load_model(model_dir, "cpu").vocab
    # everyone born 1950-1954 dies, nobody else
    band = v.band_of_year(1952)
    vj["death_shares"] = [1.0 if b == band else 0.0 for b in range(v.n_bands)]
    (d / "vocab.json").write_text(json.dumps(vj))
    tls = list(sample_timelines(d, 400, seed=5, batch_size=200, device="cpu"))
    in_band = [t for t in tls if v.band_of_year(t.patient.birth_date.year) == band]
    others = [t for t in tls if v.band_of_year(t.patient.birth_date.year) != band]
    assert in_band and others
    assert all(t.patient.deceased for t in in_band)
    assert not any(t.patient.deceased for t in others)


def test_the_model_reads_the_age_of_its_own_draws(token_model_dir):
    """The age id fed beside each sampled token is the record's current age in whole years computed from the
    sampler's exact draws (the birth day, the death, each visit's time), unknown before the birth band, as the
    tokenizer gives it in training."""
    from fhirsynth.model.bins import DAYS_PER_YEAR
    from fhirsynth.model.grammar import Grammar
    from fhirsynth.model.sampler import generate
    from fhirsynth.model.tokenizer import AGE_UNKNOWN, day_number

    lm = load_model(token_model_dir, "cpu")
    v = lm.vocab
    g = Grammar(v, load_constraints(), lm.model_config.max_len, torch.device("cpu"))
    fed: dict[int, torch.Tensor] = {}
    real_step = lm.model.step

    def spy(tok, age, pos, cache):
        fed[pos] = age.clone()
        return real_step(tok, age, pos, cache)

    lm.model.step = spy
    ref_end = day_number(REF_END.date())
    visits = 0
    for seed in range(40):  # batches of 3 never shrink (finished rows leave in groups of >= 4)
        fed.clear()
        toks, draws = generate(lm.model, g, 3, torch.Generator().manual_seed(seed))
        for r, (seq, drw) in enumerate(zip(toks.tolist(), draws.tolist())):
            cur = None
            for i, t in enumerate(seq):
                if i not in fed:
                    break
                grp = v.group_of(t)
                if grp == "by":
                    cur = ref_end - drw[i]
                elif grp in ("age", "gap"):
                    cur = drw[i]
                    visits += grp == "gap"
                want = AGE_UNKNOWN if cur is None else min(int(cur // DAYS_PER_YEAR), AGE_UNKNOWN - 1)
                assert int(fed[i][r]) == want, (seed, r, i)
    assert visits > 40
