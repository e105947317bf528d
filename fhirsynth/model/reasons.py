"""A drug's indication in the record: every medication or procedure drawn with a reason condition gets that
condition in the patient's record, no later than its first use.

Medication and procedure items carry their reason (vocab.REASON_KINDS: "this drug for this disease" is one item),
but the visit model draws a visit's items independently given its mixture component, and visits newest first,
so the drug comes before (newer than) the onset it needs and nothing makes the older visits hold it. Measured on
the us-full cohort (400 training patients, a model without DP, fourteenth session): every one of the 6,879
training MedicationRequests with a reason has that condition in the record at or before it; of 7,753 sampled
ones, 25% (17% at or before), and the condition–medication co-occurrence R² was 0.66 against a real-vs-real 0.83.

The closure runs over a sampled record oldest visit first. Where an item's reason is a condition item of the
vocabulary (same system and code) that the record does not hold yet at that visit, it is added to the visit, with
the drug's own course duration when it has one (an indication treated for 10 days ends with the course; a drug
without an end leaves its condition active). Where the condition may not be drawn for the patient (a sex-specific
code, or an age limit at that visit: mappings/constraints.toml), the drug is removed instead. A reason that is not
in the vocabulary (text-only, or too rare to be released) asks for nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from fhirsynth.model.visits import VisitLayout
from fhirsynth.model.vocab import REASON_KINDS

# One visit as the sampler writes it: token ids and their in-bucket draws (visitsampler.VisitSampler._emit).
Visit = tuple[list[int], list[float]]


def reason_conditions(layout: VisitLayout) -> dict[int, int]:
    """Content token of each reason-carrying item -> the content token of its reason condition (the first
    condition item of that system and code in vocabulary order), where the vocabulary has one."""
    v = layout.vocab
    conditions: dict[tuple, int] = {}
    for tok in layout.content_tokens:
        it = v.item_of(tok)
        if it.kind == "condition":
            conditions.setdefault((it.system, it.code), tok)
    out: dict[int, int] = {}
    for tok in layout.content_tokens:
        it = v.item_of(tok)
        if it.kind in REASON_KINDS and it.panel_code:
            cond = conditions.get((it.panel_system, it.panel_code))
            if cond is not None:
                out[tok] = cond
    return out


def close_reasons(visits: list[Visit], reasons: dict[int, int], is_value: Callable[[int], bool],
                  allowed: Callable[[int, float], bool], stats: Counter) -> None:
    """Add each missing reason condition to `visits` (one record, newest first, changed in place) at the first
    visit whose item needs it, or remove the item where the condition is not allowed (allowed(condition token,
    the visit's day since birth)). is_value(token): whether a token is an item's value (it follows its item)."""
    wanted = set(reasons.values())
    held: set[int] = set()
    for tokens, draws in reversed(visits):  # oldest first
        held.update(t for t in tokens if t in wanted)
        day = draws[0]
        i = 0
        while i < len(tokens):
            cond = reasons.get(tokens[i])
            span = 2 if i + 1 < len(tokens) and is_value(tokens[i + 1]) else 1  # the item and its value
            if cond is None or cond in held:
                i += span
                continue
            if not allowed(cond, day):
                del tokens[i: i + span]
                del draws[i: i + span]
                stats["reason_items_removed"] += 1
                continue
            tokens.extend([cond] + tokens[i + 1: i + span])  # the course's duration, if it has one
            draws.extend([0.0] + draws[i + 1: i + span])
            held.add(cond)
            stats["reason_conditions_added"] += 1
            i += span
