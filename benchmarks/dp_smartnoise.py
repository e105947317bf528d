"""smartnoise-synth (MST, AIM) as DP peers of fhirsynth, run in their own virtualenv.

smartnoise-synth pins opacus<0.15 and pandas<2.4, so it cannot share the project's .venv. Install it outside the
repo (what was run for the numbers in BENCHMARKS.md; it pulls smartnoise-synth 1.0.8, mbi 1.1.0 on jax, opendp
0.14; no build tools needed on Linux x86-64 / CPython 3.11):

    python3 -m venv /work/sn-venv && /work/sn-venv/bin/pip install smartnoise-synth

and pass --baseline-python /work/sn-venv/bin/python (or set FHIRSYNTH_BASELINE_PYTHON).

Two tables are fed to it:
  * benchmarks/bench_study.py: the flattened, binned per-patient table of fhirsynth.evaluate.tables;
  * benchmarks/bench_calibrate.py: the per-patient code table below (code_table): one 0/1 column per chosen
    condition / observation code ((kind, system, code), the token of fhirsynth/records_metrics.py), plus sex and
    the 10-year age band at the patient's last event; a sampled row becomes a timeline with one event per held
    code on one day (table_timelines), so records_metrics.compare measures it as every other column. What MST can
    model there is per-code prevalence and patient-level co-occurrence; visits, times and within-visit structure
    are degenerate by design (one visit per patient).
The code choice (choose_codes) reads the training data without noise: NOT privacy-accounted (it favours the
baseline; the benchmarks say so in their output). The sex and age-band domains are public (FHIR administrative
gender; fixed bands), though smartnoise's categorical encoder still takes the levels present in the data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import time
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from dp_independent import patient_keys
from fhirsynth.timeline.types import Event, PatientInfo, Timeline

log = logging.getLogger("dp_smartnoise")

# Runs in the smartnoise-synth venv (--baseline-python). argv: in.csv out.csv method eps n seed kwargs-json.
# Both MST and AIM draw from numpy's global RNG, so it is seeded for a repeatable run.
BASELINE_SCRIPT = r"""
import json, sys, time, numpy as np, pandas as pd
from snsynth import Synthesizer
inp, out, method = sys.argv[1:4]
eps, n, seed, kwargs = float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), json.loads(sys.argv[7])
np.random.seed(seed)
df = pd.read_csv(inp).astype(str)
t = time.perf_counter()
synth = Synthesizer.create(method, epsilon=eps, verbose=False, **kwargs)
synth.fit(df, preprocessor_eps=0.0, categorical_columns=list(df.columns))
fit_s = time.perf_counter() - t
synth.sample(n).to_csv(out, index=False)
sys.stderr.write("FIT_SECONDS %.1f\n" % fit_s)
"""
# AIM's work grows with rounds x candidate marginals x model size; uncapped (16*d rounds over all 1,711 two-way
# marginals of the 59-column table) it does not finish in hours on 2 cores. These caps make one fit take
# 2-8 min on one niced core (measured): 80 budget shares (~0.9*d of them go to the one-way marginals, so at most
# ~27 adaptive rounds, fewer when AIM halves its noise), a seeded random 200 of the two-way marginals as the
# workload, and a 20 MB junction-tree model. MST has no knobs worth capping (it is fast).
BASELINE_KWARGS: dict[str, dict] = {"mst": {}, "aim": {"rounds": 80, "num_marginals": 200, "max_model_size": 20}}


def run_baseline(method: str, python: str, real_binned: pd.DataFrame, eps: float, n: int, work: Path,
                 seed: int = 1, prefix: str = "baseline") -> tuple[pd.DataFrame, float]:
    """Fit `method` on the integer table at eps in the smartnoise venv; returns (synthetic table, fit seconds).
    Files: work/{prefix}-in.csv and work/{prefix}-{method}-eps{eps}.csv. Cached: a finished output whose sidecar
    names the same input, method, settings and seed is reused."""
    inp, out = work / f"{prefix}-in.csv", work / f"{prefix}-{method}-eps{eps}.csv"
    text = real_binned.to_csv(index=False)
    if not inp.is_file() or inp.read_text() != text:
        tmp = inp.with_name(f".{inp.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, inp)
    kwargs = BASELINE_KWARGS.get(method, {})
    key = {"input_sha256": hashlib.sha256(text.encode()).hexdigest(), "method": method, "epsilon": eps, "n": n,
           "seed": seed, "kwargs": kwargs}
    side = out.with_suffix(".json")
    if out.is_file() and side.is_file() and json.loads(side.read_text()).get("key") == key:
        log.info("reusing %s", out)
        fit_s = json.loads(side.read_text()).get("fit_s", math.nan)
    else:
        tmp_out = out.with_name(f".{out.name}.tmp")
        t = time.perf_counter()
        proc = subprocess.run([python, "-c", BASELINE_SCRIPT, str(inp), str(tmp_out), method, str(eps), str(n),
                               str(seed), json.dumps(kwargs)], capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "baseline failed")
        fit_s = next((float(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("FIT_SECONDS")),
                     time.perf_counter() - t)
        os.replace(tmp_out, out)
        side.write_text(json.dumps({"key": key, "fit_s": fit_s}))
    return pd.read_csv(out).astype(int).reindex(columns=real_binned.columns), fit_s


# ---------------------------------------------------------------- per-patient code table (bench_calibrate)
Key = tuple[str, str, str]  # (kind, system, code), as dp_independent.patient_keys
SEXES = ("female", "male", "other", "unknown")  # FHIR administrative gender: a public domain
BAND_YEARS = 10
N_BANDS = 10  # 0-9, ..., 80-89, 90+; index N_BANDS = unknown (no birth date or no event)
TABLE_DAY = date(2020, 1, 1)  # the one day of every synthetic event (this peer has no times)


def choose_codes(timelines: list[Timeline], min_share: float = 0.01, max_codes: int = 120) -> list[Key]:
    """Codes held by >= min_share of the patients, the max_codes most common (ties by key). Exact counts of the
    training data: NOT privacy-accounted."""
    counts: dict[Key, int] = {}
    for tl in timelines:
        for k in patient_keys(tl):
            counts[k] = counts.get(k, 0) + 1
    floor = min_share * len(timelines)
    kept = sorted((k for k, c in counts.items() if c >= floor), key=lambda k: (-counts[k], k))
    return kept[:max_codes]


def age_band(tl: Timeline) -> int:
    """10-year band of the age at the patient's last event (any kind), 90+ in one band; N_BANDS if unknown."""
    birth = tl.patient.birth_date
    if birth is None or not tl.events:
        return N_BANDS
    last = max(e.time for e in tl.events).date()
    years = (last - birth).days / 365.25
    return int(min(max(years // BAND_YEARS, 0), N_BANDS - 1))


def code_column(i: int) -> str:
    return f"c{i:03d}"


def code_table(timelines: list[Timeline], codes: list[Key]) -> pd.DataFrame:
    """One row per patient: sex (index into SEXES), age (age_band), and code_column(i) = 1 when the patient
    holds codes[i] (any condition / observation event with it), else 0."""
    col_of = {k: i for i, k in enumerate(codes)}
    held = np.zeros((len(timelines), len(codes)), np.int64)
    for r, tl in enumerate(timelines):
        for k in patient_keys(tl):
            if k in col_of:
                held[r, col_of[k]] = 1
    sex = [SEXES.index(tl.patient.sex) if tl.patient.sex in SEXES else SEXES.index("unknown") for tl in timelines]
    table = pd.DataFrame({"sex": np.array(sex, np.int64), "age": np.array([age_band(t) for t in timelines],
                                                                          np.int64)})
    return pd.concat([table, pd.DataFrame(held, columns=[code_column(i) for i in range(len(codes))])], axis=1)


def table_timelines(table: pd.DataFrame, codes: list[Key], prefix: str = "mst",
                    day: date = TABLE_DAY) -> list[Timeline]:
    """code_table's rows back to timelines: one event per held code, all on `day`; sex from the row, birth date
    so that the age on `day` is the middle of the row's band (None for the unknown band)."""
    t = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
    held = table[[code_column(i) for i in range(len(codes))]].to_numpy() > 0
    out = []
    for r, (sex, band) in enumerate(zip(table["sex"].to_numpy(), table["age"].to_numpy())):
        band = int(band)
        birth = None if not 0 <= band < N_BANDS else date(day.year - band * BAND_YEARS - BAND_YEARS // 2,
                                                         day.month, day.day)
        info = PatientInfo(patient_id=f"{prefix}-{r}", sex=SEXES[int(sex)] if 0 <= int(sex) < len(SEXES) else None,
                           birth_date=birth)
        out.append(Timeline(info, [Event(time=t, kind=codes[j][0], system=codes[j][1], code=codes[j][2])
                                   for j in np.flatnonzero(held[r])]))
    return out
