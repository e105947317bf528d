"""report.html: one self-contained file (inline CSS, figures as base64 PNG; no scripts, fonts or fetched URLs).

The page leads with a verdict per area, then the summary table (each metric beside the holdout reference and any
compared generator, coloured and worded within / near / far, see verdict.py), then the figures and the details."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from html import escape

from fhirsynth.evaluate import plots
from fhirsynth.evaluate.summary import claimed_epsilon, summary_rows
from fhirsynth.evaluate.verdict import AREAS, FAR, KINDS, NEAR, WITHIN, area_verdicts

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1320px;color:#222;
padding:0 1em;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em;max-width:100%}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#666;font-size:.85em}td.v{overflow-wrap:anywhere}td.n,th.a{white-space:nowrap}
.ci{display:block;color:#666;font-size:.8em}.preface{background:#f3f6fb;border-left:4px solid #4c6ef5;padding:.5em 1em}
.within{background:#dafbe1}.near{background:#fff3bf}.far{background:#ffd8d6}
.word{font-weight:600;font-size:.8em;text-transform:uppercase;margin-left:.4em}
.within .word{color:#116329}.near .word{color:#7a5b00}.far .word{color:#a40e26}
.plots{display:flex;flex-wrap:wrap;gap:14px}img.fig{max-width:100%;height:auto;border:1px solid #eee}
.callout{background:#fff8e6;border:1px solid #f0d58a;padding:.5em 1em}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.75em;max-height:40em}
table.kv{margin:0;font-size:1em}table.kv th{background:#fafafa;font-weight:600;white-space:nowrap;overflow-wrap:normal}
"""
AREA_TEXT = {
    "fidelity": "do the synthetic patients look like the real ones (prevalences, co-occurrences, distributions, "
                "whether a classifier can tell them apart)?",
    "utility": "does a model trained on synthetic data predict real outcomes as well as one trained on real data?",
    "privacy": "can an attacker tell who was in the training data, or find copies of real patients?",
    "plausibility": "are there impossible events (before birth, after death, out-of-range values) beyond what the "
                    "real data has?",
    "validity": "are the generated FHIR resources valid against the FHIR R4 schema?",
}


def _fmt(v: object) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if math.isinf(v):
            return "∞"
        return f"{v:.3g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.3f}"
    return escape(str(v))


def _interval(ci: object) -> str:
    """[lo, hi] as text, or empty when there is none."""
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(isinstance(x, int | float) for x in ci):
        return f"[{_fmt(float(ci[0]))}, {_fmt(float(ci[1]))}]"
    return ""


