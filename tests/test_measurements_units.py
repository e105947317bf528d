"""measurements.py piece by piece (issue 21's mutation goals): the query each patient adds to, the sensitivities as
the tight bound of those contributions, the pair-code choice, the validation and the report of `measure`, and
what `load` accepts. Every expected value comes from the patients built here or from the module's public constants."""

from __future__ import annotations

import json
import logging
import math
from datetime import date, datetime, timedelta, timezone
from itertools import combinations

import numpy as np
import pytest
from test_model_helpers import CodeVocab

from fhirsynth.errors import ModelDirError
from fhirsynth.model import measurements as ms
from fhirsynth.model.dpnoise import NoiseSource
from fhirsynth.model.vocab import Item
from fhirsynth.timeline.types import Event, PatientInfo, Timeline

T0 = datetime(2020, 1, 1, tzinfo=timezone.utc)
A = ("condition", "http://snomed.info/sct", "1001")
B = ("condition", "http://snomed.info/sct", "1002")
C = ("observation", "http://loinc.org", "1003-1")


def tl(codes=(), *, sex="female", born: date | None = date(1970, 1, 1), times=None, death: datetime | None = None,
       deceased=False, encounters=True) -> Timeline:
    times = times or [T0] * len(codes)
    evs = [Event(time=t, kind=k, system=s, code=c, encounter_id=f"e{j}" if encounters else None)
           for j, ((k, s, c), t) in enumerate(zip(codes, times))]
    return Timeline(PatientInfo("p", sex=sex, birth_date=born, death_date=death, deceased=deceased), evs)


def band_of(age: int) -> int:
    return sum(age >= edge for edge in ms.AGE_BANDS)  # the documented bands: 0-17, 18-44, 45-64, 65+


# ---------------------------------------------------------------- cells, visits, buckets
def test_cells_are_sex_major_and_age_banded():
    per_band = len(ms.AGE_BANDS) + 1
    seen = []
    for sex in ("female", "male"):
        for age in (10, 30, 50, 70):
            cell = ms.cell_of(tl([A], sex=sex, born=date(2019 - age, 6, 1)))  # event on 2020-01-01
            assert cell // per_band == (0 if sex == "female" else 1)
            assert cell % per_band == band_of(age)
            seen.append(cell)
    assert sorted(seen) == list(range(ms.N_CELLS))  # 8 distinct cells
    # any sex but female (other, unknown, missing) is the second row
    for sex in ("other", "unknown", None):
        assert ms.cell_of(tl([A], sex=sex, born=date(1989, 6, 1))) == per_band + band_of(30)


def test_age_is_whole_years_of_365_days_at_death_else_at_the_last_event():
    born = date(2000, 1, 1)
    # 18 years (of 365 days) and 10 days: the 18-44 band, not 0-17 (366-day years or a left-sided edge would say 17)
    at_18 = datetime(2000, 1, 1, tzinfo=timezone.utc) + timedelta(days=18 * 365 + 10)
    assert ms.cell_of(tl([A], born=born, times=[at_18])) == band_of(18) == 1
    # the last event counts, not the first; events may mix naive (read as UTC) and aware times
    naive_old = datetime(2070, 6, 1)
    assert ms.cell_of(tl([A, B], born=born, times=[at_18, naive_old])) == band_of(70)
    assert ms.cell_of(tl([A, B], born=born, times=[naive_old, at_18])) == band_of(70)
    # death decides over the events (death at 50, events at 18)
    died = datetime(2050, 6, 1, tzinfo=timezone.utc)
    assert ms.cell_of(tl([A], born=born, times=[at_18], death=died)) == band_of(50)
    assert ms.cell_of(tl([], born=born, death=died)) == band_of(50)
    # no end (no event, no death) or no birth date: age 0
    assert ms.cell_of(tl([], born=born)) == 0
    assert ms.cell_of(tl([A], born=None, times=[naive_old])) == 0
    # a birth after the end is age 0, not negative
    assert ms.cell_of(tl([A], born=date(2030, 1, 1))) == 0


def test_utc_reads_naive_times_as_utc_and_keeps_aware_ones():
    naive = datetime(2020, 3, 1, 23, 30)
    assert ms._utc(naive) == naive.replace(tzinfo=timezone.utc) and ms._utc(naive).tzinfo is timezone.utc
    plus5 = datetime(2020, 3, 1, 2, 0, tzinfo=timezone(timedelta(hours=5)))
    assert ms._utc(plus5) is plus5


