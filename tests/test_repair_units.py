"""Known answers for marginal repair (fhirsynth/model/repair.py), worked out by hand from its rules: how many holders
a code gains or loses (the tolerance), which cells give or take them (the largest remaining gap first), which
patients (the most alike to the pool's holders gain it, the least alike lose it), what the report and the log say,
and where transplant puts a donor's events (the age window's edge, later events after a skipped one)."""

from __future__ import annotations

import logging
from datetime import date, datetime, timedelta, timezone

import numpy as np
import pytest

from fhirsynth.model.measurements import N_CELLS, cell_of
from fhirsynth.model.repair import MAX_AGE_SHIFT_DAYS, CodeTarget, repair, transplant
from fhirsynth.timeline.types import Event, PatientInfo, Timeline

SCT, LOINC = "http://snomed.info/sct", "http://loinc.org"
X = ("condition", SCT, "111")  # the code repaired
Y = ("condition", SCT, "222")  # goes with X in the pool: it says who looks like X's holders
Z = ("condition", SCT, "333")  # a second repaired code
P = ("observation", LOINC, "8480-6")  # a panel member: left as drawn
T0 = datetime(2010, 3, 1, tzinfo=timezone.utc)


def patient(pid: str, codes: tuple, *, sex: str = "female", born: date | None = date(1980, 1, 1)) -> Timeline:
    """Four yearly encounters from 2010 (age 30-33: band 18-44); each code once, at the last one."""
    evs = [Event(time=T0.replace(year=2010 + v), kind="encounter", system="urn:class", code="AMB",
                 encounter_id=f"{pid}-e{v}") for v in range(4)]
    for kind, system, code in codes:
        ev = Event(time=evs[-1].time, kind=kind, system=system, code=code, encounter_id=evs[-1].encounter_id)
        if (kind, system, code) == P:
            ev.value, ev.unit, ev.panel_system, ev.panel_code = 120.0, "mm[Hg]", LOINC, "85354-9"
        evs.append(ev)
    return Timeline(PatientInfo(pid, sex=sex, birth_date=born), evs)


def holds(tl: Timeline, code) -> bool:
    return any((e.kind, e.system, e.code) == code for e in tl.events)


W = ("condition", SCT, "444")  # held by X's non-holders in the pool: says who does not look like X's holders


def pool_where_y_goes_with_x(n: int = 40) -> list[Timeline]:
    """Half hold X, three in four of them with Y; the other half hold W; in both sexes. Affinity to X: Y +0.75,
    W -1 (a holder's share minus a non-holder's)."""
    return [patient(f"d{i}", ((X, Y) if i % 8 != 7 else (X,)) if i % 2 else (W,),
                    sex="female" if i % 4 < 2 else "male") for i in range(n)]


def inert(code) -> CodeTarget:
    """A measured code that is never moved (any share is within its tolerance): repair scores how alike patients
    are over the measured codes only, so Y must be one."""
    return CodeTarget(code, 0.5, 1.0, np.full(N_CELLS, 0.5 / N_CELLS))


def target(code, overall: float, cells: dict[int, float], tolerance: float = 0.0) -> CodeTarget:
    ct = np.zeros(N_CELLS)
    for g, v in cells.items():
        ct[g] = v
    return CodeTarget(code, overall, tolerance, ct)


F_CELL, M_CELL = cell_of(patient("f", ())), cell_of(patient("m", (), sex="male"))


def removal_cohort() -> list[Timeline]:
    """16 patients: women 0-7, men 8-15. X: women 0-5 (3-5 with Y, 0 with W), men 8-11 (8-10 with Y): 10 of 16."""
    out = []
    for i in range(16):
        female = i < 8
        has_x = i <= 5 if female else 8 <= i <= 11
        has_y = 3 <= i <= 5 or 8 <= i <= 10
        out.append(patient(f"p{i}", (X,) * has_x + (Y,) * has_y + (W,) * (i == 0), sex="female" if female else "male"))
    return out


