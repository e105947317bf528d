"""Marginal repair (issue 15): after calibrate.py has reweighted the pool and drawn the output, move each code's
patient share the rest of the way to its DP-measured target by moving whole code histories between patients of the
same cell (sex x age band, measurements.cell_of).

Reweighting can only choose among the model's own patients: a code the DP model writes for 30% of its patients,
where the measurement says every patient has it, stays far off whatever the weights (US cohort, epsilon 8: the mean
prevalence error moved from 0.124 to 0.117 by reweighting alone). Repair, per measured code, in a fixed order:
  * above its target by more than the fit's tolerance (DEADZONE noise standard deviations): the code's events are
    removed from holders, taken from the cells furthest above their own measured share;
  * below: non-holders in the cells furthest below theirs receive the code's events from a pooled donor of the same
    cell (so the same sex: sex-specific codes stay with their sex). Each donor event lands on the recipient's
    encounter nearest in age to the donor's age at the event (at most MAX_AGE_SHIFT_DAYS away, else it is dropped), with the donor's value, unit, status and category; a
    condition's abatement keeps its distance from onset and never passes the recipient's death. Nothing is created
    outside the recipient's own visits, so nothing precedes birth or follows death.
Panel members (blood-pressure components and the like) are left as drawn: one component without its sibling breaks
the panel. Every input is a DP release or a sample of the DP model: post-processing, no privacy cost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import numpy as np

from fhirsynth.model.measurements import N_CELLS, PREVALENCE_KINDS, CodeKey, _utc, cell_of
from fhirsynth.timeline.types import Event, Timeline

log = logging.getLogger(__name__)


@dataclass
class CodeTarget:
    """One code's measured share overall (target +- tolerance) and per cell (shares of all patients)."""

    code: CodeKey
    target: float
    tolerance: float
    cell_targets: np.ndarray  # per cell: measured holders in the cell / measured patients (all cells)


def code_targets(doc: dict[str, Any], tolerance_sd: float, floor: float) -> list[CodeTarget]:
    """Per measured code: the overall and per-cell target shares, as calibrate.targets reads them (clipped to
    [0, 1]), with tolerance_sd of its noise scale (at least floor) as the tolerance."""
    from fhirsynth.model.calibrate import targets

    tg = targets(doc, floor)
    if "prevalence" not in tg.offsets:  # no measured code (an empty family has no offsets)
        return []
    lo, hi = tg.offsets["prevalence"]
    c_lo, c_hi = tg.offsets["prevalence_cells"]
    by_cell = tg.target[c_lo:c_hi].reshape(N_CELLS, hi - lo)
    target, scale = tg.target[lo:hi].copy(), tg.scale[lo:hi].copy()
    if "top_prevalence" in tg.offsets:  # the top codes were measured twice: inverse-variance combination
        t_lo, t_hi = tg.offsets["top_prevalence"]
        for k, code in enumerate(tg.spec.pair_codes):
            j = tg.spec.code_index[code]
            w1, w2 = 1.0 / scale[j] ** 2, 1.0 / tg.scale[t_lo + k] ** 2
            target[j] = (w1 * target[j] + w2 * tg.target[t_lo + k]) / (w1 + w2)
            scale[j] = max((w1 + w2) ** -0.5, floor)
    return [CodeTarget(c, float(target[j]), tolerance_sd * float(scale[j]), by_cell[:, j])
            for j, c in enumerate(tg.spec.codes)]


def _key(e: Event) -> CodeKey:
    return (e.kind, e.system, e.code)


def _age_days(tl: Timeline, t: datetime) -> float | None:
    b = tl.patient.birth_date
    return None if b is None else (_utc(t).date() - b).days


# a donor event lands only on an encounter within this many days of the donor's age at it: a vaccine given at two
# months or an onset at 70 is not moved to a recipient who has no visit near that age (another recipient is tried)
MAX_AGE_SHIFT_DAYS = 2 * 365


def transplant(recipient: Timeline, donor: Timeline, code: CodeKey) -> list[Event]:
    """The donor's events of `code`, each moved to the recipient's encounter nearest in age (one event per
    encounter at most; none further than MAX_AGE_SHIFT_DAYS in age). Empty when either has no birth date, the
    recipient has no encounter, or none is near enough."""
    anchors = [e for e in recipient.events if e.kind == "encounter"]
    if not anchors or recipient.patient.birth_date is None or donor.patient.birth_date is None:
        return []
    ages = np.array([_age_days(recipient, a.time) for a in anchors], dtype=float)
    death = recipient.patient.death_date
    out: dict[int, Event] = {}
    for e in donor.events:
        if _key(e) != code:
            continue
        shift = np.abs(ages - _age_days(donor, e.time))
        i = int(np.argmin(shift))
        if i in out or shift[i] > MAX_AGE_SHIFT_DAYS:
            continue
        a = anchors[i]
        end = None if e.end_time is None else a.time + (_utc(e.end_time) - _utc(e.time))
        if end is not None and death is not None and _utc(end) > _utc(death):
            end = death
        out[i] = replace(e, time=a.time, end_time=end, encounter_id=a.encounter_id, source_id=None)
    return list(out.values())


def _order_cells(gaps: np.ndarray, eligible: list[list[int]], rng: np.random.Generator) -> int | None:
    """The cell with the largest remaining gap that still has an eligible patient (ties at random)."""
    best, best_gap = None, -np.inf
    for g in rng.permutation(len(gaps)):
        if eligible[g] and gaps[g] > best_gap:
            best, best_gap = int(g), gaps[g]
    return best