def _table(headers: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for v in row:
            cls = ' class="n"' if isinstance(v, int | float) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{_fmt(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _value_html(v: object, depth: int = 0) -> str:
    """A nested value as readable HTML instead of a JSON dump: dicts as nested key/value tables, deeper dicts and
    lists as 'key: value' text."""
    if isinstance(v, dict):
        if depth >= 2:
            return escape(", ".join(f"{k}: {_plain(x)}" for k, x in v.items())) or "–"
        return ("<table class='kv'><tbody>" + "".join(
            f"<tr><th>{escape(str(k))}</th><td class='v'>{_value_html(x, depth + 1)}</td></tr>" for k, x in v.items())
            + "</tbody></table>")
    if isinstance(v, list):
        return escape(", ".join(_plain(x) for x in v)) or "–"
    return _fmt(v)


def _plain(v: object) -> str:
    """Unescaped short text of a value (the caller escapes)."""
    if isinstance(v, dict | list):
        return json.dumps(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _verdict_cell(value: object, verdict: dict | None, interval: object = None) -> str:
    ci = f"<span class='ci'>{_interval(interval)}</span>" if _interval(interval) else ""
    if not verdict:
        return f"<td class='n'>{_fmt(value)}{ci}</td>"
    word = verdict["word"]
    title = (f"{word}: vs {verdict['basis']} {_fmt(verdict['basis_value'])}, gap {verdict['gap']:+.3f}"
             + (" (within sampling noise)" if verdict.get("noise") else ""))
    return f"<td class='n {word}' title='{escape(title)}'>{_fmt(value)}<span class='word'>{word}</span>{ci}</td>"


def _area_cell(area: dict) -> str:
    word = area.get("word")
    counts = f"{area[WITHIN]} within, {area[NEAR]} near, {area[FAR]} far"
    if area.get("not_judged"):
        counts += f"; {area['not_judged']} not judged"
    if word is None:
        return f"<td>no verdict <span class='note'>({counts})</span></td>"
    return f"<td class='{word}'><span class='word'>{word}</span> <span class='note'>({counts})</span></td>"


def verdict_section(columns: Mapping[str, Sequence[dict]]) -> str:
    """One row per area, one column per generator: its worst verdict and the counts behind it."""
    per_col = {name: area_verdicts(rows) for name, rows in columns.items()}
    head = "".join(f"<th>{escape(n)}</th>" for n in columns)
    body = "".join(f"<tr><th class='a'>{a}</th><td class='note'>{escape(AREA_TEXT[a])}</td>"
                   + "".join(_area_cell(per_col[n][a]) for n in columns) + "</tr>" for a in AREAS)
    return (f"<table><thead><tr><th>area</th><th>question</th>{head}</tr></thead><tbody>{body}</tbody></table>"
            "<p class='note'>An area's verdict is its worst row: one far metric makes the area far. "
            "The summary below says which rows.</p>")


def rules_section() -> str:
    rows = "".join(f"<tr><td>{escape(k)}</td><td>{escape(r.description)}</td><td class='n'>≤ {r.within:g}</td>"
                   f"<td class='n'>≤ {r.near:g}</td></tr>" for k, r in KINDS.items())
    return ("<details><summary>How within / near / far is decided</summary>"
            "<p>Each metric is compared with its <b>reference</b>: the same metric for the holdout (real patients the "
            "generator never saw) against the training data, i.e. what a perfect generator reaches with data of this "
            "size. Where there is no holdout value the verdict uses a stated fallback (the real-vs-real null median "
            "for fidelity, chance level for attacks, the real data's own rate for plausibility and validity, a model "
            "trained on real data for utility); hover a cell to see which. The <i>gap</i> is how much farther from "
            "ideal the synthetic value is than the reference (negative: better than the reference). "
            "<span class='within'>within</span>: gap ≤ the first tolerance, or the difference is within sampling "
            "noise (the reference lies inside the synthetic value's 95% interval, or the synthetic value is no farther "
            "from ideal than the worse end of the real-vs-real null range); <span class='near'>near</span>: gap ≤ "
            "the second tolerance; <span class='far'>far</span>: beyond. Rows without a reference or fallback get no "
            "verdict.</p>"
            f"<table><thead><tr><th>kind</th><th>metrics</th><th>within: gap</th><th>near: gap</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></details>")


def holdout_callout(rows: Sequence[dict]) -> str:
    """Said once: which rows a holdout would fill and why."""
    needs_value = [r["metric"] for r in rows if r.get("holdout_use") == "value" and r.get("synthetic") is None]
    needs_ref = []
    for group in dict.fromkeys(r.get("group") for r in rows):
        in_group = [r for r in rows if r.get("group") == group]
        missing = [r["metric"] for r in in_group if r.get("holdout_use") == "reference" and r.get("reference") is None]
        if missing:  # by area, and "all N rows" rather than a wall of names where the whole area lacks it
            listed = f"all {len(missing)} rows" if len(missing) == len(in_group) else ", ".join(missing)
            needs_ref.append(f"{group}: {listed}")
    parts = ["<div class='callout'><p><b>No holdout was given</b> (<code>fhirsynth evaluate --holdout DIR</code>: "
             "real patients kept out of training).</p><ul>"]
    if needs_value:
        parts.append(f"<li>Not computed, because membership attacks need real non-members to compare with: "
                     f"{escape('; '.join(needs_value))}.</li>")
    if needs_ref:
        parts.append(f"<li>No reference value, because the reference is the holdout measured the same way: "
                     f"{escape('; '.join(needs_ref))}. Their verdicts use the fallback named in each cell, "
                     "or none.</li>")
    parts.append("</ul></div>")
    return "".join(parts)


def _note(note: object, has_holdout: bool) -> str:
    # without a holdout the callout says once which rows need it; repeating it on every row is noise
    if not note or (not has_holdout and str(note).startswith("needs --")):
        return ""
    return _fmt(note)


def summary_table(columns: Mapping[str, Sequence[dict]], has_holdout: bool = True) -> str:
    """Metric rows grouped by area: first column's value (with its interval), the holdout reference, every other
    column, the ideal, other figures and a note. Cells are coloured and worded by their verdict."""
    names = list(columns)
    first = list(columns[names[0]])
    by_col = {n: {r["metric"]: r for r in columns[n]} for n in names[1:]}
    head = (f"<th>metric</th><th>{escape(names[0])} <span class='note'>[95% interval]</span></th>"
            "<th>reference (holdout)</th>" + "".join(f"<th>{escape(n)}</th>" for n in names[1:])
            + "<th>ideal</th><th>other figures</th><th>note</th>")
    out = [f"<table><thead><tr>{head}</tr></thead><tbody>"]
    group = None
    for r in first:
        if r.get("group") != group:
            group = r.get("group")
            out.append(f"<tr><th colspan='{6 + len(names) - 1}'>{escape(str(group))}</th></tr>")
        extras = "; ".join(f"{escape(str(k))}: {_fmt(v)}" for k, v in (r.get("extras") or {}).items()
                           if v is not None)
        cells = [f"<td>{escape(str(r.get('metric')))}</td>", _verdict_cell(r.get("synthetic"), r.get("verdict"),
                                                                           r.get("interval")),
                 f"<td class='n'>{_fmt(r.get('reference'))}</td>"]
        for n in names[1:]:
            other = by_col[n].get(r["metric"], {})
            cells.append(_verdict_cell(other.get("synthetic"), other.get("verdict")))
        cells += [f"<td class='n'>{_fmt(r.get('ideal'))}</td>", f"<td>{extras}</td>",
                  f"<td class='note'>{_note(r.get('note'), has_holdout)}</td>"]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


# metric rows drawn on the privacy-utility curve (when several epsilon are given)
CURVE_METRICS = ("Mean TSTR/TRTR AUROC ratio (tasks beyond age)", "Condition prevalence R²", "Detection AUC",
                 "2-way marginal TVD (flat table)", "MIA record-distance AUC", "DCR share closer to training")


def column_epsilon(meta: Mapping, privacy: Mapping | None = None) -> float | None:
    """A column's epsilon (inf for no DP) from its meta, else from its privacy report's formal guarantee."""
    eps = meta.get("epsilon")
    if eps == "inf":
        return math.inf
    if isinstance(eps, int | float) and not isinstance(eps, bool):
        return float(eps)
    formal = (privacy or {}).get("formal") or {}
    if formal.get("dp") is False:
        return math.inf
    return claimed_epsilon(formal) if formal else None


def curve_section(columns: Mapping[str, Sequence[dict]], epsilons: Mapping[str, float | None]) -> str:
    """The privacy-utility curve, or '' when fewer than two distinct epsilon are known."""
    known = {n: e for n, e in epsilons.items() if e is not None and n in columns}
    if len(set(known.values())) < 2:
        return ""
    points: dict[str, list[tuple[str, float, float | None]]] = {}
    reference, ideal = {}, {}
    for metric in CURVE_METRICS:
        pts = []
        for n, e in known.items():
            row = next((r for r in columns[n] if r.get("metric") == metric), None)
            if row is not None:
                pts.append((n, e, row.get("synthetic")))
                reference.setdefault(metric, row.get("reference"))
                ideal.setdefault(metric, row.get("ideal"))
        points[metric] = pts
    if not any(v is not None for pts in points.values() for *_, v in pts):
        return ""
    labels = ", ".join(f"{escape(n)} (ε={_fmt(e)})" for n, e in known.items())
    return ("<h2>Privacy-utility curve</h2><p class='note'>Each marker is one generator: " + labels
            + ". A smaller ε is a stronger privacy guarantee; the grey line joins them in order of ε.</p>"
            + plots.curve(points, reference, ideal))


def _cohort_table(meta: Mapping, compare: Mapping[str, Mapping]) -> str:
    rows = [["real (training)", meta.get("real", {}).get("patients"), meta.get("real", {}).get("events"), None],
            ["synthetic", meta.get("synthetic", {}).get("patients"), meta.get("synthetic", {}).get("events"),
             column_epsilon(meta.get("synthetic", {}))]]
    if meta.get("holdout"):
        rows.append(["holdout (reference)", meta["holdout"]["patients"], meta["holdout"]["events"], None])
    for label, c in compare.items():
        m = c.get("meta", {})
        rows.append([f"{label} (compared: {m.get('path')})", m.get("patients"), m.get("events"), column_epsilon(m)])
    for row in rows:  # "8", "0.5", "∞": an epsilon reads better without padding zeros
        row[3] = "∞" if row[3] == math.inf else (f"{row[3]:g}" if isinstance(row[3], float) else row[3])
    return _table(["cohort", "patients", "events", "ε"], rows)


def _fidelity_plots(plots_data: Mapping[str, Mapping]) -> str:
    others = list(plots_data)
    out = ["<p class='note'>Each point is one code (or code pair): x = the statistic in the real data, y = in the "
           "other cohort; points on the dashed diagonal match. Axes switch to a symmetric log scale when values span "
           "decades.</p><div class='plots'>"]
    for key, title, what in [("prevalence_condition", "Condition prevalence", "share of patients"),
                             ("prevalence_observation", "Observation-code prevalence", "share of patients"),
                             ("cooccurrence", "Within-visit co-occurrence", "share of visits"),
                             ("transitions", "Consecutive-visit transitions", "share of visit pairs")]:
        series = {o: plots_data[o].get(key, []) for o in others}
        if any(series.values()):
            out.append(plots.scatter(series, title, f"real ({what})", f"other cohort ({what})"))
    out.append("</div><div class='plots'>")
    first = plots_data.get(others[0], {}).get("distributions", {}) if others else {}
    for name in first:
        samples = {"real": first[name]["real"]}
        for o in others:
            samples[o] = plots_data[o].get("distributions", {}).get(name, {}).get("other", [])
        label = name.replace("_", " ")
        out.append(plots.histogram(samples, label.capitalize(), label))
    out.append("</div>")
    return "".join(out)


def render_html(report: dict, preface: Sequence[str] = ()) -> str:
    meta = report.get("meta", {})
    compare = report.get("compare") or {}
    columns = {"synthetic": report.get("summary", []), **{k: v.get("summary", []) for k, v in compare.items()}}
    out = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           "<meta name='viewport' content='width=device-width, initial-scale=1'><title>fhirsynth evaluation</title>"
           f"<style>{CSS}</style></head><body>", "<h1>fhirsynth evaluation report</h1>"]
    preface = list(preface) or list(meta.get("preface") or [])
    if preface:
        out.append("<div class='preface'>" + "".join(f"<p>{escape(p)}</p>" for p in preface) + "</div>")
    out.append(f"<p>Generated {_fmt(meta.get('generated'))} by fhirsynth {_fmt(meta.get('fhirsynth_version'))}. "
               "A visit is one patient-day with events.</p>")
    out.append(_cohort_table(meta, compare))
    if meta.get("release_note"):
        out.append(f"<p class='note'><b>Not for release:</b> {escape(meta['release_note'])}.</p>")

    out.append("<h2>Verdict</h2>" + verdict_section(columns) + rules_section())
    if not meta.get("holdout"):
        out.append(holdout_callout(report.get("summary", [])))
    out.append("<h2>Summary</h2>" + summary_table(columns, has_holdout=bool(meta.get("holdout"))))
    epsilons = {"synthetic": column_epsilon(meta.get("synthetic", {}), report.get("privacy")),
                **{k: column_epsilon(v.get("meta", {})) for k, v in compare.items()}}
    out.append(curve_section(columns, epsilons))

    out.append("<h2>Fidelity</h2>" + _fidelity_plots(report.get("plots", {})))
    for o in report.get("plots", {}):
        vals = report.get("fidelity", {}).get(o, {}).get("numeric_values", {})
        out.append(f"<h3>Numeric observation values: {escape(o)} vs real</h3>")
        out.append(_table(["code", "name", "KS", "Wasserstein", "W / sd(real)", "mean real", "mean other", "n other"],
                          [[k.rsplit("|", 1)[-1], v.get("label"), v.get("ks"), v.get("wasserstein"),
                            v.get("wasserstein_over_sd"), v.get("mean_real"), v.get("mean_other"), v.get("n_other")]
                           for k, v in vals.items()]))

    out.append("<h2>Utility (train on synthetic, test on real)</h2>")
    util = report.get("utility", {})
    us = util.get("summary") or {}
    out.append(f"<p>Test set: {_fmt(util.get('test_set'))}. Mean TSTR/TRTR ratio over the tasks that do more than "
               f"measure age: {_fmt(us.get('mean_ratio'))} {_interval(us.get('mean_ratio_ci'))} "
               f"({escape(', '.join(us.get('tasks_used') or []) or str(us.get('reason') or 'none'))}).</p>")
    out.append(_table(["task", "positives (train/test/synth)", "TRTR AUROC", "age-only AUROC", "TSTR AUROC", "ratio",
                       "measures age", "not computable because"],
                      [[v.get("description") or k, "/".join(str(x) for x in (v.get("positives") or {}).values()),
                        f"{_fmt(v.get('trtr_auroc'))} {_interval(v.get('trtr_ci'))}",
                        f"{_fmt(v.get('age_only_auroc'))} {_interval(v.get('age_only_ci'))}",
                        f"{_fmt(v.get('tstr_auroc'))} {_interval(v.get('tstr_ci'))}", v.get("ratio"),
                        v.get("measures_age"), v.get("reason")]
                       for k, v in (util.get("tasks") or {}).items()]))

    out.append("<h2>Privacy</h2>")
    pr = report.get("privacy", {})
    out.append("<h3>Formal guarantee</h3>")
    out.append("<table><tbody>" + "".join(f"<tr><th>{escape(str(k))}</th><td class='v'>{_value_html(v)}</td></tr>"
                                          for k, v in (pr.get("formal") or {}).items()) + "</tbody></table>")
    out.append("<h3>Empirical attacks</h3><table><thead><tr><th>test</th><th>key</th><th>value</th></tr></thead>"
               "<tbody>")
    for key in ("mia_likelihood", "mia_record_distance", "mia_distance", "dcr", "copies", "attribute_inference",
                "canary_audit"):
        for k, v in (pr.get(key) or {}).items():
            out.append(f"<tr><td>{escape(key)}</td><td>{escape(str(k))}</td><td class='v'>{_value_html(v)}</td></tr>")
    out.append("</tbody></table>")

    out.append("<h2>Plausibility and validity</h2>")
    pl = report.get("plausibility", {})
    cohorts = [c for c in ("real", "synthetic", "holdout") if c in pl]
    checks = [c for c, v in pl.get("real", {}).items() if isinstance(v, dict) and "event_rate" in v]
    out.append(f"<p class='note'>{escape(str(pl.get('note', '')))}</p>")
    out.append(_table(["sampler constraint (event rate / patient rate)"] + cohorts,
                      [[c] + [f"{_fmt(pl[k][c]['event_rate'])} / {_fmt(pl[k][c]['patient_rate'])}" for k in cohorts]
                       for c in checks]))
    held = [c for c, v in pl.get("real", {}).get("held_out_rules", {}).items() if isinstance(v, dict)]
    out.append(_table(["held-out rule, not enforced by the sampler (rate / checked)"] + cohorts,
                      [[c] + [f"{_fmt(pl[k]['held_out_rules'][c]['rate'])} / {pl[k]['held_out_rules'][c]['checked']}"
                              for k in cohorts] for c in held]))
    for who in ("synthetic", "real"):
        fv = pl.get(f"fhir_validity_{who}", {})
        sampled = f", {fv['patients_sampled']} patients sampled" if "patients_sampled" in fv else ""
        out.append(f"<p>FHIR validity of {who} resources: {_fmt(fv.get('valid_rate'))} "
                   f"({_fmt(fv.get('checked'))} checked{sampled}; {escape(str(fv.get('source', '')))}) "
                   f"{escape(str(fv.get('reason') or ''))}</p>")
        for ex in fv.get("examples", []):
            out.append(f"<p class='note'>{escape(ex)}</p>")

    body = {k: v for k, v in report.items() if k != "plots"}
    out.append("<h2>All metrics (report.json without plot data)</h2><details><summary>show</summary><pre>")
    out.append(escape(json.dumps(body, indent=1)))
    out.append("</pre></details></body></html>")
    return "\n".join(out)


def render_study_html(columns: Mapping[str, Mapping], title: str = "fhirsynth study",
                      epsilons: Mapping[str, float | None] | None = None) -> str:
    """Several reports side by side (benchmarks/bench_study.py): verdicts, the summary table and the
    privacy-utility curve, drawn by the same code as a single report. epsilons: per column, where the reports do
    not say (default: from each report's meta or formal guarantee)."""
    # summaries are rebuilt from the metrics, so reports written before verdicts existed render the same way
    cols = {n: summary_rows(r) if "fidelity" in r else list(r.get("summary", [])) for n, r in columns.items()}
    cols = {n: rows for n, rows in cols.items() if rows}
    if not cols:
        raise ValueError("no report with a summary to render")
    eps = {n: column_epsilon(r.get("meta", {}).get("synthetic", {}), r.get("privacy"))
           for n, r in columns.items() if n in cols}
    epsilons = {**eps, **{n: e for n, e in (epsilons or {}).items() if e is not None}}
    return "\n".join([
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{escape(title)}</h1>",
        "<h2>Verdict</h2>" + verdict_section(cols) + rules_section(),
        curve_section(cols, epsilons), "<h2>Summary</h2>" + summary_table(cols), "</body></html>"])
