"""Clinical constraints from mappings/constraints.toml, turned into per-token tables for the sampler.

Structural rules (nothing after death, onset before abatement, nothing after the reference date) are enforced
by the grammar itself (grammar.py); this module covers the code-specific ones: sex-specific codes and age
limits. Physiologic value ranges are the outer edges of every value bin (bins.py), so a drawn value can never
leave its range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fhirsynth.errors import MappingError
from fhirsynth.model.bins import load_toml, mappings_dir
from fhirsynth.model.vocab import SEXES, Vocab


@dataclass
class Constraints:
    sex_only: dict[tuple[str, str], str] = field(default_factory=dict)  # (system, code) -> the only sex allowed
    age_limits: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)  # years [min, max)
    value_ranges: dict[tuple[str, str], tuple[float, float, str]] = field(default_factory=dict)

    def forbidden_tokens(self, vocab: Vocab) -> dict[str, list[int]]:
        """sex -> item tokens that patients of that sex may not have."""
        out: dict[str, list[int]] = {s: [] for s in SEXES}
        base = vocab.start("item")
        for i, it in enumerate(vocab.items):
            only = self.sex_only.get((it.system, it.code))
            if only is not None:
                for s in SEXES:
                    if s != only:
                        out[s].append(base + i)
        return out

    def age_limited_tokens(self, vocab: Vocab) -> list[tuple[int, float, float]]:
        base = vocab.start("item")
        out = []
        for i, it in enumerate(vocab.items):
            lim = self.age_limits.get((it.system, it.code))
            if lim is not None:
                out.append((base + i, lim[0], lim[1]))
        return out


def load_constraints() -> Constraints:
    data = load_toml("constraints.toml")
    problems: list[str] = []
    c = Constraints()
    for i, rule in enumerate(data.get("sex_specific", [])):
        sex = rule.get("sex")
        if sex not in ("female", "male") or not rule.get("system") or not isinstance(rule.get("codes"), list):
            problems.append(f"sex_specific[{i}]: needs sex = female|male, system and codes")
            continue
        for code in rule["codes"]:
            prev = c.sex_only.get((rule["system"], code))
            if prev is not None and prev != sex:
                problems.append(f"sex_specific[{i}]: code {code} is listed for both sexes")
            c.sex_only[(rule["system"], code)] = sex
    for i, rule in enumerate(data.get("age_limit", [])):
        try:
            lo, hi = float(rule["min_age"]), float(rule["max_age"])
            system, codes = rule["system"], list(rule["codes"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"age_limit[{i}]: needs system, codes, min_age, max_age")
            continue
        if not lo < hi:
            problems.append(f"age_limit[{i}]: min_age must be below max_age")
        for code in codes:
            old = c.age_limits.get((system, code))
            # several rules on one code: the intersection holds
            c.age_limits[(system, code)] = (max(lo, old[0]), min(hi, old[1])) if old else (lo, hi)
    for i, rule in enumerate(data.get("value_range", [])):
        try:
            c.value_ranges[(rule["system"], rule["code"])] = (float(rule["min"]), float(rule["max"]), rule["unit"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"value_range[{i}]: needs system, code, unit, min, max")
    if problems:
        raise MappingError(problems, where=str(mappings_dir() / "constraints.toml"))
    return c
