"""Where a record begins (issue 14/15): the DP histogram of the age at the first event (measurements.first_age) and
the visit sampler's use of it. The DP model alone ended half of its US records decades after birth, where every
real (simulated) record starts at birth."""

from __future__ import annotations

import json
import shutil
import types
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
from test_model_helpers import make_timelines, tiny_model_dir

from fhirsynth.model import measurements as ms
from fhirsynth.model.bins import DAYS_PER_YEAR
from fhirsynth.model.checkpoint import load_model
from fhirsynth.model.dpnoise import NoiseSource
from fhirsynth.model.sampler import sample_timelines
from fhirsynth.model.visitsampler import VisitSampler
from fhirsynth.model.vocab import SEXES
from fhirsynth.timeline.types import Event, PatientInfo, Timeline

T0 = datetime(2000, 1, 1, tzinfo=timezone.utc)


def _patient(first_age_days: float | None, sex: str = "female", birth: date = date(2000, 1, 1)) -> Timeline:
    evs = [] if first_age_days is None else [
        Event(time=T0 + timedelta(days=first_age_days + d), kind="condition", system="http://snomed.info/sct",
              code="44054006") for d in (400, 0, 9000)]
    return Timeline(PatientInfo("p", sex=sex, birth_date=birth), evs)


def test_first_age_bucket_reads_the_earliest_visit():
    """Weeks and months under three years (the visit model's early ages), then years."""
    from fhirsynth.model.bins import early_age_id

    assert ms.first_age_bucket(_patient(0)) == 0
    assert ms.first_age_bucket(_patient(10)) == 1  # the second week
    assert ms.first_age_bucket(_patient(200)) == early_age_id(200) - 1  # the seventh month
    assert ms.first_age_bucket(_patient(3 * 365.25 + 1)) == ms.FIRST_AGE_EDGES.index(3)
    assert ms.first_age_bucket(_patient(70 * 365.25)) == len(ms.FIRST_AGE_EDGES) - 1
    assert ms.first_age_bucket(_patient(None)) is None
    assert ms.first_age_bucket(Timeline(PatientInfo("p", sex="male", birth_date=None), _patient(0).events)) is None


def test_a_finding_dated_at_birth_does_not_start_the_record_its_encounter_does():
    """A simulator records "Medication review due" with an onset at birth at the infant's first well-child
    encounter, weeks later (every us-full record): the record begins at that encounter, as the visit encoding
    places it; an event outside any encounter begins on its own day."""
    enc = [Event(time=T0 + timedelta(days=49, hours=8), kind="encounter", system="http://x", code="AMB",
                 encounter_id="e1"),
           Event(time=T0 + timedelta(hours=8), kind="condition", system="http://snomed.info/sct", code="314529007",
                 encounter_id="e1")]
    tl = Timeline(PatientInfo("p", sex="female", birth_date=date(2000, 1, 1)), enc)
    assert ms.first_visit_time(tl) == T0 + timedelta(days=49, hours=8)
    assert ms.first_age_bucket(tl) == ms.first_age_bucket(_patient(49))
    loose = Event(time=T0 + timedelta(days=20), kind="observation", system="http://loinc.org", code="8302-2")
    assert ms.first_visit_time(Timeline(tl.patient, enc + [loose])) == T0 + timedelta(days=20)


def test_first_age_query_is_one_count_in_the_patients_cell():
    spec = ms.Spec(codes=[("condition", "http://snomed.info/sct", "44054006")])
    for tl in (_patient(0), _patient(20 * 365.25, sex="male")):
        q = ms.patient_queries(tl, spec)["first_age"]
        assert q == [ms.cell_of(tl) * len(ms.FIRST_AGE_EDGES) + ms.first_age_bucket(tl)]
    assert ms.patient_queries(_patient(None), spec)["first_age"] == []
    assert spec.sizes()["first_age"] == ms.N_CELLS * len(ms.FIRST_AGE_EDGES)
    assert spec.sensitivities()["first_age"] == 1.0


