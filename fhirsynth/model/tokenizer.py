"""Timelines <-> token sequences.

Sequence grammar (one patient = one sequence = one training example), NEWEST VISIT FIRST:

    BOS SEX BIRTH_BAND RACE ETHNICITY  [DEATH AGE_y]  visit*  END
    visit := GAP_g  entry+             GAP_g begins a visit, g days back from the later time: the first visit's
                                       from the end of the record (the death, else the end of the reference
                                       date), each later one's from the visit before it in the sequence
                                       (log-spaced, GAP_EDGES). One token, not a VISIT marker and a gap: a
                                       separate marker cost a sixth of every sequence (format 3)
    entry := ENC_item [VALUE_item] [DUR_d]     (only first in a visit)
           | COND_item [DUR_d]                 DUR = onset -> abatement (so abatement never precedes onset)
           | OBS_item [VAL_b | VALUE_item]     VAL_b = bin b of the code's public reference-range bins
           | MED_item [DUR_d] | PROC_item [DUR_d]   DUR = the course / the performed period; the item carries
                                               the reason (vocab.REASON_KINDS)
           | IMM_item                          given at the visit's time (so never before birth or after death)
           | ALLERGY_item [VALUE_item]         VALUE = the criticality
    END   := no older history in the record. A sequence whose oldest visit compression dropped has no END: it stops
             where the context does. Otherwise END would also mean "out of context" (3/4 of the US cohort's
             sequences), and the model, seeing END close to every visit boundary, stopped records early (measured:
             median record span 13 years vs 36 in the holdout). The sampler ends a sequence that fills the
             context itself (the grammar's length mask).

Why backwards: a record ends at the present (or at death), but how far back it reaches depends on how much
history fits the context. Generated forwards, a model must plan from the first visit how to reach the present
within max_len tokens, and a small one does not (measured: a quarter of living synthetic records stopped decades
early). Generated backwards, the present is where every record starts, and running out of context drops the
oldest history: exactly what the compression below drops in the training data.

A visit is one encounter (events sharing encounter_id) or, for events without one, one calendar day.
Entries within a visit are in canonical order (encounter, conditions, observations; by token id) and exact
repeats (same item and same value token) are dropped.

Long histories (Synthea: hundreds to thousands of events, vitals at every visit) must fit max_len tokens.
Compression is a fixed public rule applied per patient, so one patient is still exactly one example. Exact
repeats within a visit are always dropped (above). While the sequence is too long, over the OLD visits (all but
the 3 newest), oldest first:
  2. drop a condition or observation whose code a newer visit also has (each code keeps its newest occurrence,
     so "ever had code X" survives: repeated vitals and re-recorded findings go first);
  3. drop encounter type and duration tokens;
  4. drop the old visits left with nothing but their encounter (routine visits: 3 tokens each, no code that a
     newer visit lacks);
  5. drop the remaining observations (visits left empty disappear);
  6. drop old visits without a condition, then the oldest visits (a window);
  7. only if the 3 newest visits alone are too long, drop their observations too, then window further.
A sequence whose oldest visit did not survive gets no END (see the grammar above).
Measured on the shared US cohort (max_len 512; a patient has 65 distinct observation codes and 26 condition
codes in the median): 92% of the 800 training patients are compressed and 30% lose their oldest visits (mean
487 tokens); passing 200 holdout patients through encode/decode, their per-code patient prevalence keeps R²
1.00 (conditions) and 1.00 (observations) against the raw records (max_len 384: 1.00 / 0.997). Without step 4
(the third session's rule) observations kept 0.78: the routine visits filled the context and the first-seen
observations went; with all old observations dropped first (the second session's) 0.36.

Beside every token goes an age id (encode_with_ages): the record's current time after that token in whole years
since birth: unknown until the birth band, then the record's end (the reference date, or the death after AGE),
then each visit's time from its GAP on. The model reads it as a second input (transformer.py); the sampler
computes the same quantity from its exact draws (grammar.age_ids).

Decoding is exact up to bucket resolution: times and values are drawn uniformly inside their bucket by the
grammar's state machine (grammar.py) with a seeded RNG; decode() turns tokens + those draws into a Timeline.
"""

from __future__ import annotations

import math
from collections import Counter
from datetime import date, datetime, timedelta, timezone

