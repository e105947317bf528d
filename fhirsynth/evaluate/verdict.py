"""within / near / far: how a metric of the synthetic data compares with what real data reaches.

Every summary row has a kind (below). Its *badness* says how far a value is from ideal in that kind's direction;
the *gap* is badness(synthetic) - badness(basis), where the basis is the holdout's value (the reference column)
or, when there is no holdout, the row's fallback (a real-vs-real null median, chance level, the real data's rate).
A gap at or below the kind's `within` tolerance reads "within", at or below `near` reads "near", else "far".
A synthetic value better than its basis (gap <= 0) is always "within", and so is one whose difference from the
basis is within sampling noise: the basis lies inside the synthetic value's 95% interval, or the value lies inside
the basis's own range (the real-vs-real null range) in that it is no farther from ideal than the range's worse end.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

WITHIN, NEAR, FAR = "within", "near", "far"
ORDER = {WITHIN: 0, NEAR: 1, FAR: 2}
AREAS = ("fidelity", "utility", "privacy", "plausibility", "validity")


@dataclass(frozen=True)
class Kind:
    description: str  # what the kind covers and which way is better, for the report's rules table
    ideal: float | None  # None: lower is better with no fixed target (badness = value)
    higher_is_better: bool
    within: float
    near: float

    def badness(self, value: float) -> float:
        if self.ideal is None:
            return value
        if self.higher_is_better:
            return self.ideal - value
        return abs(value - self.ideal)


KINDS: dict[str, Kind] = {
    "agreement": Kind("R² of per-code statistics, real vs synthetic (1 is perfect, higher is better)",
                      1.0, True, 0.05, 0.20),
    "distance": Kind("distances between distributions: KS, total variation, KL, |Δ share| (0 is perfect)",
                     0.0, False, 0.05, 0.15),
    "auc": Kind("classifier AUC where 0.5 means cannot tell apart: detection, membership inference",
                0.5, False, 0.05, 0.15),
    "auroc": Kind("utility AUROC or TSTR/TRTR ratio (higher is better; the reference is a model trained on "
                  "real data)", 1.0, True, 0.05, 0.15),
    "share": Kind("shares an attacker wins: DCR share closer to training, attribute-inference success "
                  "(lower is better)", None, False, 0.05, 0.15),
    "rate": Kind("rates of copies and of implausible events (lower is better)", None, False, 0.01, 0.05),
    "validity": Kind("share of resources valid against the FHIR R4 schema (1 is perfect)", 1.0, True, 0.01, 0.05),
}


def _number(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(float(v)) else None


def _pair(v: object) -> tuple[float, float] | None:
    if isinstance(v, list | tuple) and len(v) == 2:
        lo, hi = _number(v[0]), _number(v[1])
        if lo is not None and hi is not None:
            return min(lo, hi), max(lo, hi)
    return None


def judge(kind: str | None, value: object, basis: object, *, interval: object = None,
          basis_range: object = None) -> dict | None:
    """{"word", "gap", "noise"} for a value against its basis, or None when either is missing or the kind has no
    rule. interval: the value's 95% interval; basis_range: the basis's own [lo, hi] (a null range)."""
    rule = KINDS.get(kind or "")
    v, b = _number(value), _number(basis)
    if rule is None or v is None or b is None:
        return None
    gap = rule.badness(v) - rule.badness(b)
    ci, rng = _pair(interval), _pair(basis_range)
    noise = bool((ci and ci[0] <= b <= ci[1])
                 or (rng and rule.badness(v) <= max(rule.badness(rng[0]), rule.badness(rng[1]))))
    word = WITHIN if gap <= rule.within or noise else NEAR if gap <= rule.near else FAR
    return {"word": word, "gap": gap, "noise": noise}


def basis_of(row: dict) -> tuple[str, float] | None:
    """(name, value) the verdict compares against: the holdout reference, else the row's fallback."""
    if _number(row.get("reference")) is not None:
        return "holdout", float(row["reference"])
    fb = row.get("fallback")
    if isinstance(fb, dict) and _number(fb.get("value")) is not None:
        return str(fb.get("name")), float(fb["value"])
    return None


def add_verdicts(rows: Iterable[dict], value_key: str = "synthetic") -> None:
    """Set row["verdict"] (word, gap, basis name and value; None when there is nothing to compare)."""
    for row in rows:
        basis = basis_of(row)
        fb = row.get("fallback") or {}
        rng = fb.get("range") if basis and basis[0] == fb.get("name") else None
        v = judge(row.get("kind"), row.get(value_key), basis[1] if basis else None, interval=row.get("interval"),
                  basis_range=rng)
        row["verdict"] = None if v is None else {**v, "basis": basis[0], "basis_value": basis[1]}


def area_verdicts(rows: Iterable[dict]) -> dict[str, dict]:
    """Per area: the worst verdict of its rows and how many rows got each word (rows without one are counted
    as not judged)."""
    out: dict[str, dict] = {a: {"word": None, WITHIN: 0, NEAR: 0, FAR: 0, "not_judged": 0} for a in AREAS}
    for row in rows:
        area = out.setdefault(row.get("group", "other"), {"word": None, WITHIN: 0, NEAR: 0, FAR: 0,
                                                          "not_judged": 0})
        v = row.get("verdict")
        if not v:
            area["not_judged"] += 1
            continue
        area[v["word"]] += 1
        if area["word"] is None or ORDER[v["word"]] > ORDER[area["word"]]:
            area["word"] = v["word"]
    return out
