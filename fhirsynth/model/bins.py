"""Public bucket edges: time gaps, durations, ages, and per-code value bins from mappings/.

Every edge here is a public constant or comes from mappings/reference-ranges.toml + mappings/constraints.toml
(textbook ranges), so binning spends no privacy budget. Times are float days.
"""

from __future__ import annotations

import bisect
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fhirsynth.errors import MappingError

# Visit-to-visit gaps in days, roughly log2-spaced in half steps ([e_i, e_i+1) is bucket i).
GAP_EDGES: tuple[float, ...] = (
    0, 1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128, 181, 256, 362, 512, 724, 1024, 1448, 2048,
    2896, 4096, 5793, 8192, 11585, 16384, 23170, 32768, 47500,
)
# Durations (encounter period, onset -> abatement) in days: minutes for visits up to decades for conditions.
DUR_EDGES: tuple[float, ...] = (
    0, 1 / 96, 1 / 48, 1 / 24, 2 / 24, 4 / 24, 12 / 24, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048,
    4096, 8192, 16384, 47500,
)
# How many times one item (with one value) occurs in one visit, in buckets [e_i, e_i+1) (the last holds e_-1
# and more, capped at MAX_REPEAT). Records repeat items within a visit: the shared US cohort writes a visit's
# height, weight and vitals twice in a third of its encounters (13% of its events), and inpatient stays
# repeat a measurement many times. A set of items per visit dropped them all.
REPEAT_EDGES: tuple[int, ...] = (1, 2, 3, 4, 6, 9, 13, 19)
MAX_REPEAT = 24
REPEAT_BOUNDS = REPEAT_EDGES + (MAX_REPEAT + 1,)  # bucket i holds the counts [bounds i, bounds i+1)
N_REPEAT = len(REPEAT_EDGES)


def repeat_bucket(count: int) -> int:
    """The REPEAT_EDGES bucket of a count >= 1 (counts above MAX_REPEAT in the last)."""
    return bucket_of(count, REPEAT_BOUNDS)


DAYS_PER_YEAR = 365.25
DAYS_PER_MONTH = DAYS_PER_YEAR / 12
# Early-age buckets in days since birth (the visit model's fine age input beside whole years): the first week,
# half months to two months, then months to three years. Whole years cannot tell a newborn's visit from an
# 11-month one, and infant care runs by weeks and months (well-child visits at 1, 2, 4, 6, 9, 12, 15, 18, 24,
# 30 months; vaccine schedules with minimum ages in weeks). Without it the us-full model (fourteenth session)
# put 63% of infant encounters into the first 6 weeks (real 12%): newest first, it could not see how little
# room was left before birth.
EARLY_AGE_EDGES: tuple[float, ...] = (0.0, 7.0) + tuple(
    m * DAYS_PER_MONTH for m in (0.5, 1, 1.5) + tuple(range(2, 37)))
N_EARLY_AGE_IDS = len(EARLY_AGE_EDGES)  # id 0 = three years or older, or unknown; ids 1.. = the buckets


def early_age_id(days: float) -> int:
    """The early-age id of a time `days` after birth: 1 + its EARLY_AGE_EDGES bucket, 0 from three years on
    (and for NaN: not known)."""
    if not days < EARLY_AGE_EDGES[-1]:  # also NaN
        return 0
    return 1 + bucket_of(max(days, 0.0), EARLY_AGE_EDGES)


def bucket_of(x: float, edges: tuple[float, ...] | list[float]) -> int:
    """Index i with edges[i] <= x < edges[i+1], clamped to the first / last bucket."""
    i = bisect.bisect_right(edges, x) - 1
    return min(max(i, 0), len(edges) - 2)


def mappings_dir() -> Path:
    """The shipped mappings folder, found by the one rule the mapping loader uses."""
    from fhirsynth.mapping.loader import builtin_dir

    return builtin_dir()


def load_toml(name: str) -> dict:
    path = mappings_dir() / name
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise MappingError([f"{name} not found"], where=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise MappingError([f"invalid TOML: {exc}"], where=str(path)) from None
    if data.get("version") != 1:
        raise MappingError([f"unsupported version {data.get('version')!r} (expected 1)"], where=str(path))
    return data


@dataclass(frozen=True)
class ValueBins:
    """Bins of one numeric code: [edges[i], edges[i+1]); the outer edges are the physiologic range."""

    system: str
    code: str
    display: str
    category: str
    unit: str
    unit_aliases: tuple[str, ...]
    decimals: int
    edges: tuple[float, ...]

    @property
    def n_bins(self) -> int:
        return len(self.edges) - 1

    def bin_of(self, value: float) -> int:
        return bucket_of(value, self.edges)

    def accepts_unit(self, unit: str | None) -> bool:
        return unit == self.unit or (unit is not None and unit in self.unit_aliases)

    def to_json(self) -> dict:
        return {
            "system": self.system, "code": self.code, "display": self.display, "category": self.category,
            "unit": self.unit, "unit_aliases": list(self.unit_aliases), "decimals": self.decimals,
            "edges": list(self.edges),
        }

    @classmethod
    def from_json(cls, d: dict) -> ValueBins:
        return cls(d["system"], d["code"], d["display"], d["category"], d["unit"], tuple(d["unit_aliases"]),
                   int(d["decimals"]), tuple(float(e) for e in d["edges"]))


def load_value_bins() -> tuple[dict[tuple[str, str], ValueBins], list[dict]]:
    """(system, code) -> ValueBins, plus the public panel list. Every problem is reported at once."""
    ref = load_toml("reference-ranges.toml")
    cons = load_toml("constraints.toml")
    ranges = {(r["system"], r["code"]): r for r in cons.get("value_range", [])}
    problems: list[str] = []
    out: dict[tuple[str, str], ValueBins] = {}
    for i, obs in enumerate(ref.get("observation", [])):
        key = (obs.get("system"), obs.get("code"))
        where = f"observation[{i}] {key[1]}"
        rng = ranges.get(key)
        if rng is None:
            problems.append(f"{where}: no [[value_range]] in constraints.toml")
            continue
        if rng.get("unit") != obs.get("unit"):
            problems.append(f"{where}: unit {obs.get('unit')!r} differs from constraints.toml {rng.get('unit')!r}")
            continue
        lo, hi = float(rng["min"]), float(rng["max"])
        inner = [float(e) for e in obs.get("edges", [])]
        if inner != sorted(inner) or not all(math.isfinite(e) for e in inner):
            problems.append(f"{where}: edges must be ascending numbers")
            continue
        edges = (lo, *[e for e in inner if lo < e < hi], hi)
        out[key] = ValueBins(key[0], key[1], obs.get("display", key[1]), obs.get("category", "laboratory"),
                             obs["unit"], tuple(obs.get("unit_aliases", [])), int(obs.get("decimals", 1)), edges)
    if problems:
        raise MappingError(problems, where=str(mappings_dir() / "reference-ranges.toml"))
    return out, list(ref.get("panel", []))
