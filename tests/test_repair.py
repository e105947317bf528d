"""Issue 15: marginal repair after calibration (fhirsynth/model/repair.py) moves code histories between patients of
the same sex and age band until each code's share is within tolerance of its measured one."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import numpy as np
import pytest
from test_model_helpers import CodeVocab

from fhirsynth.model import measurements as ms
from fhirsynth.model.calibrate import DEADZONE, FLOOR, calibrate
from fhirsynth.model.dpnoise import NoiseSource
from fhirsynth.model.repair import code_targets, repair, transplant
from fhirsynth.timeline.types import Event, PatientInfo, Timeline

T0 = datetime(2020, 1, 1, tzinfo=timezone.utc)
SCT, LOINC = "http://snomed.info/sct", "http://loinc.org"
A = ("condition", SCT, "1001")  # held by about half of the real patients, never by the pool
B = ("condition", SCT, "1002")  # held by everyone in the pool, a fifth of the real patients
F = ("condition", SCT, "1003")  # a female-only code
SYS = ("observation", LOINC, "8480-6")  # a blood-pressure component: panel member
OBS = ("observation", LOINC, "2345-7")


def person(i: int, codes: list[tuple[str, str, str]], *, sex: str, born: int, visits: int = 4,
           death: datetime | None = None) -> Timeline:
    """A patient with `visits` yearly encounters from 2010; each code once, at the last encounter (a condition with
    a 400-day abatement, the observation with a value, the panel member inside its panel)."""
    evs: list[Event] = []
    for v in range(visits):
        t = T0.replace(year=2010 + v)
        evs.append(Event(time=t, kind="encounter", system="http://terminology.hl7.org/CodeSystem/v3-ActCode",
                         code="AMB", encounter_id=f"e{i}-{v}"))
    last = evs[-1]
    for k, s, c in codes:
        ev = Event(time=last.time, kind=k, system=s, code=c, encounter_id=last.encounter_id)
        if k == "condition":
            ev.end_time = last.time + timedelta(days=400)
        elif c == SYS[2]:
            ev.value, ev.unit, ev.panel_system, ev.panel_code = 120.0, "mm[Hg]", LOINC, "85354-9"
        else:
            ev.value, ev.unit = 5.5, "mmol/L"
        evs.append(ev)
    return Timeline(PatientInfo(f"p{i}", sex=sex, birth_date=date(born, 6, 1),
                                death_date=death, deceased=death is not None), evs)


def real_cohort(n: int, seed: int) -> list[Timeline]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        sex = "female" if i % 2 else "male"
        codes = [OBS, SYS] + ([A] if rng.random() < 0.5 else []) + ([B] if rng.random() < 0.2 else [])
        codes += [F] if sex == "female" and rng.random() < 0.6 else []
        out.append(person(i, codes, sex=sex, born=1950 + i % 40))
    return out


def synthetic_pool(n: int) -> list[Timeline]:
    """The model's pool: A rarely (2 in 25, of both sexes and births every few years, so that a donor born near
    each recipient exists: a copied event lands only on an encounter within MAX_AGE_SHIFT_DAYS of the donor's age),
    always B, F for some women; only half hold the panel member."""
    return [person(1000 + i, [OBS, B] + ([SYS] if i % 2 else []) + ([F] if i % 4 == 1 else [])
                   + ([A] if i % 25 in (0, 1) else []),
                   sex="female" if i % 2 else "male", born=1950 + i % 40) for i in range(n)]


def share(tls: list[Timeline], code) -> float:
    return float(np.mean([any((e.kind, e.system, e.code) == code for e in t.events) for t in tls]))


@pytest.fixture()
def measured():
    real = real_cohort(400, seed=1)
    doc, _ = ms.measure(real, CodeVocab([A, B, F, SYS, OBS]), dp=False, epsilon=None, delta=None,
                        noise=NoiseSource.reproducible(1))
    return real, doc


def test_repair_brings_every_code_to_its_measured_share(measured):
    real, doc = measured
    pool = synthetic_pool(500)
    before = [list(t.events) for t in pool]
    out, _ = calibrate(pool, doc, 100, seed=3, repair=False)
    # reweighting cannot reach the targets: every pooled patient holds B, and at most 40 of 500 hold A
    assert share(out, A) <= 0.2 and share(out, B) == 1.0
    fixed, report = repair(out, pool, code_targets(doc, DEADZONE, FLOOR), seed=3)
    tol = DEADZONE * FLOOR + 1 / len(fixed)
    for code in (A, B, F):
        assert share(fixed, code) == pytest.approx(share(real, code), abs=tol), code
    assert report["holders_added"] >= (share(real, A) - share(out, A) - tol) * len(fixed)
    assert report["holders_removed"] >= (share(out, B) - share(real, B) - tol) * len(fixed)
    assert report["codes_short"] == 0
    # the panel member is left as drawn even though its share (about 0.5) is far from the real 1.0
    assert share(fixed, SYS) == share(out, SYS) < 0.9
    # the female-only code goes to women only, as in the measurements' cells
    assert all(t.patient.sex == "female" for t in fixed if any((e.kind, e.code) == ("condition", F[2])
                                                              for e in t.events))
    # the pool (the donors) is not modified
    assert [list(t.events) for t in pool] == before


def test_transplanted_events_sit_in_the_recipients_own_encounters(measured):
    _, doc = measured
    pool = synthetic_pool(300)
    out, _ = calibrate(pool, doc, 60, seed=5, repair=True)
    gained = [t for t in out if any((e.kind, e.system, e.code) == A for e in t.events)]
    assert gained
    for t in gained:
        encounters = {e.encounter_id: e.time for e in t.events if e.kind == "encounter"}
        for e in t.events:
            if (e.kind, e.system, e.code) == A:
                assert e.encounter_id in encounters and e.time == encounters[e.encounter_id]
                assert e.end_time - e.time == timedelta(days=400)  # the donor's course
                assert e.source_id is None
        assert [e.time for e in t.events] == sorted(e.time for e in t.events)


def test_transplant_maps_by_age_and_never_past_death():
    donor = person(1, [A], sex="male", born=1950, visits=6)  # A at the 2015 encounter, age 64-65
    died = T0.replace(year=2013, month=3)
    recipient = person(2, [], sex="male", born=1949, visits=4, death=died)  # encounters 2010-2013, ages 60-63
    new = transplant(recipient, donor, A)
    assert len(new) == 1
    assert new[0].encounter_id == "e2-3" and new[0].time == T0.replace(year=2013)  # the nearest age: the last visit
    assert new[0].end_time == died  # 400 days would pass the death: clipped
    younger = person(3, [], sex="male", born=1980, visits=4)  # ages 29-32: no visit within two years of 64
    assert transplant(younger, donor, A) == []
    near = person(5, [], sex="male", born=1952, visits=4)  # last visit at 60.6, the donor's event at 64.6: too far
    assert transplant(near, donor, A) == []
    assert transplant(person(6, [], sex="male", born=1948, visits=4), donor, A)[0].encounter_id == "e6-3"  # 64.6
    assert transplant(Timeline(PatientInfo("x", sex="male", birth_date=date(1950, 1, 1)), []), donor, A) == []
    no_birth = person(4, [], sex="male", born=1950)
    no_birth.patient.birth_date = None
    assert transplant(no_birth, donor, A) == []


def test_codes_inside_tolerance_are_left_alone(measured):
    """A code whose share is already within half a noise standard deviation of its target is not touched."""
    real, doc = measured
    out = real_cohort(120, seed=9)  # drawn from the same distribution as the measured cohort
    targets = code_targets(doc, DEADZONE, 0.2)  # a wide tolerance: every code is inside it
    fixed, report = repair(out, out, targets, seed=1)
    assert report["holders_added"] == report["holders_removed"] == 0
    assert [t.events for t in fixed] == [t.events for t in out]


def test_exact_measurements_cut_nothing():
    """Without DP there is no sensitivity to bound: a patient holding more codes than the DP bound counts every one
    (a cut would make the late codes' targets too low, and repair would then remove them from real-looking
    patients)."""
    codes = [("condition", SCT, str(5000 + i)) for i in range(ms.DEFAULT_MAX_CODES + 20)]
    big = person(1, codes, sex="female", born=1960)
    doc, _ = ms.measure([big, person(2, codes[-3:], sex="male", born=1970)], CodeVocab(codes), dp=False, epsilon=None,
                        delta=None, noise=NoiseSource.reproducible(1))
    prev = doc["families"]["prevalence"]["counts"]
    assert prev[: len(codes) - 3] == [1] * (len(codes) - 3) and prev[-3:] == [2, 2, 2]
    dp_doc, _ = ms.measure([big], CodeVocab(codes), dp=True, epsilon=1.0, delta=1e-6, noise=NoiseSource.reproducible(1))
    assert ms.Spec.from_json(dp_doc["spec"]).max_codes == ms.DEFAULT_MAX_CODES  # under DP the bound stays


def test_medications_and_vaccines_are_measured_and_repaired_too():
    """Issue 18's kinds are in the prevalence families: calibration brings a drug's share to its measured one."""
    med = ("medication", "http://www.nlm.nih.gov/research/umls/rxnorm", "314076")
    cvx = ("immunization", "http://hl7.org/fhir/sid/cvx", "140")
    real = [person(i, [OBS] + ([med] if i % 2 else []) + ([cvx] if i % 4 == 0 else []),
                   sex="female" if i % 3 else "male", born=1950 + i % 30) for i in range(200)]
    doc, _ = ms.measure(real, CodeVocab([OBS, med, cvx]), dp=False, epsilon=None, delta=None,
                        noise=NoiseSource.reproducible(1))
    assert ms.Spec.from_json(doc["spec"]).codes == [OBS, med, cvx]
    pool = [person(500 + i, [OBS] + ([med, cvx] if i % 10 == 0 else []), sex="female" if i % 3 else "male",
                   born=1950 + i % 30) for i in range(300)]
    out, _ = calibrate(pool, doc, 60, seed=2)
    assert share(out, med) == pytest.approx(0.5, abs=0.05) and share(out, cvx) == pytest.approx(0.25, abs=0.05)


def test_code_targets_clip_noisy_counts_and_scale_the_tolerance():
    """Targets from a noisy release: negative cells do not lower the patient count, shares are clipped to [0, 1],
    the tolerance is tolerance_sd noise standard deviations in share units (or the floor)."""
    real = real_cohort(40, seed=3)
    doc, _ = ms.measure(real, CodeVocab([A, B, F, OBS]), dp=True, epsilon=0.3, delta=1e-6,
                        noise=NoiseSource.reproducible(5))
    fams = doc["families"]
    cells = np.asarray(fams["cells"]["counts"], dtype=float)
    n_hat = max(float(np.clip(cells, 0, None).sum()), 1.0)
    prev = np.asarray(fams["prevalence"]["counts"], dtype=float)
    by_cell = np.asarray(fams["prevalence_cells"]["counts"], dtype=float).reshape(ms.N_CELLS, 4)
    assert (prev < 0).any() or (prev > n_hat).any() or (by_cell < 0).any()  # the noise is large at epsilon 0.3
    got = code_targets(doc, 0.5, 0.001)
    assert [t.code for t in got] == [A, B, F, OBS]
    sigma = float(fams["prevalence"]["sigma"])
    pair_codes = [tuple(c) for c in doc["spec"]["pair_codes"]]
    top = np.asarray(fams["top_prevalence"]["counts"], dtype=float)
    s_top = max(float(fams["top_prevalence"]["sigma"]) / n_hat, 0.001)
    s_prev = max(sigma / n_hat, 0.001)
    assert pair_codes  # some codes were measured twice
    for j, t in enumerate(got):
        own = min(max(prev[j] / n_hat, 0.0), 1.0)
        if t.code in pair_codes:  # inverse-variance combination with the top codes' own measurement
            other = min(max(top[pair_codes.index(t.code)] / n_hat, 0.0), 1.0)
            w1, w2 = s_prev ** -2, s_top ** -2
            assert t.target == pytest.approx((w1 * own + w2 * other) / (w1 + w2))
            assert t.tolerance == pytest.approx(0.5 * max((w1 + w2) ** -0.5, 0.001))
            assert t.tolerance < 0.5 * s_prev  # tighter than either measurement alone
            continue
        assert t.target == pytest.approx(own)
        assert t.tolerance == pytest.approx(0.5 * s_prev)
        assert t.cell_targets == pytest.approx(np.clip(by_cell[:, j] / n_hat, 0.0, 1.0))
        assert 0.0 <= t.target <= 1.0 and ((t.cell_targets >= 0) & (t.cell_targets <= 1)).all()
    wide = code_targets(doc, 2.0, 10.0)
    assert all(t.tolerance == pytest.approx(20.0) for t in wide)  # the floor wins when it is larger


def test_transplant_moves_every_donor_event_and_drops_its_source():
    """Two donor events at different ages land on two different encounters; the copy carries no source id (it is
    not the donor's resource) and keeps an abatement that ends exactly at death."""
    donor = person(1, [], sex="male", born=1950, visits=6)
    for year, src in ((2011, "Condition/a"), (2014, "Condition/b")):
        donor.events.append(Event(time=T0.replace(year=year), kind=A[0], system=A[1], code=A[2],
                                  end_time=T0.replace(year=year) + timedelta(days=30), source_id=src))
    died = T0.replace(year=2014) + timedelta(days=30)
    recipient = person(2, [], sex="male", born=1950, visits=5, death=died)
    new = sorted(transplant(recipient, donor, A), key=lambda e: e.time)
    assert [e.encounter_id for e in new] == ["e2-1", "e2-4"]
    assert all(e.source_id is None for e in new)
    assert new[1].end_time == died and new[0].end_time == new[0].time + timedelta(days=30)