def test_a_document_measured_before_the_family_still_loads(tmp_path):
    tls = make_timelines(30, 0)
    lm_vocab = load_model(tiny_model_dir(tmp_path / "m", arch="visit"), "cpu").vocab
    doc, _ = ms.measure(tls, lm_vocab, dp=True, epsilon=2.0, delta=1e-6, noise=NoiseSource.reproducible(1))
    assert len(doc["families"]["first_age"]["counts"]) == ms.N_CELLS * len(ms.FIRST_AGE_EDGES)
    old = json.loads(json.dumps(doc))
    del old["families"]["first_age"]
    del old["spec"]["first_age_edges"]
    (tmp_path / "m" / ms.MEASUREMENTS).write_text(json.dumps(old))
    loaded = ms.load(tmp_path / "m")
    assert ms.Spec.from_json(loaded["spec"]).sizes()["first_age"] == 0
    assert ms.first_age_prior(loaded) is None
    # a document with the family but missing counts is refused
    broken = json.loads(json.dumps(doc))
    del broken["families"]["first_age"]
    (tmp_path / "m" / ms.MEASUREMENTS).write_text(json.dumps(broken))
    with pytest.raises(Exception, match="unreadable measurements"):
        ms.load(tmp_path / "m")


def _first_age_doc(counts: np.ndarray, sigma: float = 7.0) -> dict:
    return {"families": {"first_age": {"counts": counts.ravel().tolist(), "sigma": sigma}}}


def test_first_age_prior_drops_counts_under_the_noise_floor_and_normalises():
    """Inside the cohort's support a cell keeps its counts above 2 noise SDs; a cell left with none takes the
    cohort's histogram over the support."""
    nb = len(ms.FIRST_AGE_EDGES)
    counts = np.zeros((ms.N_CELLS, nb))
    counts[0, 1], counts[0, 2], counts[0, 3] = 90, 10, 30  # 10 < 2 sigma: noise, dropped
    counts[1, 2] = -4  # a cell left with no mass: the cohort's histogram
    counts[2, 1], counts[2, 3] = 40, 40
    prior = ms.first_age_prior(_first_age_doc(counts))
    assert prior.shape == (ms.N_CELLS, nb)
    assert prior[0, 1] == pytest.approx(0.75) and prior[0, 3] == pytest.approx(0.25) and prior[0, 2] == 0
    assert prior[2, 1] == prior[2, 3] == 0.5
    cohort = np.clip(counts.sum(axis=0), 0, None)[1:4]
    assert prior[1, 1:4] == pytest.approx(cohort / cohort.sum()) and prior[1].sum() == pytest.approx(1.0)
    assert ms.first_age_prior({"families": {}}) is None and ms.first_age_prior(None) is None
    # no bucket window passes over the cohort: no constraint
    assert np.isnan(ms.first_age_prior(_first_age_doc(np.where(counts > 0, 20.0, 0.0)))).all()


def test_a_cells_count_outside_the_cohorts_support_is_read_as_noise():
    """A small cohort (es-ips: 120 patients in 8 cells): every record begins in the first two months, a handful
    per cell and bucket, none above a cell's floor; one cell's noise passes it at 2-3 years. The cohort's summed
    buckets show where records begin, and the noise there is dropped: no patient is drawn to begin at 2-3 years."""
    nb = len(ms.FIRST_AGE_EDGES)
    rng = np.random.default_rng(0)
    counts = rng.normal(0.0, 7.0, (ms.N_CELLS, nb))
    counts[:, 1:4] += 6.0  # ~18 records a cell in the first two months, spread over three buckets
    late = ms.FIRST_AGE_EDGES.index(3) - 6
    counts[5, late] = 16.0  # > 2 sigma: passed the old per-cell floor
    prior = ms.first_age_prior(_first_age_doc(counts))
    assert np.isfinite(prior).all()
    # all mass where records begin, or beside it (a window that passes keeps its buckets with a positive total)
    assert prior[:, :5].sum(axis=1) == pytest.approx(np.ones(ms.N_CELLS))
    assert prior[:, 1:4].sum(axis=1).min() > 0.9
    assert (prior[:, late] == 0).all()


def _with_first_age(model: Path, out: Path, bucket: int) -> Path:
    shutil.copytree(model, out)
    tls = make_timelines(40, 0)
    doc, _ = ms.measure(tls, load_model(out, "cpu").vocab, dp=False, epsilon=None, delta=None,
                        noise=NoiseSource.reproducible(0))
    counts = np.zeros((ms.N_CELLS, len(ms.FIRST_AGE_EDGES)), dtype=int)
    counts[:, bucket] = 50  # every cell: records begin in this bucket
    doc["families"]["first_age"]["counts"] = counts.ravel().tolist()
    (out / ms.MEASUREMENTS).write_text(json.dumps(doc))
    return out