def test_a_code_above_its_target_loses_the_least_alike_holders_cell_by_cell(caplog):
    """Share 10/16 against 6/16 with a tolerance of 1/16: k = (10/16 - 6/16 - 1/16) x 16 = 3 holders lose X.
    Gaps (measured holders minus holders, in patients): women 3.75 - 6 = -2.25, men 2.5 - 4 = -1.5. The cell
    furthest above goes first: women (-2.25 -> -1.25), men (-1.5 -> -0.5), women (-1.25 -> -0.25). In each, the
    holders without Y (the least like the pool's X holders) lose it: woman 0 first (she also holds W, which X's
    holders lack), then one of women 1-2; man 11."""
    out = removal_cohort()
    ct = target(X, 6 / 16, {F_CELL: 3.75 / 16, M_CELL: 2.5 / 16}, tolerance=1 / 16)
    with caplog.at_level(logging.INFO, logger="fhirsynth.model.repair"):
        res, report = repair(out, pool_where_y_goes_with_x(), [ct, inert(Y), inert(W)], seed=3)
    lost = {tl.patient.patient_id for tl, before in zip(res, out) if holds(before, X) and not holds(tl, X)}
    assert len(lost) == 3 and {"p0", "p11"} <= lost and lost - {"p0", "p11"} <= {"p1", "p2"}
    assert sum(holds(tl, X) for tl in res) == 7  # 7/16 = target + tolerance
    assert all(holds(tl, Y) == holds(before, Y) for tl, before in zip(res, out))  # only X moved
    assert report == {"codes_repaired": 1, "holders_added": 0, "holders_removed": 3, "codes_short": 0}
    assert caplog.records[-1].getMessage() == (
        "repair: 1 codes moved toward their measured share (0 patients gained a code, 3 lost one); 0 codes could "
        "not reach it (no donor or recipient in a cell)")
    assert [e for e in out[0].events if (e.kind, e.system, e.code) == X]  # the input is not modified


@pytest.mark.parametrize("share,moved", [(9.6 / 16, 0), (9.4 / 16, 1)])
def test_a_code_is_not_moved_further_past_its_target_than_it_started(share, moved):
    """Exact measurements have a tolerance under one patient: 0.4 of a patient above the target stays (removing
    one holder would leave it 0.6 below), 0.6 above loses one holder (0.4 below)."""
    out = removal_cohort()
    ct = target(X, share, {F_CELL: 5 / 16, M_CELL: 4 / 16}, tolerance=0.01 / 16)
    res, report = repair(out, pool_where_y_goes_with_x(), [ct, inert(Y), inert(W)], seed=1)
    assert sum(holds(tl, X) for tl in res) == 10 - moved
    assert report["holders_removed"] == moved


def test_a_code_within_one_patient_of_its_tolerance_is_still_repaired():
    """k = 1 (one patient over target + tolerance): one holder loses it, the report counts the code."""
    out = removal_cohort()
    ct = target(X, 9 / 16, {F_CELL: 5 / 16, M_CELL: 4 / 16})
    res, report = repair(out, pool_where_y_goes_with_x(), [ct, inert(Y), inert(W)], seed=1)
    assert sum(holds(tl, X) for tl in res) == 9
    assert report == {"codes_repaired": 1, "holders_added": 0, "holders_removed": 1, "codes_short": 0}
    # the woman's cell is 1 above its target, the men's exactly on it: a woman without Y loses X
    assert [tl.patient.patient_id for tl, b in zip(res, out) if holds(b, X) and not holds(tl, X)][0] in {
        "p0", "p1", "p2"}


def addition_cohort() -> list[Timeline]:
    """16 patients, none with X: women 0-7 (0-2 with Y), men 8-15 (8 with Y); p15 has no birth date."""
    out = []
    for i in range(16):
        female = i < 8
        has_y = i <= 2 or i == 8
        out.append(patient(f"p{i}", (Y,) * has_y, sex="female" if female else "male",
                           born=None if i == 15 else date(1980, 1, 1)))
    return out