def test_visits_are_encounters_plus_days_without_one():
    day = timedelta(days=1)
    no_enc = tl([A, B, C], times=[T0, T0 + timedelta(hours=3), T0 + day], encounters=False)
    assert ms.n_visits(no_enc) == 2  # two calendar days
    with_enc = tl([A, B, C], times=[T0, T0, T0])  # three encounters on one day
    assert ms.n_visits(with_enc) == 3
    both = Timeline(with_enc.patient, with_enc.events + no_enc.events)
    assert ms.n_visits(both) == 5


def test_bucket_edges_start_their_bucket():
    edges = ms.BUCKET_EDGES
    for i, e in enumerate(edges):
        assert ms.bucket(e) == i
        if i + 1 < len(edges) and edges[i + 1] - 1 > e:
            assert ms.bucket(edges[i + 1] - 1) == i  # the last value of the bucket
    assert ms.bucket(edges[-1] * 4) == len(edges) - 1


def test_events_family_counts_condition_and_observation_events_only():
    codes = [A] * 5 + [("medication", "rx", "1"), ("encounter", "cls", "AMB"), ("procedure", "sct", "2")]
    spec = ms.Spec(codes=[A])
    q = ms.patient_queries(tl(codes, times=[T0 + timedelta(days=i) for i in range(len(codes))]), spec)
    assert q["events"] == [ms.bucket(5)] and ms.bucket(5) not in (ms.bucket(10), ms.bucket(3), ms.bucket(8))
    assert q["visits"] == [ms.bucket(len(codes))]


def test_vocab_codes_keep_clinical_codes_with_system_and_code_once():
    items = [Item(kind="condition", system="s", code="1"), Item(kind="medication", system="rx", code="9"),
             Item(kind="condition", system=None, code="2"), Item(kind="observation", system="l", code=None),
             Item(kind="encounter", system=None, code="AMB"), Item(kind="observation", system="l", code="3"),
             Item(kind="condition", system="s", code="1", display="again")]
    assert ms.vocab_codes(CodeVocab(items)) == [("condition", "s", "1"), ("medication", "rx", "9"),
                                             ("observation", "l", "3")]


# ---------------------------------------------------------------- sensitivities
def test_sensitivities_are_the_tight_bound_of_one_patients_contribution():
    codes = [("condition", "s", str(i)) for i in range(12)]
    spec = ms.Spec(codes=codes, max_codes=4, pair_codes=codes[:7], max_absent=5)
    patients = [tl([], deceased=True), tl(codes, death=T0), tl(codes[:3]), tl(codes[5:], sex="male"),
                tl(codes[2:9], born=None), tl([C])]
    norms = {f: max(math.sqrt(len(ms.patient_queries(p, spec)[f])) for p in patients) for f in spec.sizes()}
    sens = spec.sensitivities()
    assert set(sens) == set(spec.sizes())
    for f in sens:
        assert sens[f] == pytest.approx(norms[f]), f  # a bound (no patient exceeds it) that some patient reaches
    # a patient adds 1 to each of its queries and never to one query twice
    for p in patients:
        for f, idx in ms.patient_queries(p, spec).items():
            assert len(set(idx)) == len(idx) and all(0 <= i < spec.sizes()[f] for i in idx)


def test_pair_queries_are_the_pairs_of_the_first_absent_codes():
    codes = [("condition", "s", str(i)) for i in range(6)]
    spec = ms.Spec(codes=codes, pair_codes=codes[:6], max_absent=3)
    q = ms.patient_queries(tl([codes[1], codes[4]]), spec)  # lacks 0, 2, 3, 5: counts the first three
    assert q["pairs_absent"] == [spec.pair_of[p] for p in combinations([0, 2, 3], 2)]
    assert q["prevalence"] == [1, 4]
    cell = ms.cell_of(tl([codes[1]]))
    assert q["prevalence_cells"] == [cell * 6 + 1, cell * 6 + 4]


def test_spec_round_trips_and_refuses_other_bands():
    spec = ms.Spec(codes=[A, B, C], max_codes=7, pair_codes=[B, A], max_absent=4)
    back = ms.Spec.from_json(json.loads(json.dumps(spec.to_json())))
    assert (back.codes, back.max_codes, back.pair_codes, back.max_absent) == ([A, B, C], 7, [B, A], 4)
    assert back.pair_index == {B: 0, A: 1} and back.code_index == {A: 0, B: 1, C: 2}
    good = spec.to_json()
    for key, value in (("age_bands", [18, 40, 65]), ("bucket_edges", [0, 1, 2])):
        with pytest.raises(ValueError, match="^age bands or buckets differ from this fhirsynth's$"):
            ms.Spec.from_json({**good, key: value})
        missing = {k: v for k, v in good.items() if k != key}
        with pytest.raises(ValueError, match="^age bands or buckets differ from this fhirsynth's$"):
            ms.Spec.from_json(missing)


