"""Issue 15: DP measurements at train time (measurements.py) and calibration at generate time (calibrate.py)."""

from __future__ import annotations

import json
import math
import shutil
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from test_model_helpers import CodeVocab

from fhirsynth.cli import main
from fhirsynth.model import measurements as ms
from fhirsynth.model.calibrate import calibrate, inclusion, systematic_draw, targets
from fhirsynth.model.dpnoise import NoiseSource, gaussian_epsilon, gaussian_sigma
from fhirsynth.timeline.types import Event, PatientInfo, Timeline

T0 = datetime(2020, 1, 1, tzinfo=timezone.utc)
A = ("condition", "http://snomed.info/sct", "1001")
B = ("condition", "http://snomed.info/sct", "1002")
C = ("observation", "http://loinc.org", "1003-1")


def patient(i: int, codes, *, sex: str = "female", born: int = 1970, dead: bool = False, visits: int = 1) -> Timeline:
    evs = [Event(time=T0 + timedelta(days=d), kind=k, system=s, code=c, encounter_id=f"e{i}-{d}")
           for d in range(visits) for (k, s, c) in codes]
    return Timeline(PatientInfo(f"p{i}", sex=sex, birth_date=date(born, 1, 1), deceased=dead), evs)


def cohort(n: int, share_a: float, seed: int = 0) -> list[Timeline]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        codes = [C] + ([A] if rng.random() < share_a else []) + ([B] if rng.random() < 0.5 else [])
        out.append(patient(i, codes, sex="female" if i % 2 else "male", born=1950 + i % 60, dead=i % 5 == 0,
                           visits=1 + i % 7))
    return out


# ---------------------------------------------------------------- measurements
def test_exact_measurements_count_the_patients():
    tls = cohort(200, 0.3)
    doc, rep = ms.measure(tls, CodeVocab([A, B, C]), dp=False, epsilon=None, delta=None,
                          noise=NoiseSource.reproducible(1))
    assert rep["epsilon"] is None and rep["mechanism"].startswith("exact")
    fam = doc["families"]
    assert sum(fam["cells"]["counts"]) == 200
    by_cell = np.asarray(fam["prevalence_cells"]["counts"]).reshape(ms.N_CELLS, 3)
    assert by_cell.sum(axis=0).tolist() == fam["prevalence"]["counts"]
    prev = np.asarray(fam["prevalence"]["counts"])
    assert prev.tolist() == [sum(any((e.kind, e.system, e.code) == c for e in t.events) for t in tls) for c in (A, B, C)]
    assert sum(fam["death"]["counts"]) == 40
    assert sum(fam["visits"]["counts"]) == 200 and sum(fam["events"]["counts"]) == 200
    assert ms.bucket(7) == ms.bucket(5) != ms.bucket(8)
    assert fam["visits"]["counts"][ms.bucket(7)] == sum(1 for i in range(200) if 5 <= 1 + i % 7 <= 7)
    # C is held by everyone (> 95%): not a pair code; A and B are, and "both absent" counts patients lacking both
    spec = ms.Spec.from_json(doc["spec"])
    assert set(spec.pair_codes) == {A, B}
    lack_both = sum(not any((e.kind, e.system, e.code) in (A, B) for e in t.events) for t in tls)
    assert fam["pairs_absent"]["counts"] == [lack_both]


def test_contribution_is_bounded():
    codes = [("condition", "s", str(i)) for i in range(20)]
    spec = ms.Spec(codes=codes, max_codes=5, pair_codes=codes[:8], max_absent=3)
    q = ms.patient_queries(patient(0, []), spec)  # holds nothing: lacks all 8 pair codes
    assert len(q["prevalence"]) == 0 and len(q["pairs_absent"]) == 3  # pairs of its first 3 absent codes only
    q = ms.patient_queries(patient(1, codes), spec)
    assert len(q["prevalence"]) == 5 and q["pairs_absent"] == []
    sens = spec.sensitivities()
    assert sens["prevalence"] == pytest.approx(math.sqrt(5)) and sens["pairs_absent"] == pytest.approx(math.sqrt(3))