from fhirsynth.model.bins import DAYS_PER_YEAR, DUR_EDGES, GAP_EDGES, bucket_of
from fhirsynth.model.vocab import ETHNICITIES, RACES, REASON_KINDS, SEXES, ItemMatcher, Vocab, sex_index
from fhirsynth.timeline.types import DATA_ABSENT_SYSTEM, VALUE_WITHHELD, Event, PatientInfo, Timeline

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# Entry order inside a visit; the compression rules below name kinds 0 (encounter), 1 and 2; the kinds of issue
# 18 come after them, so a record without them is encoded exactly as before.
_KIND_ORDER = {"encounter": 0, "condition": 1, "observation": 2, "allergy": 3, "procedure": 4, "immunization": 5,
               "medication": 6}
# Kinds with a DUR token (end_time - time) and the kinds whose coded value is a VALUE item.
DUR_KINDS = ("encounter", "condition", "medication", "procedure")
# Kinds whose entries keep their own time before their visit's start (encode_with_days' leads): a condition's
# onset, an allergy's onset, an observation taken before the encounter. A drug, procedure or vaccine stays at its
# visit: its reason condition (reasons.py) and the schedule's minimum ages (constraints.toml) are kept there.
LEAD_KINDS = ("condition", "observation", "allergy")
# What a decoded event's status is when the record does not say (FHIR required value sets).
_STATUS = {"condition": "active", "observation": "final", "medication": "active", "immunization": "completed",
           "procedure": "completed", "allergy": "active"}
# The newest visits that compression keeps whole longest; in older ones a code appears at most once once a
# sequence is compressed (its newest occurrence), which the sampler enforces (grammar.py).
RECENT_VISITS = 3
# Age ids (the model's second input): whole years 0..AGE_UNKNOWN-1 (older is clipped), AGE_UNKNOWN before the
# birth band. ModelConfig.n_age_ids must be AGE_UNKNOWN + 1.
AGE_UNKNOWN = 127