def test_a_code_below_its_target_goes_to_the_most_alike_in_the_cells_furthest_below():
    """0 of 16 hold X, target 4/16: 4 gain it. Gaps: women 3 - 0, men 1.5 - 0: women, women, (women 1 vs men
    1.5) men, women. The most alike first: women with Y (0-2) before the others, the man with Y (8)."""
    out = addition_cohort()
    ct = target(X, 4 / 16, {F_CELL: 3 / 16, M_CELL: 1.5 / 16})
    res, report = repair(out, pool_where_y_goes_with_x(), [ct, inert(Y), inert(W)], seed=5)
    gained = sorted(tl.patient.patient_id for tl in res if holds(tl, X))
    assert len(gained) == 4 and {"p0", "p1", "p2", "p8"} == set(gained)
    assert report == {"codes_repaired": 1, "holders_added": 4, "holders_removed": 0, "codes_short": 0}
    for tl in res:  # each copy sits on the recipient's own encounter
        enc = {e.encounter_id for e in tl.events if e.kind == "encounter"}
        assert all(e.encounter_id in enc for e in tl.events if (e.kind, e.system, e.code) == X)


def test_every_cell_short_of_donors_or_recipients_is_reported():
    """Z has no donor in the pool: nothing moves, the code is counted short and not as repaired; X, listed after a
    panel member (skipped: a lone component breaks its panel), is still repaired."""
    out = addition_cohort()
    targets = [target(P, 1.0, {F_CELL: 0.5, M_CELL: 0.5}), target(Z, 0.5, {F_CELL: 0.25, M_CELL: 0.25}),
               target(X, 2 / 16, {F_CELL: 1 / 16, M_CELL: 1 / 16}), inert(Y), inert(W)]
    pool = pool_where_y_goes_with_x() + [patient("d-panel", (P,))]
    res, report = repair(out, pool, targets, seed=2)
    assert not any(holds(tl, Z) or holds(tl, P) for tl in res)
    assert sum(holds(tl, X) for tl in res) == 2
    assert report == {"codes_repaired": 1, "holders_added": 2, "holders_removed": 0, "codes_short": 1}


def test_a_code_repaired_earlier_counts_for_the_codes_after_it():
    """Two codes in one run: X goes to the women with Y, then Z (whose pool holders hold X and Y) to the same
    women; the report counts both codes, and taking both away again counts six holders removed."""
    out = [patient(f"p{i}", (Y,) * (i < 3), sex="female") for i in range(8)]
    pool = [patient(f"d{i}", (X, Y, Z) if i % 2 else (), sex="female") for i in range(10)]
    targets = [target(X, 3 / 8, {F_CELL: 3 / 8}), target(Z, 3 / 8, {F_CELL: 3 / 8}), inert(Y)]
    res, report = repair(out, pool, targets, seed=4)
    with_x = {tl.patient.patient_id for tl in res if holds(tl, X)}
    with_z = {tl.patient.patient_id for tl in res if holds(tl, Z)}
    assert with_x == {"p0", "p1", "p2"} and with_z == with_x
    assert report == {"codes_repaired": 2, "holders_added": 6, "holders_removed": 0, "codes_short": 0}
    # and removal: X's holders that lose it no longer count as holders for the next code
    res2, report2 = repair(res, pool, [target(X, 0.0, {F_CELL: 0.0}), target(Z, 0.0, {F_CELL: 0.0}), inert(Y)],
                           seed=4)
    assert not any(holds(tl, X) or holds(tl, Z) for tl in res2)
    assert report2 == {"codes_repaired": 2, "holders_added": 0, "holders_removed": 6, "codes_short": 0}


def _with_events(pid: str, born: date, encounter_days: list[int], code_days: list[int]) -> Timeline:
    b = datetime(born.year, born.month, born.day, tzinfo=timezone.utc)
    evs = [Event(time=b + timedelta(days=d), kind="encounter", system="urn:class", code="AMB",
                 encounter_id=f"{pid}-e{k}") for k, d in enumerate(encounter_days)]
    evs += [Event(time=b + timedelta(days=d), kind="condition", system=SCT, code="111") for d in code_days]
    return Timeline(PatientInfo(pid, sex="female", birth_date=born), sorted(evs, key=lambda e: e.time))