def test_noise_scale_and_accounting():
    tls = cohort(300, 0.3)
    codes = [A, B, C] + [("observation", "http://loinc.org", f"x-{i}") for i in range(400)]
    eps, delta = 1.0, 1e-6
    doc, rep = ms.measure(tls, CodeVocab(codes), dp=True, epsilon=eps, delta=delta, noise=NoiseSource.reproducible(7))
    sigma0 = gaussian_sigma(eps, delta, 1.0)
    assert rep["sigma0"] == pytest.approx(sigma0)
    for f, v in doc["families"].items():
        assert v["sigma"] == pytest.approx(v["sensitivity"] * sigma0 / math.sqrt(ms.RHO_SHARES[f]))
    # the rho shares add up to the whole: OpenDP gives back the measurement's epsilon, not more
    assert sum(ms.RHO_SHARES.values()) == pytest.approx(1.0)
    assert rep["epsilon_check"] == pytest.approx(eps, rel=1e-6)
    assert gaussian_epsilon(1 / math.sqrt(2 * ms.total_rho(doc)), delta, 1.0) <= eps * (1 + 1e-6)
    # the noise really has that scale: 403 codes x 8 cells
    exact = ms.exact_counts(tls, ms.Spec.from_json(doc["spec"]), ("prevalence_cells",))["prevalence_cells"]
    diff = np.asarray(doc["families"]["prevalence_cells"]["counts"]) - exact
    assert np.std(diff) == pytest.approx(doc["families"]["prevalence_cells"]["sigma"], rel=0.1)


# ---------------------------------------------------------------- calibration
def test_calibration_moves_a_known_pool_to_known_targets():
    real = cohort(1000, 0.8, seed=1)  # 80% hold A
    doc, _ = ms.measure(real, CodeVocab([A, B, C]), dp=False, epsilon=None, delta=None,
                        noise=NoiseSource.reproducible(1))
    pool = cohort(1000, 0.3, seed=2)  # the "model" gives A to 30%
    out, rep = calibrate(pool, doc, 200, seed=3)
    share = sum(any((e.kind, e.system, e.code) == A for e in t.events) for t in out) / len(out)
    assert 0.74 <= share <= 0.86  # 0.3 before
    # per (sex, age band) cell, in shares of all patients: ~ (0.8 - 0.3) x the cell share before
    assert rep["before"]["prevalence_cells"] > 0.08 and rep["after"]["prevalence_cells"] < 0.01
    assert rep["before"]["prevalence"] > 0.45 and rep["after"]["prevalence"] < 0.01
    assert len({id(t) for t in out}) == 200  # never the same pooled patient twice
    # deterministic given the seed
    again, _ = calibrate(pool, doc, 200, seed=3)
    assert [t.patient.patient_id for t in again] == [t.patient.patient_id for t in out]


def test_targets_clip_noise_and_tolerance_follows_sigma():
    doc, _ = ms.measure(cohort(100, 0.5), CodeVocab([A, B, C]), dp=True, epsilon=0.5, delta=1e-6,
                        noise=NoiseSource.reproducible(3))
    tg = targets(doc)
    assert tg.target.min() >= 0 and tg.target.max() <= 1
    lo, hi = tg.offsets["prevalence"]
    assert tg.scale[lo] == pytest.approx(doc["families"]["prevalence"]["sigma"] / tg.n_hat)


