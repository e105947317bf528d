"""Nothing from the training records is written into the model dir, the export, or served by the API.

End to end on fixtures/sample: ingest -> tiny DP model -> generate -> serve (a real server on loopback). Then
  * every identifying value of every input resource (resource ids, identifier values, names, address lines,
    phone numbers, e-mails) is looked for in every exported file, every model-dir file and every API response
    (all pages of every type, $everything of every patient, a Bulk $export download);
  * no synthetic patient reproduces a real patient's whole trajectory (the sequence of (code, day) pairs).
Matching is on whole JSON string values and the words inside them (not raw substrings: a 7-digit MRN would
otherwise "appear" inside some random UUID by chance).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from fhirsynth.timeline import fakes
from serverproc import running_server

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
N_SYNTHETIC = 120
_WORD = re.compile(r"[A-Za-z0-9@._'-]+")


def run_ok(*args: str | Path, timeout: float = 180) -> None:
    proc = subprocess.run([sys.executable, "-m", "fhirsynth", "-q", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]


def read_ndjson(path: Path) -> Iterator[dict]:
    data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    for line in data.splitlines():
        if line.strip():
            yield json.loads(line)


def strings(obj: object) -> Iterator[str]:
    """Every string (and number, as text) inside a JSON value."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from strings(v)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from strings(v)
    elif isinstance(obj, (str, int, float)) and not isinstance(obj, bool):
        yield str(obj)


def _human_names(obj: object) -> Iterator[object]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "name" and isinstance(v, list):
                yield v
            else:
                yield from _human_names(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _human_names(v)


class Haystack:
    """Whole string values plus the words they contain, from every document seen."""

    def __init__(self) -> None:
        self.values: set[str] = set()
        self.words: set[str] = set()
        self.name_words: set[str] = set()  # words inside HumanName values (given, family, text, ...)
        self.documents = 0

    def add(self, doc: object) -> None:
        self.documents += 1
        for s in strings(doc):
            self.values.add(s)
            self.words.update(_WORD.findall(s))
            self.words.update(s.split("/"))  # Type/id references
        for name in _human_names(doc):
            for s in strings(name):
                self.name_words.update(_WORD.findall(s))

    def leaks(self, needles: dict[str, str]) -> list[str]:
        found = []
        for needle, what in needles.items():
            if what == "Patient.name part":
                # one word of a real name counts as leaked where a name is written, not when "White" is a race
                # display or "Hall" part of some code text
                if needle in self.name_words:
                    found.append(f"{what}: {needle!r}")
            elif needle in self.values or needle in self.words:
                found.append(f"{what}: {needle!r}")
            elif " " in needle and any(needle in v for v in self.values):  # multi-word values: substring
                found.append(f"{what}: {needle!r}")
        return found


def public_name_words() -> set[str]:
    """Words the assembler's built-in fake lists may emit: a real record sharing a common first name with the
    public list is not a leak (the synthetic value provably came from the list, see fhirsynth/timeline/fakes.py)."""
    words: set[str] = set()
    for name in ("_GIVEN", "_FAMILY", "_STREETS", "_CITIES"):
        for s in strings(getattr(fakes, name, {})):
            words.update(s.split())
    return words


def training_identifiers(sample: Path) -> dict[str, str]:
    public = public_name_words()
    needles: dict[str, str] = {}
    for path in sorted(sample.glob("*.ndjson*")):
        for res in read_ndjson(path):
            needles[res["id"]] = f"{res['resourceType']}.id"
            if res["resourceType"] != "Patient":
                continue
            for ident in res.get("identifier", []):
                if len(ident.get("value", "")) >= 4:
                    needles[ident["value"]] = "Patient.identifier"
            for name in res.get("name", []):
                parts = [*name.get("given", []), name.get("family", "")]
                full = " ".join(p for p in parts if p)
                if full:
                    needles[full] = "Patient.name (full)"
                for p in parts:
                    if p and p not in public and len(p) >= 3:
                        needles[p] = "Patient.name part"
            for addr in res.get("address", []):
                for line in addr.get("line", []):
                    needles[line] = "Patient.address.line"
            for tel in res.get("telecom", []):
                if tel.get("value"):
                    needles[tel["value"]] = f"Patient.telecom ({tel.get('system')})"
    return needles


def trajectories(timelines_dir: Path) -> dict[str, tuple[tuple[str, str], ...]]:
    """patient -> the sorted sequence of (system|code, day) of all its events."""
    events = pq.read_table(timelines_dir / "events.parquet", columns=["patient_id", "time", "system", "code"])
    out: dict[str, list[tuple[str, str]]] = {}
    for pid, t, system, code in zip(*(events.column(c).to_pylist() for c in events.column_names), strict=True):
        out.setdefault(pid, []).append((f"{system}|{code}", t.date().isoformat()))
    return {pid: tuple(sorted(seq)) for pid, seq in out.items() if seq}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, fixtures_dir: Path) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("noleak")
    run_ok("ingest", fixtures_dir / "sample", "--out", work / "real")
    run_ok("train", work / "real", "--out", work / "model", "--epsilon", "8", "--epochs", "2", "--batch-size",
           "16", "--d-model", "16", "--layers", "1", "--heads", "2", "--max-len", "128", "--device", "cpu",
           "--reference-date", "2025-01-01", timeout=300)
    run_ok("generate", work / "model", "-n", str(N_SYNTHETIC), "--out", work / "export", "--seed", "3",
           "--device", "cpu")
    return {"real": work / "real", "model": work / "model", "export": work / "export", "work": work}