def _first_ages(tls: list[Timeline]) -> list[tuple[float, int, list[float]]]:
    """(age in years at the first event, visits, the visits' ages) of every record with an event."""
    out = []
    for tl in tls:
        if not tl.events:
            continue
        birth = datetime.combine(tl.patient.birth_date, datetime.min.time(), tzinfo=timezone.utc)
        visits = {}
        for e in tl.events:  # a visit is at its encounter's start (a condition's onset may precede it)
            key = e.encounter_id or e.time.date()
            t = e.time if e.time.tzinfo else e.time.replace(tzinfo=timezone.utc)
            if e.kind == "encounter":
                visits[key] = (True, t)
            elif not visits.get(key, (False, None))[0]:
                visits[key] = (False, min(visits[key][1], t) if key in visits else t)
        visits = {k: t for k, (_, t) in visits.items()}
        # exact ages: whole days (timedelta.days) put a visit at 30 years (10957.5 days) at 29.9986
        ages = sorted((t - birth).total_seconds() / 86400 / 365.25 for t in visits.values())
        out.append((ages[0], len(visits), ages))
    return out


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("start") / "model", arch="visit", n_patients=120)


def test_records_do_not_end_before_the_drawn_start(untrained, tmp_path):
    """Bucket [0, 1): a record that did not hit the visit cap reaches back into the first year of life; without
    the histogram the same model ends most records far later."""
    model = _with_first_age(untrained, tmp_path / "m0", 0)
    cap = load_model(model, "cpu").model_config.max_visits
    with_prior = _first_ages(list(sample_timelines(model, 150, seed=3, batch_size=150, device="cpu",
                                                   record_start=True)))
    # on by default; turned off, the same model dir samples as it does without the histogram
    default = _first_ages(list(sample_timelines(model, 150, seed=3, batch_size=150, device="cpu")))
    assert default == with_prior
    plain = _first_ages(list(sample_timelines(model, 150, seed=3, batch_size=150, device="cpu",
                                              record_start=False)))
    without = _first_ages(list(sample_timelines(untrained, 150, seed=3, batch_size=150, device="cpu")))
    assert plain == without
    # records near the visit cap may have been cut by it (visits without an event or sharing an encounter count
    # once here)
    uncapped = [a for a, n, _ in with_prior if n < cap - 2]
    assert len(uncapped) >= 30
    assert all(a < 1.0 + 2 / 365.25 for a in uncapped)
    share = lambda rows: np.mean([a < 1.0 for a, _, _ in rows])  # noqa: E731
    assert share(with_prior) > share(without) + 0.2


def test_records_never_begin_before_the_lower_edge(untrained, tmp_path):
    """Bucket [30, 45): no visit lies before age 30 (a gap that would cross the edge is not drawn; its mass goes
    to END), and records do begin inside the bucket."""
    model = _with_first_age(untrained, tmp_path / "m30", ms.FIRST_AGE_EDGES.index(30))
    rows = _first_ages(list(sample_timelines(model, 150, seed=4, batch_size=150, device="cpu", record_start=True)))
    constrained = [ages for _, _, ages in rows if ages[-1] >= 30]  # younger ones: no bucket fits, no constraint
    assert len(constrained) >= 20
    assert all(ages[0] >= 30 - 1e-6 for ages in constrained)
    assert sum(ages[0] < 45 for ages in constrained) >= len(constrained) // 2
    # and the constraint bit: without it the same model draws several visits before 30 in some records
    free = _first_ages(list(sample_timelines(untrained, 150, seed=4, batch_size=150, device="cpu")))
    assert any(sum(age < 30 for age in ages) > 1 for _, _, ages in free if ages[-1] >= 30)


def test_generate_record_start_flag_reaches_the_sampler(untrained, tmp_path):
    from fhirsynth.cli import main

    model = _with_first_age(untrained, tmp_path / "m", 0)
    outs = {}
    for name, extra in (("plain", ["--no-record-start"]), ("start", ["--record-start"]), ("default", [])):
        rc = main(["-q", "generate", str(model), "-n", "40", "--seed", "2", "--no-calibrate", "--out",
                   str(tmp_path / name), *extra])
        assert rc == 0
        outs[name] = sorted((tmp_path / name).rglob("Observation*.ndjson"))
        assert outs[name]
    read = lambda files: b"".join(f.read_bytes() for f in files)  # noqa: E731
    assert read(outs["plain"]) != read(outs["start"])
    assert read(outs["default"]) == read(outs["start"])  # on by default


