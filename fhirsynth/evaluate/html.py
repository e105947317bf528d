"""report.html: one self-contained file (inline CSS and hand-made SVG plots; no scripts, fonts or URLs)."""

from __future__ import annotations

import json
from html import escape

import numpy as np

COLORS = {"synthetic": "#d95f02", "holdout": "#1b9e77", "real": "#7570b3"}
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}.note{color:#777;font-size:.85em}
.plots{display:flex;flex-wrap:wrap;gap:14px}.plot{font-size:.8em}.key span{padding:0 .6em}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.75em;max-height:40em}
"""


def _fmt(v: object) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0:
            return "0"
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
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def svg_scatter(series: dict[str, list[list[float]]], title: str, size: int = 300) -> str:
    """Real (x) vs other (y) statistic per key; the diagonal is a perfect match."""
    pad = 34
    pts = [p for s in series.values() for p in s]
    hi = max([max(p) for p in pts], default=1.0) or 1.0
    scale = (size - 2 * pad) / hi
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" role="img">',
             f'<title>{escape(title)}</title>',
             f'<rect x="{pad}" y="{pad}" width="{size - 2 * pad}" height="{size - 2 * pad}" '
             'fill="none" stroke="#999"/>',
             f'<line x1="{pad}" y1="{size - pad}" x2="{size - pad}" y2="{pad}" stroke="#bbb" stroke-dasharray="4"/>',
             f'<text x="{size / 2}" y="{size - 8}" text-anchor="middle" font-size="11">real</text>',
             f'<text x="10" y="{size / 2}" font-size="11" transform="rotate(-90 10 {size / 2})" '
             f'text-anchor="middle">other</text>',
             f'<text x="{pad}" y="{size - pad + 13}" font-size="9">0</text>',
             f'<text x="{size - pad}" y="{size - pad + 13}" font-size="9" text-anchor="end">{hi:.3g}</text>']
    for name, s in series.items():
        color = COLORS.get(name, "#333")
        for x, y in s:
            parts.append(f'<circle cx="{pad + x * scale:.1f}" cy="{size - pad - y * scale:.1f}" r="2" '
                         f'fill="{color}" fill-opacity="0.6"/>')
    parts.append("</svg>")
    return f'<div class="plot"><b>{escape(title)}</b><br>{"".join(parts)}</div>'


def svg_hist(samples: dict[str, list[float]], title: str, width: int = 340, height: int = 200) -> str:
    """Overlaid density step lines on common bins (clipped to the 1st-99th percentile of all values)."""
    allv = np.concatenate([np.asarray(v, float) for v in samples.values() if len(v)] or [np.zeros(1)])
    lo, hi = np.percentile(allv, [1, 99]) if len(allv) > 1 else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, 31)
    dens = {k: np.histogram(np.clip(np.asarray(v, float), lo, hi), bins=edges, density=True)[0]
            for k, v in samples.items() if len(v)}
    top = max([d.max() for d in dens.values()], default=1.0) or 1.0
    pad = 28
    sx = (width - 2 * pad) / (hi - lo)
    sy = (height - 2 * pad) / top
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<title>{escape(title)}</title>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#999"/>',
             f'<text x="{pad}" y="{height - 10}" font-size="9">{lo:.3g}</text>',
             f'<text x="{width - pad}" y="{height - 10}" font-size="9" text-anchor="end">{hi:.3g}</text>']
    for name, d in dens.items():
        pts = []
        for i, h in enumerate(d):
            x0, x1 = pad + (edges[i] - lo) * sx, pad + (edges[i + 1] - lo) * sx
            y = height - pad - h * sy
            pts += [f"{x0:.1f},{y:.1f}", f"{x1:.1f},{y:.1f}"]
        parts.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{COLORS.get(name, "#333")}" '
                     f'stroke-width="1.5"/>')
    parts.append("</svg>")
    return f'<div class="plot"><b>{escape(title)}</b><br>{"".join(parts)}</div>'


def _key(names: list[str]) -> str:
    return '<p class="key">' + "".join(
        f'<span style="color:{COLORS.get(n, "#333")}">● {escape(n)}</span>' for n in names) + "</p>"


def render_html(report: dict) -> str:
    meta = report.get("meta", {})
    plots = report.get("plots", {})
    others = list(plots)
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>fhirsynth evaluation</title>"
           f"<style>{CSS}</style></head><body>", "<h1>fhirsynth evaluation report</h1>"]
    rows = [["real (training)", meta.get("real", {}).get("patients"), meta.get("real", {}).get("events")],
            ["synthetic", meta.get("synthetic", {}).get("patients"), meta.get("synthetic", {}).get("events")]]
    if meta.get("holdout"):
        rows.append(["holdout (reference)", meta["holdout"]["patients"], meta["holdout"]["events"]])
    out.append(f"<p>Generated {_fmt(meta.get('generated'))} by fhirsynth {_fmt(meta.get('fhirsynth_version'))}. "
               "The <i>reference</i> column is the holdout compared with the real data the same way: what a perfect "
               "generator would reach with data of that size. A visit is one patient-day with events.</p>")
    out.append(_table(["cohort", "patients", "events"], rows))
    if meta.get("release_note"):
        out.append(f"<p class='note'><b>Not for release:</b> {escape(meta['release_note'])}.</p>")

    out.append("<h2>Summary</h2>")
    out.append(_table(["group", "metric", "synthetic", "95% interval", "reference", "ideal", "note"],
                      [[r.get("group"), r.get("metric"), r.get("synthetic"), _interval(r.get("interval")),
                        r.get("reference"), r.get("ideal"), r.get("note")] for r in report.get("summary", [])]))

    out.append("<h2>Fidelity</h2>" + _key(["synthetic", "holdout"][: len(others)] if others else []))
    out.append("<p class='note'>Scatter plots: each point is one code (or code pair); x = statistic in the real "
               "data, y = in the other cohort. Points on the dashed diagonal match.</p><div class='plots'>")
    for key, title in [("prevalence_condition", "Condition prevalence (share of patients)"),
                       ("prevalence_observation", "Observation-code prevalence"),
                       ("cooccurrence", "Within-visit co-occurrence"),
                       ("transitions", "Consecutive-visit transitions")]:
        out.append(svg_scatter({o: plots[o].get(key, []) for o in others}, title))
    out.append("</div><div class='plots'>")
    first = plots.get(others[0], {}).get("distributions", {}) if others else {}
    for name in first:
        samples = {"real": first[name]["real"]}
        for o in others:
            samples[o] = plots[o]["distributions"][name]["other"]
        out.append(svg_hist(samples, name.replace("_", " ")))
    out.append("</div>" + _key(["real"] + others))
    for o in others:
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
    formal = pr.get("formal", {})
    out.append("<h3>Formal guarantee</h3>")
    out.append(_table(["key", "value"], [[k, json.dumps(v) if isinstance(v, dict | list) else v]
                                         for k, v in formal.items()]))
    out.append("<h3>Empirical attacks</h3>")
    attack_rows = []
    for key in ("mia_likelihood", "mia_record_distance", "mia_distance", "dcr", "copies", "attribute_inference",
                "canary_audit"):
        for k, v in (pr.get(key) or {}).items():
            attack_rows.append([key, k, json.dumps(v) if isinstance(v, dict | list) else v])
    out.append(_table(["test", "key", "value"], attack_rows))

    out.append("<h2>Plausibility</h2>")
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