@pytest.fixture(scope="module")
def server(pipeline: dict[str, Path]):
    env = {k: v for k, v in ENV.items() if k != "FHIRSYNTH_SERVER_TOKEN"}
    with running_server(["--data", pipeline["export"], "--db", pipeline["work"] / "store.sqlite"], env) as srv:
        yield srv.base


@pytest.fixture(scope="module")
def needles(fixtures_dir: Path) -> dict[str, str]:
    found = training_identifiers(fixtures_dir / "sample")
    # the collection itself must work, or the test below would pass vacuously
    kinds = set(found.values())
    assert len(found) > 1000, len(found)
    for kind in ("Patient.id", "Condition.id", "Observation.id", "Patient.identifier", "Patient.name (full)",
                 "Patient.address.line", "Patient.telecom (phone)", "Patient.telecom (email)"):
        assert kind in kinds, (kind, sorted(kinds))
    return found


def test_identifiers_are_findable_in_the_input(fixtures_dir: Path, needles: dict[str, str]) -> None:
    """The matcher finds the real identifiers in the real data (so "no leak" below is not a matcher bug)."""
    hay = Haystack()
    for res in read_ndjson(fixtures_dir / "sample" / "Patient.ndjson.gz"):
        hay.add(res)
    leaked = hay.leaks({k: v for k, v in needles.items() if v.startswith("Patient")})
    assert len(leaked) >= 80 * 4, len(leaked)


def test_no_identifier_in_export_or_model_dir(pipeline: dict[str, Path], needles: dict[str, str]) -> None:
    hay = Haystack()
    manifest = json.loads((pipeline["export"] / "manifest.json").read_text())
    hay.add(manifest)
    for o in manifest["output"]:
        for res in read_ndjson(pipeline["export"] / o["url"]):
            hay.add(res)
    for path in pipeline["model"].iterdir():
        if path.suffix in (".json", ".csv"):
            hay.add(json.loads(path.read_text()) if path.suffix == ".json" else path.read_text())
    assert hay.documents > N_SYNTHETIC
    # model.pt holds tensors only (weights_only load proves no pickled objects); its raw bytes hold no id text
    raw = (pipeline["model"] / "model.pt").read_bytes()
    ids_in_weights = [n for n, what in needles.items() if what.endswith(".id") and n.encode() in raw]
    assert ids_in_weights == []
    assert hay.leaks(needles) == []


def _get_all_pages(client: httpx.Client, url: str, params: dict) -> Iterator[dict]:
    resp = client.get(url, params=params)
    while True:
        assert resp.status_code == 200, resp.text[:300]
        bundle = resp.json()
        yield bundle
        nxt = next((ln["url"] for ln in bundle.get("link", []) if ln["relation"] == "next"), None)
        if nxt is None:
            return
        resp = client.get(nxt)


def test_no_identifier_served_by_the_api(server: str, pipeline: dict[str, Path], needles: dict[str, str]) -> None:
    hay = Haystack()
    patient_ids: list[str] = []
    with httpx.Client(timeout=60) as client:
        meta = client.get(f"{server}/metadata").json()
        hay.add(meta)
        types = [r["type"] for r in meta["rest"][0]["resource"]]
        served = 0
        for rtype in types:
            for bundle in _get_all_pages(client, f"{server}/{rtype}", {"_count": 200}):
                hay.add(bundle)
                for e in bundle.get("entry", []):
                    served += 1
                    if rtype == "Patient":
                        patient_ids.append(e["resource"]["id"])
        assert len(patient_ids) == N_SYNTHETIC
        for pid in patient_ids:
            for bundle in _get_all_pages(client, f"{server}/Patient/{pid}/$everything", {}):
                hay.add(bundle)
        # Bulk $export: kick off, poll, download every file
        kick = client.get(f"{server}/$export", headers={"Prefer": "respond-async"})
        assert kick.status_code == 202, kick.text
        status_url = kick.headers["content-location"]
        for _ in range(300):
            poll = client.get(status_url)
            if poll.status_code == 200:
                break
            assert poll.status_code == 202, poll.text
            time.sleep(0.1)
        manifest = poll.json()
        hay.add(manifest)
        exported = 0
        for o in manifest["output"]:
            body = client.get(o["url"])
            assert body.status_code == 200
            for line in body.content.splitlines():
                if line.strip():
                    hay.add(json.loads(line))
                    exported += 1
        assert exported == served
    assert hay.leaks(needles) == []


def test_no_synthetic_patient_reproduces_a_real_trajectory(pipeline: dict[str, Path]) -> None:
    real = trajectories(pipeline["real"])
    assert len(real) >= 70  # every sample patient has events
    synth_dir = pipeline["work"] / "synthetic-timelines"
    run_ok("ingest", pipeline["export"], "--out", synth_dir)
    synthetic = trajectories(synth_dir)
    assert len(synthetic) >= N_SYNTHETIC // 2
    real_set = set(real.values())
    copies = [pid for pid, seq in synthetic.items() if seq in real_set]
    assert copies == [], f"{len(copies)} synthetic patients copy a real trajectory exactly"
    # and no synthetic patient has a real patient's exact event set on the same days for >= 5 events
    long_real = {seq for seq in real_set if len(seq) >= 5}
    assert not any(seq in long_real for seq in synthetic.values())