def test_the_sampler_draws_from_the_cell_measurements_counted_the_patient_in():
    """At the edges of the age bands (days // 365, as cell_of counts them) the sampler picks the same cell. Only
    one sex's cells hold a histogram, the one of band b only bucket b, so the bucket drawn names the band, and the
    other sex gets no constraint (an infinite upper edge)."""
    bands = len(ms.AGE_BANDS) + 1
    edges = [e * DAYS_PER_YEAR for e in ms.FIRST_AGE_EDGES]
    birth = date(1950, 1, 1)
    days = [d for edge in (18, 45, 65) for d in (edge * 365 - 1, edge * 365, edge * 365 + 12, edge * 365 + 14)]
    for held in ("female", "male"):
        first_age = torch.full((ms.N_CELLS, len(edges)), float("nan"), dtype=torch.float64)
        offset = 0 if held == "female" else bands
        first_age[offset:offset + bands] = torch.eye(bands, len(edges), dtype=torch.float64)
        sampler = types.SimpleNamespace(dev=torch.device("cpu"), first_age=first_age,
                                        first_lo=torch.tensor(edges, dtype=torch.float64),
                                        first_hi=torch.tensor(edges[1:] + [float("inf")], dtype=torch.float64))
        for sex in ("female", "male"):
            sexes = torch.full((len(days),), SEXES.index(sex), dtype=torch.long)
            hi, _ = VisitSampler._record_start(sampler, sexes, torch.tensor(days, dtype=torch.float64),
                                                torch.Generator().manual_seed(0))
            for d, h in zip(days, hi.tolist()):
                death = datetime.combine(birth + timedelta(days=d), datetime.min.time(), tzinfo=timezone.utc)
                cell = ms.cell_of(Timeline(PatientInfo("p", sex=sex, birth_date=birth, death_date=death), []))
                expected = edges[cell % bands + 1] if sex == held else float("inf")
                assert h == expected, (held, sex, d)


def test_end_takes_the_mass_of_the_gaps_that_no_longer_fit():
    """Where END may be drawn, a gap that no longer fits gives its probability to END, not to the short gaps that
    still fit (which piled visits up at a record's start); where it may not, the fitting gaps share everything."""
    from fhirsynth.model.visitsampler import _end_takes_lost_gaps

    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]]))
    mask = torch.tensor([[True, True, False, False], [False, True, True, False]])
    p = _end_takes_lost_gaps(logits, mask, temperature=1.0)
    assert p[0].tolist() == pytest.approx([0.1 + 0.3 + 0.4, 0.2, 0.0, 0.0])
    assert p[1].tolist() == pytest.approx([0.0, 0.2, 0.3, 0.0])  # _draw renormalises: 0.4 / 0.6


def _visits_in_first_week(tls: list[Timeline]) -> list[int]:
    return [sum(age < 7 / 365.25 for age in ages) for _, _, ages in _first_ages(tls)]


def test_without_a_start_histogram_records_do_not_pile_visits_onto_birth(untrained):
    """Newest first, a record that reaches its first days has room only for short gaps; renormalised over them, a
    model that wanted a longer one kept drawing visits there (half of a DP model's US pool had visits in the first
    week of life, up to 42; real records 0.6%). The mass of the gaps that no longer fit goes to END."""
    week = _visits_in_first_week(list(sample_timelines(untrained, 150, seed=5, batch_size=150, device="cpu",
                                                       record_start=False)))
    assert np.mean([w >= 2 for w in week]) < 0.05
    assert max(week) <= 3


def test_an_observation_is_never_moved_onto_the_birth_day_by_its_lead(untrained):
    """A lead (time before the visit) longer than the time since birth: a condition's onset is then at birth, an
    observation is taken at its visit. Clamped to birth, adult vitals were dated on the day of birth (2.9 to 50
    observations per patient at the birth instant; real records none)."""
    tls = list(sample_timelines(untrained, 150, seed=6, batch_size=150, device="cpu"))
    at_birth = conditions_at_birth = 0
    for tl in tls:
        birth = datetime.combine(tl.patient.birth_date, datetime.min.time(), tzinfo=timezone.utc)
        starts = {e.encounter_id: e.time for e in tl.events if e.kind == "encounter"}
        for e in tl.events:
            if e.time == birth and starts.get(e.encounter_id, birth) > birth:
                at_birth += e.kind == "observation"
                conditions_at_birth += e.kind == "condition"
    assert at_birth == 0
    assert conditions_at_birth > 0  # the untrained model's random leads do reach back to birth