def age_id(days: float) -> int:
    """Age id of a time `days` after birth (AGE_UNKNOWN for NaN: not known yet)."""
    if math.isnan(days):
        return AGE_UNKNOWN
    return min(max(int(days // DAYS_PER_YEAR), 0), AGE_UNKNOWN - 1)


def day_number(d: date) -> int:
    """Days since 1970-01-01."""
    return (d - date(1970, 1, 1)).days


def _midnight(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=timezone.utc)


def _as_utc(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


class Tokenizer:
    def __init__(self, vocab: Vocab) -> None:
        self.vocab = vocab
        # public code lists are recoverable from the public items themselves (the model dir is self-contained)
        public_lists = {"encounter": "encounter_class", "condition": "condition", "value": "encounter_type"}
        public_codes: dict[str, dict[tuple[str, str], str]] = {name: {} for name in public_lists.values()}
        for it in vocab.items:
            if it.public and it.kind in public_lists and it.system and it.code:
                public_codes[public_lists[it.kind]][(it.system, it.code)] = it.display
        self.matcher = ItemMatcher(vocab.value_bins, [], public_codes)
        # public panels likewise
        self.matcher.public_panels = {
            (it.panel_system, it.panel_code): {"system": it.panel_system, "code": it.panel_code,
                                                "display": it.panel_display}
            for it in vocab.items if it.public and it.panel_code
        }
        self.race_index = {code: i for i, (code, _) in enumerate(RACES)}
        self.eth_index = {code: i for i, (code, _) in enumerate(ETHNICITIES)}
        # item tokens written with a withheld value (Vocab.value_withheld), once: decode meets them per event
        base = vocab.start("item")
        self.withheld = frozenset(base + i for i in range(len(vocab.items)) if vocab.value_withheld(i))

    # ---- encode -------------------------------------------------------------------------------------------

    def _entry(self, ev: Event, stats: Counter) -> tuple[int, tuple[int, ...]] | None:
        v = self.vocab
        key = self.matcher.event_key(ev)
        tok = v.item_token(key) if key is not None else None
        if tok is None:
            stats["events_out_of_vocabulary"] += 1
            return None
        extra: list[int] = []
        item = v.item_of(tok)
        if ev.kind == "observation":
            vb = v.item_bins(item)
            if vb is not None and ev.value is not None:
                if vb.accepts_unit(ev.unit):
                    extra.append(v.start("val") + vb.bin_of(ev.value))
                else:
                    stats["values_unit_mismatch"] += 1
            elif ev.value_code is not None:
                vt = v.item_token(self.matcher.value_key(ev))
                if vt is not None:
                    extra.append(vt)
                else:
                    stats["values_out_of_vocabulary"] += 1
        elif ev.kind in ("encounter", "allergy"):
            if ev.value_code is not None:
                vt = v.item_token(self.matcher.value_key(ev))
                if vt is not None:
                    extra.append(vt)
                elif ev.kind == "allergy":
                    stats["values_out_of_vocabulary"] += 1
        if ev.kind in DUR_KINDS and ev.end_time is not None:
            dur = (_as_utc(ev.end_time) - _as_utc(ev.time)).total_seconds() / 86400.0
            if dur >= 0:
                extra.append(v.start("dur") + bucket_of(dur, DUR_EDGES))
            else:
                stats["end_before_start_dropped"] += 1
        return tok, tuple(extra)

    def encode(self, tl: Timeline, stats: Counter | None = None) -> list[int] | None:
        """Token ids of one patient, or None when the patient has no birth date (counted in stats)."""
        got = self.encode_with_ages(tl, stats)
        return None if got is None else got[0]

    def encode_with_ages(self, tl: Timeline, stats: Counter | None = None,
                         compress: bool = True) -> tuple[list[int], list[int]] | None:
        """(token ids, age ids) of one patient, or None when the patient has no birth date (counted in stats).
        compress=False keeps every visit whatever the length (the visit model windows visits itself)."""
        got = self.encode_with_days(tl, stats, compress)
        if got is None:
            return None
        toks, days = got
        return toks, [age_id(d) for d in days]

    def encode_with_days(self, tl: Timeline, stats: Counter | None = None,
                         compress: bool = True, keep_repeats: bool = False,
                         leads: list[float] | None = None) -> tuple[list[int], list[float]] | None:
        """(token ids, the record's current time after each token in days since birth, NaN before the birth
        band) of one patient, or None without a birth date: encode_with_ages before the age ids are taken (the
        visit model reads finer ages in early childhood, bins.early_age_id). keep_repeats: an item written again
        in its visit with the same value stays (the visit model counts repeats, visits.py); else it is dropped
        (the token model's budget). leads: filled with one number per token, how many days before its visit's
        start an entry's own time lies (a condition whose onset precedes the encounter that records it), 0 for
        every other token (the visit model learns it, visits.py; the token grammar places events at their visit)."""
        if leads is not None and compress:  # compression may slim a visit's entries: their leads would not line up
            raise ValueError("leads are kept for uncompressed encodings only")
        stats = stats if stats is not None else Counter()
        v, p = self.vocab, tl.patient
        if p.birth_date is None:
            stats["patients_without_birth_date"] += 1
            return None
        birth = _midnight(p.birth_date)
        prefix = [
            v.BOS,
            v.start("sex") + sex_index(p.sex),
            v.start("by") + v.band_of_year(p.birth_date.year),
            v.start("race") + self.race_index.get(p.race_code, len(RACES) - 1),
            v.start("eth") + self.eth_index.get(p.ethnicity_code, len(ETHNICITIES) - 1),
        ]
        # group into visits
        groups: dict[tuple, list[Event]] = {}
        for ev in tl.events:
            t = _as_utc(ev.time)
            gkey = ("e", ev.encounter_id) if ev.encounter_id else ("d", t.date())
            groups.setdefault(gkey, []).append(ev)
        visits: list[tuple] = []  # (days, entries (kind order, token, extra), their leads in days)
        for evs in groups.values():
            encs = [e for e in evs if e.kind == "encounter"]
            start = min(_as_utc(e.time) for e in (encs or evs))
            seen: set = set()
            entries = []
            enc_done = False
            for ev in evs:
                if ev.kind == "encounter":
                    if enc_done:
                        stats["extra_encounters_in_visit_dropped"] += 1
                        continue
                got = self._entry(ev, stats)
                if got is None:
                    continue
                if ev.kind == "encounter":
                    enc_done = True
                tok, extra = got
                if (tok, extra) in seen and not keep_repeats:
                    stats["repeats_in_visit_dropped"] += 1
                    continue
                seen.add((tok, extra))
                lead = max((start - _as_utc(ev.time)).total_seconds() / 86400.0, 0.0) if ev.kind in LEAD_KINDS else 0.0
                entries.append((_KIND_ORDER[ev.kind], tok, extra, lead))
            if entries:
                entries.sort()
                days = max((start - birth).total_seconds() / 86400.0, 0.0)
                visits.append((days, [e[:3] for e in entries], [e[3] for e in entries]))
        visits.sort(key=lambda vis: vis[0])
        visit_leads = [vis[2] for vis in visits]
        visits = [vis[:2] for vis in visits]
        death_days = None
        if p.death_date is not None:
            death_days = max((_as_utc(p.death_date) - birth).total_seconds() / 86400.0, 0.0)
        elif p.deceased:
            stats["deceased_without_date"] += 1
        oldest = visits[0][0] if visits else None
        if compress:
            visits = self._fit(visits, budget=v.cfg.max_len - len(prefix) - 1 - (2 if death_days is not None else 0),
                               stats=stats)
        truncated = oldest is not None and (not visits or visits[0][0] > oldest)
        # the record's end: death, else the end of the reference day (a living record runs up to "today")
        ref_days = (_midnight(v.cfg.ref_date) - birth).total_seconds() / 86400.0 + 1.0
        toks = list(prefix)
        nan = float("nan")
        times = [nan, nan] + [ref_days] * (len(prefix) - 2)  # known from the birth band on
        if death_days is not None:
            toks += [v.DEATH, v.start("age") + v.age_bucket(death_days)]
            times += [ref_days, death_days]
        prev = death_days if death_days is not None else ref_days
        if leads is not None:
            leads[:] = [0.0] * len(toks)
        for k in range(len(visits) - 1, -1, -1):  # newest first: every gap counts back from the later time
            days, entries = visits[k]
            toks.append(v.start("gap") + bucket_of(max(prev - days, 0.0), GAP_EDGES))
            prev = min(days, prev)
            times.append(prev)
            for e, (_, tok, extra) in enumerate(entries):
                if leads is not None:  # the entry's lead at its item token, 0 at the gap before and the extras
                    leads += [0.0] * (len(toks) - len(leads)) + [visit_leads[k][e]] + [0.0] * len(extra)
                toks.append(tok)
                toks.extend(extra)
            times += [prev] * (len(toks) - len(times))
        if truncated:  # older history exists but did not fit: no END, which means "no older history"
            stats["sequences_truncated"] += 1
        else:
            toks.append(v.END)
            times.append(prev)
        if leads is not None:
            leads += [0.0] * (len(toks) - len(leads))
        return toks, times

    @staticmethod
    def _fit(visits: list, budget: int, stats: Counter, recent: int = RECENT_VISITS) -> list:
        """Public compression rule (see module doc): `recent` newest visits stay complete longest; each step
        runs over the old visits oldest first and stops as soon as the sequence fits."""
        def cost(vis) -> int:
            return 1 + sum(1 + len(extra) for _, _, extra in vis[1]) if vis[1] else 0

        total = sum(cost(vis) for vis in visits)
        if total <= budget:
            return visits
        stats["patients_compressed"] += 1
        visits = [(d, list(e)) for d, e in visits]

        def slim(i: int, keep, counter: str) -> None:
            """Keep the entries of visit i for which keep(index, entry) holds (an entry = (kind, token, extra))."""
            nonlocal total
            days, entries = visits[i]
            out = [keep(i, e) for e in entries]
            kept = [e for e in out if e is not None]
            stats[counter] += sum(1 for e, o in zip(entries, out) if o != e)  # entries dropped or slimmed
            total += cost((days, kept)) - cost(visits[i])
            visits[i] = (days, kept)

        def each_old(keep, counter: str) -> None:
            i = 0
            while total > budget and i < len(visits) - recent:
                slim(i, keep, counter)
                i += 1

        def drop_old_visits_where(kinds_match) -> None:
            """Drop old visits, oldest first, whose entry kinds all satisfy kinds_match(kind)."""
            nonlocal total
            i = 0
            while total > budget and i < len(visits) - recent:
                if all(kinds_match(k) for k, _, _ in visits[i][1]):
                    total -= cost(visits[i])
                    stats["visits_dropped_for_length"] += 1
                    visits.pop(i)
                else:
                    i += 1

        def drop_visits(keep: int) -> None:
            nonlocal total
            while total > budget and len(visits) > keep:
                total -= cost(visits[0])
                stats["visits_dropped_for_length"] += 1
                visits.pop(0)

        # 2. repeats: a condition or observation code that a newer visit also has (its newest occurrence stays)
        newer: list[set[int]] = [set() for _ in visits]
        acc: set[int] = set()
        for i in range(len(visits) - 1, -1, -1):
            newer[i] = set(acc)
            acc.update(tok for kind, tok, _ in visits[i][1] if kind != 0)
        each_old(lambda i, e: e if e[0] == 0 or e[1] not in newer[i] else None, "repeats_dropped_for_length")
        # 3. encounter type / duration tokens
        each_old(lambda i, e: (e[0], e[1], ()) if e[0] == 0 else e, "encounter_details_dropped_for_length")
        # 4. old visits with nothing but their encounter (no condition, no first-seen observation left)
        drop_old_visits_where(lambda kind: kind == 0)
        # 5. the remaining (first-seen) observations
        each_old(lambda i, e: e if e[0] != 2 else None, "observations_dropped_for_length")
        visits = [vis for vis in visits if vis[1]]
        # 6. old visits without a condition, then the oldest visits (a window), sparing the recent ones
        drop_old_visits_where(lambda kind: kind != 1)
        drop_visits(recent)
        # 7. still too long: the recent visits' observations too, then a window over them
        for i in range(len(visits)):
            if total > budget:
                slim(i, lambda i, e: e if e[0] != 2 else None, "observations_dropped_for_length")
        visits = [vis for vis in visits if vis[1]]
        drop_visits(0)
        return visits

    # ---- decode -------------------------------------------------------------------------------------------

    def decode(self, tokens: list[int], draws: list[float], patient_id: str) -> Timeline:
        """Tokens + the state machine's in-bucket draws -> a Timeline (raises ValueError if ungrammatical)."""
        v = self.vocab
        info = PatientInfo(patient_id=patient_id)
        events: list[Event] = []
        birth: datetime | None = None
        t_visit: datetime | None = None
        enc_id: str | None = None
        last: Event | None = None
        last_item = None
        n_visit = 0
        for tok, draw in zip(tokens, draws):
            g = v.group_of(tok)
            if g == "pad" or g == "bos":
                continue
            if g == "end":
                break
            if g == "sex":
                info.sex = SEXES[tok - v.start("sex")]
            elif g == "by":
                bd = date(1970, 1, 1) + timedelta(days=int(draw))
                info.birth_date = bd
                birth = _midnight(bd)
            elif g == "race":
                info.race_code, info.race_display = RACES[tok - v.start("race")]
            elif g == "eth":
                info.ethnicity_code, info.ethnicity_display = ETHNICITIES[tok - v.start("eth")]
            elif g in ("age", "gap"):
                if birth is None:
                    raise ValueError("time token before the birth band")
                when = birth + timedelta(days=float(draw))
                if g == "age":  # the death's age (only right after DEATH, grammar.py)
                    info.deceased = True
                    info.death_date = when
                else:  # a GAP begins a visit
                    n_visit += 1
                    enc_id, last, t_visit = None, None, when
            elif g == "item":
                it = v.item_of(tok)
                if it.kind == "value":
                    if last is None:
                        raise ValueError("value token without an event")
                    last.value_system, last.value_code, last.value_display = it.system, it.code, it.display
                    continue
                if t_visit is None:
                    raise ValueError("event outside a visit")
                # an entry's draw: how many days before its visit it lies (visit model leads; the token grammar
                # draws 0 for items), e.g. a condition's onset before the encounter that records it
                when_ev = t_visit - timedelta(days=float(draw)) if draw > 0 and it.kind in LEAD_KINDS else t_visit
                ev = Event(time=when_ev, kind=it.kind, system=it.system or "", code=it.code or "",
                           display=it.display, category=it.category, panel_system=it.panel_system,
                           panel_code=it.panel_code, panel_display=it.panel_display)
                if it.kind == "encounter":
                    enc_id = f"{patient_id}-enc-{n_visit}"
                    ev.encounter_id, ev.status = enc_id, "finished"
                else:
                    ev.encounter_id, ev.status = enc_id, _STATUS.get(it.kind, "final")
                if tok in self.withheld:
                    ev.value_system, ev.value_code, ev.value_display = DATA_ABSENT_SYSTEM, VALUE_WITHHELD, "Masked"
                if it.kind in REASON_KINDS:  # the item's panel fields hold the reason (vocab.REASON_KINDS)
                    ev.value_system, ev.value_code, ev.value_display = it.panel_system, it.panel_code, it.panel_display
                    ev.panel_system = ev.panel_code = ev.panel_display = None
                events.append(ev)
                last, last_item = ev, it
            elif g == "dur":
                if last is None or birth is None:
                    raise ValueError("duration without an event")
                last.end_time = birth + timedelta(days=float(draw))
                if last.kind == "condition":
                    last.status = "resolved"
                elif last.kind == "medication":
                    last.status = "completed"  # a course with an end
            elif g == "val":
                if last is None:
                    raise ValueError("value bin without an observation")
                vb = v.item_bins(last_item)
                if last.value_system == DATA_ABSENT_SYSTEM:  # a value after all: no absent reason
                    last.value_system = last.value_code = last.value_display = None
                last.value = float(draw)
                last.unit = vb.unit if vb else None
        return Timeline(patient=info, events=events).sorted()

