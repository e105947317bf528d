"""report.html a user can read: verdicts per area against the holdout reference, compared generators as columns,
a privacy-utility curve, matplotlib figures embedded, strict HTML5, rendered by a real browser."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
from pathlib import Path

import html5lib  # a declared dev dependency: missing, the suite fails rather than skips
import pytest

from fhirsynth.cli import main
from fhirsynth.evaluate.report import evaluate
from fhirsynth.evaluate.toy import toy_timelines
from fhirsynth.evaluate.verdict import FAR, NEAR, WITHIN, add_verdicts, area_verdicts, judge
from fhirsynth.timeline.io import read_timelines, write_timelines

PREFACE = ["This report compares <b>synthetic</b> patients & real ones.", "Second paragraph."]


def _toy(root: Path, name: str, n: int, seed: int) -> Path:
    write_timelines(toy_timelines(n, seed=seed, visits_per_year=0.6, id_prefix=name[:2]), root / name)
    return root / name


def _export(root: Path, name: str, n: int, seed: int, epsilon: float) -> Path:
    from fhirsynth.export import writer
    from fhirsynth.timeline.assembler import GeneratorInfo

    src = _toy(root, f"{name}-timelines", n, seed)
    writer.write_export(list(read_timelines(src)), root / name,
                        generator=GeneratorInfo(model_hash="test", epsilon=epsilon, delta=1e-5))
    return root / name


@pytest.fixture(scope="module")
def held(tmp_path_factory) -> dict:
    """A demo-sized run (80 real / 100 synthetic) with a holdout: the synthetic data an export made at epsilon 8,
    compared with a peer export made at epsilon 3 (two epsilon: a privacy-utility curve)."""
    root = tmp_path_factory.mktemp("reporthtml")
    real, hold = _toy(root, "real", 80, 61), _toy(root, "holdout", 40, 62)
    synth = _export(root, "synthetic", 100, 63, 8.0)
    peer = _export(root, "eps3", 30, 64, 3.0)
    (root / "preface.txt").write_text("\n\n".join(PREFACE) + "\n", encoding="utf-8")
    # through the CLI, so --compare LABEL=DIR and --preface-file are exercised too
    assert main(["evaluate", "--real", str(real), "--synthetic", str(synth), "--holdout", str(hold),
                 "--out", str(root / "report"), "--validity-sample", "5", "--compare", f"peer-eps3={peer}",
                 "--preface-file", str(root / "preface.txt")]) == 0
    report = json.loads((root / "report" / "report.json").read_text(encoding="utf-8"))
    return {"root": root, "report": report, "html": (root / "report" / "report.html").read_text(encoding="utf-8"),
            "path": root / "report" / "report.html"}


@pytest.fixture(scope="module")
def unheld(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reportnohold")
    real, synth = _toy(root, "real", 40, 71), _toy(root, "synthetic", 40, 72)
    report = evaluate(real, synth, out_dir=root / "report", validity_sample=3)
    return {"report": report, "html": (root / "report" / "report.html").read_text(encoding="utf-8")}


# ---------------------------------------------------------------- the rule
def test_verdict_rule_known_answers():
    # agreement (R², higher is better): gap = how much farther from 1 than the reference
    assert judge("agreement", 0.97, 0.96)["word"] == WITHIN  # better than the reference
    assert judge("agreement", 0.92, 0.96)["word"] == WITHIN  # gap 0.04 <= 0.05
    assert judge("agreement", 0.86, 0.96)["word"] == NEAR  # gap 0.10
    assert judge("agreement", 0.50, 0.96)["word"] == FAR
    # auc: 0.5 is ideal from either side
    assert judge("auc", 0.40, 0.52)["word"] == NEAR and judge("auc", 0.60, 0.48)["word"] == NEAR
    assert judge("auc", 0.80, 0.50)["word"] == FAR
    # rates: lower is better, tight tolerances
    assert judge("rate", 0.012, 0.004)["word"] == WITHIN and judge("rate", 0.03, 0.0)["word"] == NEAR
    # sampling noise: the reference inside the value's 95% interval, or the value inside the null range
    assert judge("agreement", 0.50, 0.96, interval=[0.3, 0.97])["word"] == WITHIN
    assert judge("agreement", 0.86, 0.95, basis_range=[0.85, 0.99])["word"] == WITHIN
    assert judge("agreement", 0.80, 0.95, basis_range=[0.85, 0.99])["word"] == NEAR
    # nothing to compare, or no rule for the kind: no verdict rather than a made-up one
    assert judge("agreement", None, 0.9) is None and judge("agreement", 0.9, None) is None
    assert judge(None, 0.9, 0.9) is None and judge("agreement", math.nan, 0.9) is None


def test_area_verdict_is_its_worst_row_and_counts_the_rest():
    rows = [{"group": "fidelity", "kind": "distance", "synthetic": v, "reference": 0.1} for v in (0.1, 0.2, 0.5)]
    rows.append({"group": "fidelity", "kind": "distance", "synthetic": None, "reference": 0.1})
    rows.append({"group": "privacy", "kind": "auc", "synthetic": 0.51, "reference": None,
                 "fallback": {"name": "chance", "value": 0.5}})
    add_verdicts(rows)
    areas = area_verdicts(rows)
    assert [r["verdict"]["word"] for r in rows[:3]] == [WITHIN, NEAR, FAR] and rows[3]["verdict"] is None
    assert areas["fidelity"] == {"word": FAR, WITHIN: 1, NEAR: 1, FAR: 1, "not_judged": 1}
    assert areas["privacy"]["word"] == WITHIN and rows[4]["verdict"]["basis"] == "chance"
    assert areas["utility"]["word"] is None


# ---------------------------------------------------------------- the report
def test_reference_column_holds_only_holdout_values(held):
    report = held["report"]
    rows = {r["metric"]: r for r in report["summary"]}
    pl = report["plausibility"]
    assert rows["Events before birth (event rate)"]["reference"] == pl["holdout"]["events_before_birth"]["event_rate"]
    assert rows["Events before birth (event rate)"]["extras"] == {"real data": pl["real"]["events_before_birth"]
                                                                  ["event_rate"]}
    assert rows["Condition prevalence R²"]["reference"] == \
        report["fidelity"]["holdout"]["prevalence"]["condition"]["r2"]
    # the formal row carries delta as another figure, never as a reference
    assert rows["Formal ε (δ)"]["reference"] is None and "δ" in rows["Formal ε (δ)"]["extras"]
    assert rows["FHIR validity rate"]["reference"] is None and rows["FHIR validity rate"]["group"] == "validity"
    judged = [r for r in report["summary"] if r.get("verdict")]
    assert len(judged) >= 20 and {r["verdict"]["word"] for r in judged} <= {WITHIN, NEAR, FAR}
    # with a holdout, a verdict is against the holdout wherever the row has a holdout value
    assert all(r["verdict"]["basis"] == "holdout" for r in judged if r.get("reference") is not None)


def test_html_is_strict_html5(held, unheld):
    for html in (held["html"], unheld["html"]):
        parser = html5lib.HTMLParser(strict=True)
        parser.parse(html)  # raises ParseError on the first error
        assert not parser.errors


def test_verdicts_lead_and_preface_is_escaped(held):
    html = held["html"]
    top = html[:html.index("<h2>Summary")]
    assert "&lt;b&gt;synthetic&lt;/b&gt; patients &amp; real ones." in top and "<b>synthetic</b>" not in top
    assert top.index("Second paragraph.") < top.index("<h2>Verdict")
    verdict = top[top.index("<h2>Verdict"):]
    for area in ("fidelity", "utility", "privacy", "plausibility", "validity"):
        assert f"<th class='a'>{area}</th>" in verdict
    # a colour and a word for every judged cell
    cells = re.findall(r"<td class='n (within|near|far)'[^>]*>.*?<span class='word'>(\w+)</span>", html)
    assert cells and all(cls == word for cls, word in cells)


def test_compare_columns_and_privacy_utility_curve(held):
    report, html = held["report"], held["html"]
    assert list(report["compare"]) == ["peer-eps3"]
    assert report["compare"]["peer-eps3"]["meta"]["epsilon"] == 3.0 and report["meta"]["synthetic"]["epsilon"] == 8.0
    assert report["compare"]["peer-eps3"]["meta"]["patients"] == 30
    main_metrics = [r["metric"] for r in report["summary"]]
    assert [r["metric"] for r in report["compare"]["peer-eps3"]["summary"]][:15] == main_metrics[:15]
    # the peer's fidelity is its own (30 patients), not a copy of the main column's
    assert report["compare"]["peer-eps3"]["summary"][0]["synthetic"] != report["summary"][0]["synthetic"]
    summary = html[html.index("<h2>Summary"):html.index("<h2>Fidelity")]
    assert "<th>peer-eps3</th>" in summary and "<th>peer-eps3</th>" in html[:html.index("<h2>Summary")]
    assert "<h2>Privacy-utility curve</h2>" in summary and 'alt="privacy-utility curve' in summary


def test_without_holdout_the_report_says_so_once(unheld):
    html = unheld["html"]
    assert html.count("No holdout was given") == 1
    callout = html[html.index("No holdout was given"):html.index("<h2>Summary")]
    assert "MIA record-distance AUC" in callout and "DCR share closer to training" in callout
    from fhirsynth.evaluate.records import RECORD_ROWS
    from fhirsynth.evaluate.summary import HEADLINE_FIDELITY

    # every fidelity row takes its reference there (the records table's: the training patients against it)
    assert f"fidelity: all {len(HEADLINE_FIDELITY) + len(RECORD_ROWS)} rows" in callout
    assert "Near-copy rate" in callout and "Exact trajectory copies" in callout
    table = html[html.index("<h2>Summary"):html.index("<h2>Fidelity")]
    assert "needs --holdout" not in table
    # rows with a fallback are still judged, and say against what
    rows = {r["metric"]: r for r in unheld["report"]["summary"]}
    assert rows["Events before birth (event rate)"]["verdict"]["basis"] == "real data"


def test_figures_are_embedded_pngs_with_axes(held):
    from PIL import Image

    imgs = re.findall(r'<img class="fig" src="data:image/png;base64,([^"]+)" alt="([^"]+)"', held["html"])
    assert len(imgs) >= 8  # 4 scatter + 4 histograms (+ the curve)
    for data, alt in imgs:
        im = Image.open(io.BytesIO(base64.b64decode(data)))
        assert im.width >= 300 and im.height >= 250, alt
    assert any("log scale" in alt or "histogram" in alt for _, alt in imgs)


def test_demo_size_report_is_under_2mb(held):
    assert held["report"]["meta"]["real"]["patients"] == 80
    assert held["report"]["meta"]["synthetic"]["patients"] == 100 and held["report"]["meta"]["synthetic"]["export"]
    assert held["path"].stat().st_size < 2_000_000


def _browser() -> str | None:
    for name in (os.environ.get("FHIRSYNTH_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def test_renders_in_headless_chromium(held, tmp_path):
    from playwright import sync_api as pw  # a dev dependency: installed by setup, never skipped
    exe = _browser()
    if exe is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set FHIRSYNTH_CHROMIUM)")
    problems: list[str] = []
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1366, "height": 768})  # a common laptop screen
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.goto(held["path"].as_uri())
        broken = page.evaluate("Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
                               ".map(i => i.alt)")
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert not problems, problems
    assert not broken, f"images that did not decode: {broken}"
    assert overflow <= 0, f"page is {overflow}px wider than a 1366px screen"
    assert (tmp_path / "report.png").stat().st_size > 50_000


# ---------------------------------------------------------------- the CLI
def test_cli_compare_and_preface_errors_exit_2(held, tmp_path, capsys):
    root = held["root"]
    base = ["evaluate", "--real", str(root / "real"), "--synthetic", str(root / "synthetic"), "--out",
            str(tmp_path / "o")]
    assert main(base + ["--compare", f"peer={tmp_path / 'missing'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compare" in err[0] and "missing" in err[0]
    assert main(base + ["--compare", f"x={root / 'eps3'}", "--compare", f"x={root / 'synthetic'}"]) == 2
    assert "'x' is already used" in capsys.readouterr().err
    assert main(base + ["--preface-file", str(tmp_path / "nope.txt")]) == 2
    err = capsys.readouterr().err
    assert "--preface-file" in err and "nope.txt" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "report.json").exists()


def test_cli_preface_file_paragraphs(tmp_path):
    from fhirsynth.commands.evaluate import parse_compare, read_preface

    f = tmp_path / "preface.txt"
    f.write_text("First line\nsame paragraph.\n  \nSecond <paragraph>.\n\n\n", encoding="utf-8")
    assert read_preface(f) == ["First line same paragraph.", "Second <paragraph>."]
    assert parse_compare("model-b=/x/export") == ("model-b", Path("/x/export"))
    assert parse_compare("/x/peer-export") == ("peer-export", Path("/x/peer-export"))


def test_report_json_keeps_compare_and_preface(held):
    report = json.loads((held["path"].parent / "report.json").read_text())
    assert report["meta"]["preface"] == PREFACE
    assert set(report["compare"]) == {"peer-eps3"}


def test_bench_study_writes_study_html_with_the_same_code(held, tmp_path):
    from bench_module import benchmark_module

    bench = benchmark_module("bench_study")
    for eps in ("1.0", "inf"):
        (tmp_path / f"report-eps{eps}").mkdir()
        shutil.copy(held["path"].parent / "report.json", tmp_path / f"report-eps{eps}" / "report.json")
    md = bench.summarize(tmp_path)
    assert "| Condition prevalence R² |" in md
    html = (tmp_path / "study.html").read_text(encoding="utf-8")
    html5lib.HTMLParser(strict=True).parse(html)
    assert "<th>ε=1</th>" in html and "<th>ε=∞ (no DP)</th>" in html
    assert "<h2>Privacy-utility curve</h2>" in html and "(ε=∞)" in html
    assert re.search(r"<td class='n (within|near|far)'", html)


def test_readme_states_the_rule_the_code_applies():
    from fhirsynth.evaluate.verdict import KINDS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Reading the report"):]
    for kind, rule in KINDS.items():
        row = re.search(rf"^\| {kind} \|[^|]*\| gap ≤ ([0-9.]+) \| gap ≤ ([0-9.]+) \|$", section, re.M)
        assert row, f"README has no row for kind {kind}"
        assert (float(row[1]), float(row[2])) == (rule.within, rule.near), kind


def test_plots_switch_to_log_axes_when_values_span_decades():
    import numpy as np

    from fhirsynth.evaluate import plots

    rng = np.random.default_rng(0)
    spread = {"real": rng.lognormal(3, 2, 300).tolist(), "synthetic": rng.lognormal(3, 2, 200).tolist()}
    narrow = {"real": rng.uniform(20, 80, 300).tolist(), "synthetic": rng.uniform(20, 80, 200).tolist()}
    assert "(log x axis)" in plots.histogram(spread, "Gaps", "days")
    assert "(log x axis)" not in plots.histogram(narrow, "Ages", "years")
    pairs = 10 ** rng.uniform(-4, 0, (50, 2))  # four decades
    pairs[0] = [0.3, 0.0]  # a code the other cohort lacks still gets drawn
    assert "(log axes)" in plots.scatter({"synthetic": pairs.tolist()}, "Prevalence", "real", "synthetic")
    assert "(log axes)" not in plots.scatter({"synthetic": rng.uniform(0.2, 0.8, (50, 2)).tolist()}, "P", "r", "s")


def test_the_records_table_is_the_benchmarks_metric_code(held):
    """`evaluate` reports records_metrics.compare (the issues' definitions: encounters as visits, patient-level
    co-occurrence, record shape, value kinds) against the holdout, the training patients against it as the
    reference: the same numbers the benchmarks print for the same cohorts, and summary rows that carry them."""
    from fhirsynth.evaluate.records import RECORD_ROWS
    from fhirsynth.records_metrics import Records, compare
    from fhirsynth.timeline.io import read_timelines

    report, root = held["report"], held["root"]
    rec = report["records"]
    assert rec["reference"] == "holdout"
    hold = Records(list(read_timelines(root / "holdout")))
    expected = compare(hold, Records(list(read_timelines(root / "real"))))
    for key in ("prevalence_r2", "patient_cooc_r2", "events_ks", "value_kind_mismatch_share"):
        assert rec["ceiling"][key] == pytest.approx(expected[key], nan_ok=True), key
    assert rec["synthetic"]["n_real"] == hold.n and rec["synthetic"]["n_other"] == 100
    rows = {r["metric"]: r for r in report["summary"]}
    for label, key, _, _ in RECORD_ROWS:
        assert rows[label]["synthetic"] == pytest.approx(rec["synthetic"][key], nan_ok=True)
        assert rows[label]["reference"] == pytest.approx(rec["ceiling"][key], nan_ok=True)