def _birth_days(tls: list[Timeline]) -> np.ndarray:
    """Birth dates as day numbers (NaN without one)."""
    return np.array([tl.patient.birth_date.toordinal() if tl.patient.birth_date else np.nan for tl in tls],
                    dtype=float)


NEAR_DONORS = 3


def _near_donor(donors: np.ndarray, pool_births: np.ndarray, birth: float, rng: np.random.Generator) -> int:
    """One of the NEAR_DONORS donors born closest to the recipient (a random one of them: variety): the donor's
    events then fall at ages the recipient has encounters for (a cell spans decades of age; a random donor's
    event missed every encounter of the recipient within MAX_AGE_SHIFT_DAYS and the copy was dropped)."""
    if np.isnan(birth):
        return int(rng.choice(donors))
    dist = np.abs(pool_births[donors] - birth)
    dist = np.where(np.isnan(dist), np.inf, dist)
    near = donors[np.argsort(dist, kind="stable")[:NEAR_DONORS]]
    return int(rng.choice(near))


def _affinity(pool_held: np.ndarray, j: int) -> np.ndarray:
    """How much holding each measured code says about holding code j, in the pool: the share of j's holders
    minus the share of its non-holders that hold it (0 for j itself)."""
    has = pool_held[:, j] > 0
    if has.all() or not has.any():
        return np.zeros(pool_held.shape[1])
    d = pool_held[has].mean(axis=0) - pool_held[~has].mean(axis=0)
    d[j] = 0.0
    return d


def repair(out: list[Timeline], pool: list[Timeline], targets: list[CodeTarget], seed: int) -> tuple[list[Timeline],
                                                                                                       dict]:
    """`out` with each measured code's share moved to within tolerance of its target where the pool allows; the
    timelines that change are copies (the pool is not modified). Within a cell the patients that gain a code are
    those whose other codes look most like its holders' in the pool, and those that lose it the least alike, so
    the codes that go together in the model's samples stay together. Returns (timelines, report)."""
    rng = np.random.default_rng([seed % 2**63, 16])
    n = len(out)
    res = [Timeline(patient=tl.patient, events=list(tl.events)) for tl in out]
    col = {ct.code: j for j, ct in enumerate(targets)}

    def holding(tls: list[Timeline]) -> np.ndarray:
        h = np.zeros((len(tls), len(targets)), dtype=bool)
        for i, tl in enumerate(tls):
            for e in tl.events:
                j = col.get(_key(e)) if e.kind in PREVALENCE_KINDS else None
                if j is not None:
                    h[i, j] = True
        return h

    cells, pool_cells = np.array([cell_of(tl) for tl in res]), np.array([cell_of(tl) for tl in pool])
    births, pool_births = _birth_days(res), _birth_days(pool)
    held, pool_held = holding(res), holding(pool).astype(float)
    panel_codes = {_key(e) for tl in pool for e in tl.events if e.kind in PREVALENCE_KINDS and e.panel_code}
    added = removed = codes_moved = 0
    changed: set[int] = set()
    short: list[str] = []
    for j, ct in enumerate(targets):
        if ct.code in panel_codes:
            continue
        holders = held[:, j].copy()
        share = holders.mean() if n else 0.0
        excess = share - ct.target
        # patients to move: enough to come within the tolerance, but never so many that the share ends further
        # past the target than it started (a tolerance under half a patient, as exact measurements have)
        k = int(np.ceil((abs(excess) - ct.tolerance) * n)) if abs(excess) > ct.tolerance else 0
        k = min(k, int(np.floor(2 * abs(excess) * n + 1e-9)))
        if k <= 0:
            continue
        # the cell's gap in patients: measured share of all patients x n - current holders there
        gaps = ct.cell_targets * n - np.bincount(cells[holders], minlength=N_CELLS)
        # pop() takes the last: the most alike to the holders when adding, the least alike when removing
        score = held.astype(float) @ _affinity(pool_held, j) + rng.random(n) * 1e-9
        done = 0
        if excess > 0:
            eligible = [sorted(np.flatnonzero(holders & (cells == g)), key=lambda i: -score[i]) for g in range(N_CELLS)]
            while done < k:
                g = _order_cells(-gaps, eligible, rng)
                if g is None:
                    break
                i = int(eligible[g].pop())
                res[i].events = [e for e in res[i].events if _key(e) != ct.code]
                held[i, j] = False
                changed.add(i)
                gaps[g] += 1
                done += 1
            removed += done
        else:
            donors = [np.flatnonzero((pool_cells == g) & (pool_held[:, j] > 0)) for g in range(N_CELLS)]
            eligible = [sorted(np.flatnonzero(~holders & (cells == g)), key=lambda i: score[i]) if len(donors[g])
                        else [] for g in range(N_CELLS)]
            while done < k:
                g = _order_cells(gaps, eligible, rng)
                if g is None:
                    break
                i = int(eligible[g].pop())
                new = transplant(res[i], pool[_near_donor(donors[g], pool_births, births[i], rng)], ct.code)
                if not new:
                    continue
                res[i].events = res[i].events + new
                held[i, j] = True
                changed.add(i)
                gaps[g] -= 1
                done += 1
            added += done
        codes_moved += done > 0
        if done < k:
            short.append(ct.code[2])
    for i in changed:  # the others stay exactly as drawn
        res[i].sorted()
    report = {"codes_repaired": codes_moved, "holders_added": added, "holders_removed": removed,
              "codes_short": len(short)}
    log.info("repair: %d codes moved toward their measured share (%d patients gained a code, %d lost one); %d "
             "codes could not reach it (no donor or recipient in a cell)", codes_moved, added, removed, len(short))
    return res, report