def test_transplant_keeps_an_event_exactly_at_the_age_window_and_goes_on_after_a_skipped_one():
    """Recipient encounters at ages 1000 and 5000 days. Donor events at 1000 + MAX (exactly at the window's edge:
    kept, on the first encounter), 3000 (2000 days from both: skipped), 5100 (kept, on the second)."""
    born = date(1990, 1, 1)
    recipient = _with_events("r", born, [1000, 5000], [])
    donor = _with_events("d", born, [], [1000 + MAX_AGE_SHIFT_DAYS, 3000, 5100])
    moved = transplant(recipient, donor, X)
    assert [e.encounter_id for e in moved] == ["r-e0", "r-e1"]
    assert [(e.time.date() - born).days for e in moved] == [1000, 5000]


@pytest.mark.parametrize("seed", [0, 1])
def test_repair_is_deterministic_given_the_seed(seed):
    out, pool = addition_cohort(), pool_where_y_goes_with_x()
    ct = target(X, 4 / 16, {F_CELL: 3 / 16, M_CELL: 1.5 / 16})
    a, _ = repair(out, pool, [ct, inert(Y), inert(W)], seed=seed)
    b, _ = repair(out, pool, [ct, inert(Y), inert(W)], seed=seed)
    assert [[(e.kind, e.code, e.time) for e in t.events] for t in a] == \
        [[(e.kind, e.code, e.time) for e in t.events] for t in b]


def test_every_top_code_combines_its_two_measurements_by_inverse_variance():
    """The top codes are measured twice (prevalence, and top_prevalence at a smaller sensitivity): each one's
    target combines its own two estimates, weighted by the inverse of each one's noise variance in share units."""
    from test_model_helpers import CodeVocab
    from test_repair import A, B, F, OBS, real_cohort

    from fhirsynth.model import measurements as ms
    from fhirsynth.model.calibrate import targets
    from fhirsynth.model.dpnoise import NoiseSource
    from fhirsynth.model.repair import code_targets

    doc, _ = ms.measure(real_cohort(300, seed=4), CodeVocab([A, B, F, OBS]), dp=True, epsilon=4.0, delta=1e-6,
                        noise=NoiseSource.reproducible(6))
    tg = targets(doc, 0.001)
    lo, _ = tg.offsets["prevalence"]
    t_lo, _ = tg.offsets["top_prevalence"]
    pair_codes = list(tg.spec.pair_codes)
    assert len(pair_codes) >= 2  # more than one top code: each reads its own measurement
    got = {t.code: t for t in code_targets(doc, 1.0, 0.001)}
    for k, code in enumerate(pair_codes):
        j = tg.spec.code_index[code]
        w1, w2 = tg.scale[lo + j] ** -2, tg.scale[t_lo + k] ** -2
        assert got[code].target == pytest.approx((w1 * tg.target[lo + j] + w2 * tg.target[t_lo + k]) / (w1 + w2))
        assert got[code].tolerance == pytest.approx(max((w1 + w2) ** -0.5, 0.001))


def test_patients_and_donors_without_a_birth_date_are_passed_over():
    """A boy without a birth date (cell: male, band 0-17) is eligible but can take no copy (no age to place it
    at), and a donor without one is never among the three nearest while three with one exist: the boy with a
    birth date gets X from a dated donor, the undated boy nothing, and the code falls one short."""
    boys = [patient("b0", (), sex="male", born=date(2000, 1, 1)), patient("b1", (), sex="male", born=None)]
    pool = [patient("d-undated", (X,), sex="male", born=None)] + [
        patient(f"d{k}", (X,), sex="male", born=date(2000, 1, 1 + k)) for k in range(3)]
    cell = cell_of(boys[0])
    assert cell == cell_of(boys[1]) == cell_of(pool[0])  # both boys and every donor share the cell
    res, report = repair(boys, pool, [target(X, 1.0, {cell: 1.0})], seed=7)
    assert [holds(tl, X) for tl in res] == [True, False]
    assert report == {"codes_repaired": 1, "holders_added": 1, "holders_removed": 0, "codes_short": 1}