# ---------------------------------------------------------------- pair codes (post-processing of the release)
def _spec(n: int) -> ms.Spec:
    return ms.Spec(codes=[("condition", "s", str(i)) for i in range(n)])


def test_pair_codes_are_the_most_common_within_the_band():
    spec = _spec(6)
    cells = np.array([60, 40] + [0] * (ms.N_CELLS - 2))  # 100 patients
    # shares 0.04 (below), 0.05 (edge: in), 0.95 (edge: in), 0.96 (above), 0.50, 0.30
    prev = np.array([4, 5, 95, 96, 50, 30])
    codes = spec.codes
    assert ms.choose_pair_codes(spec, cells, prev, 10) == [codes[2], codes[4], codes[5], codes[1]]
    assert ms.choose_pair_codes(spec, cells, prev, 2) == [codes[2], codes[4]]  # the k most common
    # equal shares: vocabulary order
    assert ms.choose_pair_codes(spec, cells, np.array([0, 30, 0, 30, 0, 0]), 1) == [codes[1]]


def test_pair_codes_read_negative_noisy_counts_as_zero():
    spec = _spec(3)
    # noisy cells: a negative cell must not shrink the patient count (100, not 70)
    cells = np.array([100, -30] + [0] * (ms.N_CELLS - 2))
    assert ms.choose_pair_codes(spec, cells, np.array([4, 50, -3]), 5) == [spec.codes[1]]  # 4/70 would pass
    # 20 patients: a zero (or negative) prevalence is share 0, not 1/20 = 0.05
    cells = np.array([20] + [0] * (ms.N_CELLS - 1))
    assert ms.choose_pair_codes(spec, cells, np.array([0, 10, -2]), 5) == [spec.codes[1]]
    # no patients at all: the count is taken as 1, so a count of 1 is share 1 (above the band), 0 is share 0
    assert ms.choose_pair_codes(spec, np.zeros(ms.N_CELLS), np.array([1, 0, 1]), 5) == []


# ---------------------------------------------------------------- measure
def _cohort(n: int) -> list[Timeline]:
    rng = np.random.default_rng(5)
    out = []
    for i in range(n):
        codes = [C] + ([A] if rng.random() < 0.4 else []) + ([B] if rng.random() < 0.6 else [])
        out.append(tl(codes, sex="female" if i % 2 else "male", born=date(1940 + i % 70, 1, 1),
                      deceased=i % 4 == 0, times=[T0 + timedelta(days=d) for d in range(len(codes))]))
    return out


def test_exact_measure_releases_integer_counts_and_its_parameters(caplog):
    tls = _cohort(60)
    caplog.set_level(logging.INFO, logger="fhirsynth.model.measurements")
    doc, rep = ms.measure(tls, CodeVocab([A, B, C]), dp=False, epsilon=None, delta=None,
                          noise=NoiseSource.reproducible(1), max_codes=2, pair_codes=1, max_absent=3)
    assert doc["dp"] is False and doc["format"] == ms.FORMAT
    assert rep == {"mechanism": "exact counts (no DP)", "epsilon": None, "delta": None, "file": ms.MEASUREMENTS}
    spec = ms.Spec.from_json(doc["spec"])
    # without DP nothing is bounded: every code and every absent pair counts, whatever was asked
    assert spec.max_codes == 3 and spec.max_absent == 2 and len(spec.pair_codes) == 1
    sens = spec.sensitivities()
    for f, v in doc["families"].items():
        assert v == {"counts": v["counts"], "sigma": 0.0, "sensitivity": sens[f], "rho_share": None}
        assert all(type(x) is int for x in v["counts"]), f  # JSON integers, as the noisy counts are
    exact = ms.exact_counts(tls, spec, tuple(doc["families"]))
    assert all(doc["families"][f]["counts"] == exact[f].tolist() for f in exact)
    # the max_codes 2 asked for does not apply without DP: a patient holding A, B and C counts all three
    assert sum(doc["families"]["prevalence"]["counts"]) == sum(len({e.code for e in t.events}) for t in tls)
    total = sum(len(v["counts"]) for v in doc["families"].values())
    sizes = ", ".join(f"{f} {len(v['counts'])}" for f, v in doc["families"].items())
    assert [r.getMessage() for r in caplog.records if r.name == ms.log.name] == [f"measured {total} statistics ({sizes})"]