def test_systematic_draw_has_no_duplicates_and_follows_the_weights():
    w = np.array([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    pi = inclusion(w, 3)
    assert pi.sum() == pytest.approx(3) and pi.max() <= 1 and pi[0] == 1.0
    rng = np.random.default_rng(0)
    hits = np.zeros(6)
    for _ in range(4000):
        idx = systematic_draw(pi, 3, rng)
        assert len(set(idx.tolist())) == 3
        hits[idx] += 1
    assert np.allclose(hits / 4000, pi, atol=0.03)


# ---------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from fhirsynth.model.tiny import train_tiny_model

    return train_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_privacy_parts_are_their_shares_and_are_recomputed(tiny):
    from opacus.accountants import PRVAccountant, RDPAccountant

    p = json.loads((tiny / "privacy.json").read_text())
    m = p["measurements"]
    assert m["file"] == "measurements.json" and (tiny / "measurements.json").is_file()
    assert p["epsilon_measurements"] == m["epsilon"] and p["delta_measurements"] == m["delta"]
    assert p["epsilon_total"] <= p["epsilon_target"] * (1 + 1e-9)
    # the measurements hold their share (0.2 by default) of the zCDP budget of the target, recomputed here
    from opacus.accountants.analysis.rdp import get_privacy_spent

    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [80, 96, 128, 192, 256, 384, 512, 1024]
    lo, hi, d_plan = 0.0, 10.0, p["delta"] - p["delta_preprocessing"]
    for _ in range(60):  # the rho whose conversion at d_plan is the target
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if get_privacy_spent(orders=orders, rdp=[a * mid for a in orders],
                                                delta=d_plan)[0] <= p["epsilon_target"] else (lo, mid)
    doc0 = json.loads((tiny / "measurements.json").read_text())
    assert ms.total_rho(doc0) == pytest.approx(0.2 * lo, rel=5e-3)
    history = [(p["noise_multiplier"], p["sample_rate"], p["steps"])]
    prv, rdp = PRVAccountant(), RDPAccountant()
    prv.history, rdp.history = list(history), list(history)
    assert max(prv.get_epsilon(p["delta_conversion"]), rdp.get_epsilon(p["delta_conversion"])) == pytest.approx(
        p["epsilon_training"], rel=1e-6)
    doc = json.loads((tiny / "measurements.json").read_text())
    assert ms.epsilon_check(doc, p["delta_measurements"]) <= p["epsilon_measurements"] * (1 + 1e-6)


def _generate(model: Path, out: Path, *extra: str) -> dict[str, bytes]:
    rc = main(["generate", str(model), "-n", "12", "--out", str(out), "--device", "cpu", "--seed", "4", *extra])
    assert rc == 0
    # Provenance records the generation time; everything else is a function of model, seed and options
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.suffix == ".ndjson" and p.name != "Provenance.ndjson"}


def test_generate_calibrates_by_default_and_is_deterministic(tiny, tmp_path, caplog):
    caplog.set_level("INFO")
    a = _generate(tiny, tmp_path / "a")
    assert "calibration: pool 60 -> 12 patients" in caplog.text
    assert len(a["Patient.ndjson"].splitlines()) == 12
    assert _generate(tiny, tmp_path / "b") == a
    caplog.clear()
    plain = _generate(tiny, tmp_path / "c", "--no-calibrate")
    assert "calibration:" not in caplog.text and len(plain["Patient.ndjson"].splitlines()) == 12
    assert plain != a


def test_model_without_measurements_still_generates(tiny, tmp_path, caplog):
    old = tmp_path / "old"
    shutil.copytree(tiny, old)
    (old / "measurements.json").unlink()
    caplog.set_level("INFO")
    out = _generate(old, tmp_path / "o")
    assert "holds no measurements" in caplog.text and len(out["Patient.ndjson"].splitlines()) == 12


def test_broken_measurements_are_a_clear_error(tiny, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    (bad / "measurements.json").write_text('{"format": 0}')
    rc = main(["generate", str(bad), "-n", "2", "--out", str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc != 0 and "measurements.json" in err and "retrain" in err and "Traceback" not in err


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_synthesize_calibrates_without_constraints(tiny, tmp_path, fixtures_dir, caplog):
    from fastapi.testclient import TestClient

    from fhirsynth.api.app import create_app
    from fhirsynth.api.settings import ServerSettings
    from fhirsynth.store.loader import build_store

    store, _ = build_store(fixtures_dir / "server" / "export", tmp_path / "s.db")
    caplog.set_level("INFO")
    with TestClient(create_app(ServerSettings(db_path=tmp_path / "s.db", model_dir=tiny), store=store)) as c:
        r = c.post("/Patient/$synthesize", params={"count": 3, "seed": 2})
        assert r.status_code == 201, r.text
        assert sum(e["resource"]["resourceType"] == "Patient" for e in r.json()["entry"]) == 3
        assert "calibration: pool 15 -> 3 patients" in caplog.text
        caplog.clear()
        r = c.post("/Patient/$synthesize", params={"count": 2, "seed": 2, "sex": "male"})
        assert r.status_code == 201 and "calibration:" not in caplog.text


@pytest.mark.parametrize("value", ["1.5", "-0.1", "0.75"])
def test_bad_measurement_share_is_one_line_exit_2(tmp_path, capsys, value):
    from fhirsynth.timeline.io import write_timelines

    write_timelines(cohort(5, 0.5), tmp_path / "tl")
    rc = main(["train", str(tmp_path / "tl"), "--out", str(tmp_path / "m"), "--measure-epsilon-fraction", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--measure-epsilon-fraction" in err[0]
    assert not (tmp_path / "m").exists()


def test_calibration_accepts_a_negative_seed():
    """`generate --seed -1` and $synthesize?seed=-1 are accepted (the sampler folds the seed mod 2^63): the
    calibrated draw must not fail on numpy's non-negative seed rule."""
    real = cohort(200, 0.8, seed=1)
    doc, _ = ms.measure(real, CodeVocab([A, B, C]), dp=False, epsilon=None, delta=None,
                        noise=NoiseSource.reproducible(1))
    pool = cohort(100, 0.3, seed=2)
    out, _ = calibrate(pool, doc, 20, seed=-1 * 1_000_003)
    again, _ = calibrate(pool, doc, 20, seed=-1 * 1_000_003)
    assert len(out) == 20 and out == again  # the same draw and the same repair


def test_constrained_generate_reads_the_measurements_only_for_the_record_start(tiny, tmp_path, capsys):
    """--sex / --age / --condition never calibrate (the measurements describe the whole cohort), but the record
    start draws from the per-cell first-visit histogram: a broken measurements.json is then a clear error naming
    the file, and with --no-record-start the file is not read at all."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    (bad / "measurements.json").write_text('{"format": 0}')
    args = ["generate", str(bad), "-n", "2", "--device", "cpu", "--sex", "female"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    assert "measurements.json: measurements format 0" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "o2"), "--no-record-start"]) == 0


@pytest.mark.parametrize("breakage", ["no_sigma", "text_count"])
def test_measurements_missing_what_calibration_reads_are_a_clear_error(tmp_path, breakage):
    from fhirsynth.errors import ModelDirError

    doc, _ = ms.measure(cohort(50, 0.5), CodeVocab([A, B, C]), dp=False, epsilon=None, delta=None,
                        noise=NoiseSource.reproducible(1))
    if breakage == "no_sigma":
        del doc["families"]["prevalence"]["sigma"]
    else:
        doc["families"]["visits"]["counts"][0] = "many"
    (tmp_path / "measurements.json").write_text(json.dumps(doc))
    with pytest.raises(ModelDirError, match="unreadable measurements"):
        ms.load(tmp_path)


def test_calibrated_chunks_are_drawn_from_their_own_pool_and_numbered(tiny, monkeypatch, caplog):
    """n = 12 in chunks of 5 (5, 5, 2), each drawn from the next pool_factor x chunk sampled patients of the same
    seed; ids syn-<seed>-<index> in output order."""
    from fhirsynth.model import calibrate as cb
    from fhirsynth.model.sampler import sample_timelines

    def content(tl: Timeline):
        return (repr(tl.events), tl.patient.sex, tl.patient.birth_date, tl.patient.deceased)

    monkeypatch.setattr(cb, "CALIBRATION_CHUNK", 5)
    doc = ms.load(tiny)
    caplog.set_level("INFO", logger=cb.log.name)
    sample = {"seed": 9, "device": "cpu"}
    out = list(cb.calibrated_timelines(tiny, 12, doc, 2, sample, repair=False))  # repair would edit the draws
    assert [t.patient.patient_id for t in out] == [f"syn-9-{i}" for i in range(12)]
    stream = [content(t) for t in sample_timelines(tiny, 24, seed=9, device="cpu")]
    for lo, hi in ((0, 5), (5, 10), (10, 12)):
        pool = stream[2 * lo: 2 * hi]
        assert all(content(t) in pool for t in out[lo:hi]), (lo, hi)
    messages = [r.getMessage() for r in caplog.records if r.name == cb.log.name]
    assert [m.split(" patients")[0] for m in messages] == ["calibration: pool 10 -> 5", "calibration: pool 10 -> 5",
                                                           "calibration: pool 4 -> 2"]


def test_uncalibrated_generation_passes_the_sampling_options_on(tiny):
    """A constraint (here sex) turns calibration off: the sampler must still get the constraint and the seed."""
    from fhirsynth.model.calibrate import generated_timelines
    from fhirsynth.model.sampler import sample_timelines

    sample = {"seed": 7, "device": "cpu", "sex": "male"}
    got = list(generated_timelines(tiny, 6, sample))
    assert {t.patient.sex for t in got} == {"male"}
    want = list(sample_timelines(tiny, 6, seed=7, device="cpu", sex="male"))
    assert [repr(t.events) for t in got] == [repr(t.events) for t in want]