def test_dp_measure_reports_every_family():
    eps, delta = 2.0, 1e-6
    doc, rep = ms.measure(_cohort(40), CodeVocab([A, B, C]), dp=True, epsilon=eps, delta=delta,
                          noise=NoiseSource.reproducible(2))
    assert doc["dp"] is True
    assert rep["mechanism"] == ("discrete Gaussian per family (OpenDP, zCDP composition), bounded contribution "
                                "(see fhirsynth/model/measurements.py)")
    assert (rep["epsilon"], rep["delta"], rep["file"]) == (eps, delta, ms.MEASUREMENTS)
    assert rep["families"] == {f: {"sigma": v["sigma"], "sensitivity": v["sensitivity"], "rho_share": v["rho_share"],
                                   "queries": len(v["counts"])} for f, v in doc["families"].items()}
    assert [v["rho_share"] for v in doc["families"].values()] == [ms.RHO_SHARES[f] for f in doc["families"]]


@pytest.mark.parametrize("epsilon,delta", [(None, 1e-6), (1.0, None), (None, None), (0.0, 1e-6), (-1.0, 1e-6),
                                           (1.0, 0.0), (1.0, 1.0), (1.0, 1.5), (float("nan"), 1e-6)])
def test_dp_measure_refuses_an_invalid_budget(epsilon, delta):
    with pytest.raises(ValueError, match=r"measurements need epsilon > 0 and 0 < delta < 1"):
        ms.measure(_cohort(5), CodeVocab([A]), dp=True, epsilon=epsilon, delta=delta, noise=NoiseSource.reproducible(1))


def test_measure_refuses_shares_that_overspend(monkeypatch):
    """The accounting guard: rho shares adding up to more than the whole make OpenDP's epsilon exceed the share."""
    monkeypatch.setitem(ms.RHO_SHARES, "cells", ms.RHO_SHARES["cells"] + 0.3)
    with pytest.raises(ValueError, match="exceeds its share"):
        ms.measure(_cohort(20), CodeVocab([A, B, C]), dp=True, epsilon=1.0, delta=1e-6,
                   noise=NoiseSource.reproducible(1))


# ---------------------------------------------------------------- load
def _write(tmp_path, doc) -> None:
    (tmp_path / ms.MEASUREMENTS).write_text(json.dumps(doc))


def _exact_doc() -> dict:
    return ms.measure(_cohort(30), CodeVocab([A, B, C]), dp=False, epsilon=None, delta=None,
                      noise=NoiseSource.reproducible(1))[0]


def test_load_accepts_exact_measurements_and_absent_files(tmp_path):
    assert ms.load(tmp_path) is None
    doc = _exact_doc()  # sigma 0 everywhere
    _write(tmp_path, doc)
    assert ms.load(tmp_path) == doc


def test_load_names_what_is_wrong_and_where(tmp_path):
    doc = _exact_doc()
    path = str(tmp_path / ms.MEASUREMENTS)
    _write(tmp_path, {**doc, "format": ms.FORMAT + 6})
    with pytest.raises(ModelDirError, match=f"measurements format {ms.FORMAT + 6} is not {ms.FORMAT}; retrain") as e:
        ms.load(tmp_path)
    assert e.value.where == path
    short = json.loads(json.dumps(doc))
    short["families"]["visits"]["counts"] = short["families"]["visits"]["counts"][:3]
    _write(tmp_path, short)
    with pytest.raises(ModelDirError, match=f"family visits has 3 counts, expected {len(ms.BUCKET_EDGES)}") as e:
        ms.load(tmp_path)
    assert e.value.where == path
    for breakage in ("null_count", "negative_sigma"):
        bad = json.loads(json.dumps(doc))
        if breakage == "null_count":
            bad["families"]["events"]["counts"][1] = None
        else:
            bad["families"]["events"]["sigma"] = -0.5
        _write(tmp_path, bad)
        with pytest.raises(ModelDirError, match="family events: counts or sigma are not finite numbers") as e:
            ms.load(tmp_path)
        assert e.value.where == path


def test_top_families_count_the_pair_codes_held():
    codes = [("condition", "s", str(i)) for i in range(6)]
    spec = ms.Spec(codes=codes, pair_codes=[codes[4], codes[1], codes[2]])
    q = ms.patient_queries(tl([codes[1], codes[4], codes[5]]), spec)
    assert q["top_prevalence"] == [0, 1]  # indices into pair_codes: 4 and 1 held, 2 not
    assert q["top_held"] == [2]
    assert ms.patient_queries(tl([]), spec)["top_held"] == [0]
    assert spec.sizes()["top_prevalence"] == 3 and spec.sizes()["top_held"] == 4
    # a document measured before these families: none of them, and it still round-trips
    d = spec.to_json()
    d.pop("top_families")
    old = ms.Spec.from_json(d)
    assert old.sizes()["top_prevalence"] == old.sizes()["top_held"] == 0
    assert ms.patient_queries(tl([codes[1]]), old)["top_held"] == []
