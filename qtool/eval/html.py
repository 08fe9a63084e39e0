"""One self-contained HTML file for `qtool eval --json`'s report and `qtool tune --json`'s result.

The page loads nothing: styles are inline, charts are SVG drawn here, and a
Content-Security-Policy forbids every fetch, so it opens the same offline, in a CI
artifact viewer or attached to an e-mail. Every string that comes from a model, a path or
a label is HTML-escaped. A section whose data the report lacks says "not measured".

Charts and their units:
- per-layer error: one bar per matched tensor, its local SQNR in dB (the error that layer
  adds on its own), worst first, with a tick at its end-to-end SQNR (float inputs vs
  quantized inputs all the way);
- latency: one row per model and provider, time of one ``session.run`` in ms. With the
  per-run times (``samples_ms`` in a latency entry) it is a strip plot over a box
  (p25-p75, median, whiskers min-max); the report of today carries only the summary, so
  the row shows min-p90 (thick), p90-max (thin), the median in its 95 % interval (a light
  box), the mean and p99. The axis is logarithmic when max/min exceeds 20;
- frontier: size in MB (10^6 bytes) against the tune metric, the frontier of each split
  joined by a line, the chosen model ringed and the budget drawn as a dashed line.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qtool.fileio import write_text_atomic

__all__ = ["render_eval", "render_tune", "write_html"]

# One colour per meaning, the same in every chart and table.
CANDIDATE = "#2563eb"
CANDIDATE_LIGHT = "#bfd3fb"
REFERENCE = "#ea8a1a"
REFERENCE_LIGHT = "#f9dcb8"
LAYER_BAR = "#7c3aed"
CHOSEN = "#059669"
PASS = "#15803d"
FAIL = "#b91c1c"
NEUTRAL = "#6b7280"
INK = "#1f2937"
GRID = "#e5e7eb"
MODEL_COLOURS = {"candidate": (CANDIDATE, CANDIDATE_LIGHT), "reference": (REFERENCE, REFERENCE_LIGHT)}

MAX_LAYERS = 30  # bars in the per-layer chart; the rest are counted, and all are in the JSON
CHART_WIDTH = 960

CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f3f4f6;color:#1f2937;font:14px/1.45 system-ui,-apple-system,"Segoe UI",
Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1040px;margin:0 auto;padding:20px 24px 40px}
header h1{font-size:20px;margin:0 0 2px}
header p{margin:0;color:#6b7280}
.banner{margin:16px 0;padding:14px 20px;border-radius:10px;color:#fff;display:flex;
align-items:baseline;gap:16px;flex-wrap:wrap}
.banner b{font-size:24px;letter-spacing:.04em}
.banner span{font-size:15px;opacity:.95}
.pass{background:#15803d}.fail{background:#b91c1c}.none{background:#6b7280}
section{background:#fff;border:1px solid #e5e7eb;border-radius:10px;padding:14px 18px;margin:14px 0}
h2{font-size:16px;margin:0 0 10px}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{padding:5px 10px;border-bottom:1px solid #eef0f3;text-align:right;white-space:nowrap}
th{font-weight:600;color:#4b5563;background:#f9fafb}
th:first-child,td:first-child{text-align:left}
td.l,th.l{text-align:left}
tr.group td{background:#f9fafb;font-weight:600;color:#4b5563;text-align:left}
.pill{display:inline-block;padding:1px 9px;border-radius:99px;color:#fff;font-size:12px;font-weight:600}
.ok{color:#15803d}.bad{color:#b91c1c}
.note{color:#6b7280;font-style:italic;margin:6px 0}
.warn{background:#fef3c7;border:1px solid #f59e0b;border-radius:8px;padding:8px 12px;margin:6px 0}
code{font:12.5px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f3f4f6;
padding:1px 4px;border-radius:4px;white-space:pre-wrap;word-break:break-all}
svg{display:block;width:100%;height:auto}
svg text{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif}
details summary{cursor:pointer;color:#4b5563}
pre{font:12px ui-monospace,Menlo,Consolas,monospace;overflow:auto;max-height:420px;background:#f9fafb;
padding:10px;border-radius:6px}
footer{color:#9ca3af;font-size:12px;text-align:center}
"""


# -- entry points ---------------------------------------------------------------------------

def render_eval(report: dict, tune: dict | None = None) -> str:
    """The page for one ``qtool eval --json`` report (and, if given, a tune result's frontier)."""
    cand = _name(report.get("candidate", {}).get("path", "candidate"))
    ref = report.get("reference")
    title = f"qtool eval: {cand}" + (f" vs {_name(ref['path'])}" if ref else "")
    data = report.get("data") or {}
    sub = (f"{data.get('samples', 0)} samples from {data.get('folder', '?')} · qtool "
           f"{report.get('qtool_version', '?')} · {report.get('created', '')}")
    body = [
        _eval_banner(report),
        _warnings(report.get("warnings") or []),
        _section("Gates", _gates_table(report.get("gates") or [])),
        _section("Size, metrics and latency", _summary_table(report)),
        _section("Per-layer error (--diagnose)", _layers(report.get("diagnosis"))),
        _section("Latency distribution", _latency(report.get("latency") or [], report.get("latency_ratio") or {})),
        _section("Size vs metric (tune)", _frontier(tune) if tune else _not_measured(
            "no tune result given: run qtool tune to chart the size-vs-metric frontier")),
        _raw("eval report", report),
    ]
    return _page(title, sub, body)


def render_tune(result: dict) -> str:
    """The page for one ``qtool tune --json`` result: verdict, frontier chart, candidates, groups."""
    title = f"qtool tune: {_name(result.get('output', 'tuned model'))}"
    sub = (f"{result.get('scheme', '?')} · metric {result.get('metric', '?')} · "
           f"{result.get('measured', 0)} measurements in {_fmt(result.get('seconds'), 3)} s")
    body = [
        _tune_banner(result),
        _warnings(result.get("notes") or []),
        _section("Size vs metric", _frontier(result)),
        _section("Candidates", _candidates_table(result)),
        _section("Precision per layer group", _groups_table(result.get("groups") or [])),
        _raw("tune result", result),
    ]
    return _page(title, sub, body)


def write_html(text: str, path: str | os.PathLike) -> Path:
    """Write a rendered page atomically (a reader never sees half a report)."""
    return write_text_atomic(path, text)


# -- page skeleton ----------------------------------------------------------------------------

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _name(path: str) -> str:
    return Path(str(path)).name or str(path)


def _page(title: str, subtitle: str, body: Sequence[str]) -> str:
    # The CSP makes "no network" a property of the file, not a promise: the browser refuses
    # any fetch even if a future edit adds one.
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "style-src 'unsafe-inline'; img-src data:\">",
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">",
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>",
        f"<header><h1>{_e(title)}</h1><p>{_e(subtitle)}</p></header>",
        *body,
        "<footer>written by qtool · self-contained, works offline</footer></main></body></html>\n",
    ])


def _section(title: str, content: str) -> str:
    return f"<section><h2>{_e(title)}</h2>{content}</section>"


def _not_measured(why: str) -> str:
    return f'<p class="note">not measured: {_e(why)}</p>'


def _warnings(items: Sequence[str]) -> str:
    return "".join(f'<div class="warn">⚠ {_e(w)}</div>' for w in items)


def _raw(what: str, doc: dict) -> str:
    text = json.dumps(doc, indent=2, default=str)
    return f"<section><details><summary>raw {_e(what)} (JSON)</summary><pre>{_e(text)}</pre></details></section>"


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        if math.isinf(x):
            return "∞" if x > 0 else "−∞"
        if 1e3 <= abs(x) < 1e9:
            return f"{x:,.0f}"  # throughputs and byte counts read better without an exponent
        return f"{x:.{digits}g}"
    return str(x)


def _mb(n: Any) -> str:
    return "–" if n is None else f"{n / 1e6:.3f} MB"


def _pill(ok: bool, yes: str = "pass", no: str = "FAIL") -> str:
    return f'<span class="pill" style="background:{PASS if ok else FAIL}">{yes if ok else no}</span>'


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Cells are HTML already (callers escape); the first ``left`` columns align left."""
    def cells(tag: str, items: Sequence[str]) -> str:
        return "".join(f'<{tag}{" class=l" if i < left else ""}>{c}</{tag}>' for i, c in enumerate(items))

    return ("<table><thead><tr>" + cells("th", head) + "</tr></thead><tbody>"
            + "".join("<tr>" + cells("td", r) + "</tr>" for r in rows) + "</tbody></table>")


# -- eval sections ----------------------------------------------------------------------------

def _eval_banner(doc: dict) -> str:
    gates = doc.get("gates") or []
    failed = [g for g in gates if not g.get("passed")]
    if not gates:
        cls, word, text = "none", "NO GATES", "nothing was checked: pass --max-drop, --min-sqnr or --max-latency-ratio"
    elif failed:
        cls, word, text = "fail", "FAILED", f"{len(failed)} of {len(gates)} gates failed"
    else:
        cls, word, text = "pass", "PASSED", f"all {len(gates)} gates passed"
    size = doc.get("size") or {}
    if size.get("compression_ratio"):
        text += f" · {size['compression_ratio']:.2f}× smaller"
    return f'<div class="banner {cls}"><b>{word}</b><span>{_e(text)}</span></div>'


def _gates_table(gates: Sequence[dict]) -> str:
    if not gates:
        return _not_measured("no gates were set")
    rows = []
    for g in gates:
        margin = g.get("margin")
        cls = "ok" if g.get("passed") else "bad"
        rows.append([f"<code>--{_e(g.get('gate'))}</code>", _e(g.get("subject")), _e(_fmt(g.get("value"))),
                     _e(_fmt(g.get("threshold"))), f'<span class="{cls}">{_e(_fmt(margin))}</span>',
                     _pill(bool(g.get("passed")))])
    return (_table(["gate", "subject", "value", "threshold", "margin", "result"], rows, left=2)
            + '<p class="note">margin: how far the value is inside its threshold (negative: outside).</p>')


def _summary_table(doc: dict) -> str:
    has_ref = doc.get("reference") is not None
    rows: list[list[str]] = []

    def group(title: str) -> None:
        rows.append([f"__group__{title}"])

    size = doc.get("size") or {}
    group("size")
    ratio = size.get("compression_ratio")
    rows.append(["file size", _mb(size.get("candidate_bytes")), _mb(size.get("reference_bytes")),
                 f"{ratio:.2f}× smaller" if ratio else "–"])
    if doc.get("metrics"):
        group("metrics")
        for m in doc["metrics"]:
            better = "higher" if m.get("higher_is_better") else "lower"
            drop = m.get("drop")
            cls = "bad" if drop is not None and drop > 0 else "ok"
            rows.append([f"{_e(m.get('name'))} <small>({better} is better)</small>", _e(_fmt(m.get("candidate"))),
                         _e(_fmt(m.get("reference"))), f'<span class="{cls}">drop {_e(_fmt(drop))}</span>'])
    if doc.get("outputs"):
        group("outputs vs reference")
        for o in doc["outputs"]:
            sqnr = "exact" if o.get("sqnr_db") is None else f"{o['sqnr_db']:.2f} dB"
            rows.append([f"output <code>{_e(o.get('name'))}</code>", f"SQNR {sqnr}", f"cosine {_fmt(o.get('cosine'), 6)}",
                         f"argmax agree {_fmt(o.get('argmax_agreement'))}"])
    latency = doc.get("latency") or []
    if latency:
        group("latency per run (ms)")
        by = {(s.get("provider"), s.get("model")): s for s in latency}
        for provider in dict.fromkeys(s.get("provider") for s in latency):
            c, r = by.get((provider, "candidate")), by.get((provider, "reference"))
            ratio = (doc.get("latency_ratio") or {}).get(provider)
            for key, label in (("median_ms", "median"), ("p90_ms", "p90"), ("p99_ms", "p99")):
                change = f"ratio {ratio:.3f}" if key == "median_ms" and ratio is not None else ""
                rows.append([f"{label} on {_e(provider)}", _ms(c, key), _ms(r, key), change])
            rows.append([f"throughput on {_e(provider)} (samples/s)", _e(_fmt((c or {}).get("throughput"))),
                         _e(_fmt((r or {}).get("throughput"))), ""])
            rows.append([f"session memory on {_e(provider)} (MiB)", _e(_fmt((c or {}).get("memory_mib"), 3)),
                         _e(_fmt((r or {}).get("memory_mib"), 3)), ""])
    else:
        group("latency")
        rows.append(['<span class="note">not measured (run with --latency)</span>', "", "", ""])
    head = ["", "candidate", "reference" if has_ref else "reference (none)", "change"]
    out = ["<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        if r[0].startswith("__group__"):
            out.append(f'<tr class="group"><td colspan="4">{_e(r[0][9:])}</td></tr>')
        else:
            out.append("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>")
    return "".join(out) + "</tbody></table>"


def _ms(stats: dict | None, key: str) -> str:
    return "–" if not stats or stats.get(key) is None else f"{stats[key]:.4g}"


def _layers(diag: dict | None) -> str:
    if not diag or not diag.get("layers"):
        return _not_measured("run qtool eval with --diagnose (and --reference) for per-layer SQNR")
    layers = list(diag["layers"])
    # Worst first: the lowest local SQNR; an exact tensor (null, +inf dB) last.
    layers.sort(key=lambda la: math.inf if la.get("local_sqnr_db") is None else la["local_sqnr_db"])
    shown, hidden = layers[:MAX_LAYERS], len(layers) - MAX_LAYERS
    suggested = set(diag.get("suggested") or [])
    chart = _layer_chart(shown, suggested)
    notes = [f'<p class="note">{diag.get("matched_tensors", len(layers))} tensors matched over '
             f'{diag.get("samples", "?")} samples; bars: local SQNR (error the layer adds alone), '
             f'tick: end-to-end SQNR at that tensor. Higher is better.</p>']
    if hidden > 0:
        notes.append(f'<p class="note">{hidden} better layers not drawn (all are in the JSON).</p>')
    if diag.get("exclude_flags"):
        notes.append("<p>Suggested: <code>qtool convert ... " + _e(" ".join(diag["exclude_flags"])) + "</code></p>")
    if diag.get("advice"):
        notes.append(f'<p class="note">{_e(diag["advice"])}</p>')
    return chart + "".join(notes)


def _layer_chart(layers: Sequence[dict], suggested: set[str]) -> str:
    row, left, right, top, bottom = 24, 230, 70, 34, 48
    width = CHART_WIDTH
    height = top + bottom + row * len(layers)
    finite = [v for la in layers for v in (la.get("local_sqnr_db"), la.get("sqnr_db")) if v is not None]
    lo = min([0.0, *finite])
    hi = max([1.0, *finite])
    scale = _Linear(lo, hi, left, width - right)
    parts = [_svg_open(width, height, "per-layer SQNR in dB, worst layer first")]
    parts += _x_axis(scale, top, height - bottom, "SQNR (dB), higher is better")
    parts.append(_legend(left, 16, [(LAYER_BAR, "local SQNR (layer alone)", "rect"),
                                    (INK, "end-to-end SQNR at the tensor", "tick"),
                                    (INK, "suggested for --exclude", "star")]))
    x0 = scale(0.0)
    for i, la in enumerate(layers):
        y = top + i * row
        name = str(la.get("node") or la.get("tensor") or "?")
        star = " ★" if name in suggested else ""
        label = name if len(name) <= 30 else name[:29] + "…"
        parts.append(f'<text x="{left - 8}" y="{y + row / 2 + 4:.1f}" text-anchor="end" font-size="12" '
                     f'fill="{INK}"><title>{_e(name)} ({_e(la.get("op_type", ""))})</title>'
                     f'{_e(label)}{star}</text>')
        local = la.get("local_sqnr_db")
        if local is None:
            parts.append(f'<text x="{x0 + 6:.1f}" y="{y + row / 2 + 4:.1f}" font-size="11" fill="{NEUTRAL}">'
                         'exact (no error)</text>')
        else:
            xa, xb = sorted((x0, scale(local)))
            # A floor of 4 px keeps a near-0 dB bar (the worst layers) visible beside the axis.
            parts.append(f'<rect x="{xa:.1f}" y="{y + 4}" width="{max(xb - xa, 4):.1f}" height="{row - 8}" '
                         f'fill="{LAYER_BAR}" rx="2"><title>{_e(name)}: local {local:.2f} dB</title></rect>')
            parts.append(f'<text x="{xb + 4:.1f}" y="{y + row / 2 + 4:.1f}" font-size="11" fill="{NEUTRAL}">'
                         f'{local:.1f}</text>')
        total = la.get("sqnr_db")
        if total is not None:
            xt = scale(total)
            parts.append(f'<line x1="{xt:.1f}" y1="{y + 2}" x2="{xt:.1f}" y2="{y + row - 2}" stroke="{INK}" '
                         f'stroke-width="3"><title>{_e(name)}: end-to-end {total:.2f} dB</title></line>')
    parts.append("</svg>")
    return "".join(parts)


def _latency(stats: Sequence[dict], ratios: dict) -> str:
    if not stats:
        return _not_measured("run qtool eval with --latency for candidate and reference timings")
    order = {"reference": 0, "candidate": 1}
    rows = sorted(stats, key=lambda s: (str(s.get("provider")), order.get(s.get("model"), 2)))
    has_samples = all(s.get("samples_ms") for s in rows)
    chart = _latency_chart(rows, has_samples)
    summary = ", ".join(f"{_e(p)}: candidate/reference median {r:.3f}" for p, r in ratios.items())
    if has_samples:
        how = "dots: every timed run; box: p25–p75 with the median; whiskers: min–max."
    else:
        how = ("thick bar: min–p90 (9 runs in 10), thin line: p90–max, dark line in a light box: the median "
               "and its 95 % interval, ◆: mean, ▾: p99. The report carries no per-run times (a latency "
               "entry's samples_ms), so this is drawn from its summary statistics.")
    runs = rows[0].get("runs", "?")
    return chart + (f"<p>{summary}</p>" if summary else "") + (
        f'<p class="note">{runs} timed runs per model, interleaved, after {rows[0].get("warmup", "?")} '
        f"warm-up runs; batch {rows[0].get('batch_size', '?')}. {how}</p>")


def _latency_chart(rows: Sequence[dict], has_samples: bool) -> str:
    row, left, right, top, bottom = 56, 170, 150, 34, 50
    width, height = CHART_WIDTH, top + bottom + row * len(rows)
    values = [v for s in rows for v in (s.get("samples_ms") or [s.get("min_ms"), s.get("max_ms")]) if v]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    log = lo > 0 and hi / lo > 20
    scale = _Log(lo, hi, left, width - right) if log else _Linear(min(0.0, lo), hi, left, width - right)
    parts = [_svg_open(width, height, "latency per run in milliseconds, reference and candidate")]
    parts += _x_axis(scale, top, height - bottom, "time per run (ms" + (", log scale)" if log else ")"))
    parts.append(_legend(left, 16, [(REFERENCE, "reference", "rect"), (CANDIDATE, "candidate", "rect")]))
    for i, s in enumerate(rows):
        y = top + i * row
        mid = y + row / 2
        dark, light = MODEL_COLOURS.get(s.get("model"), (NEUTRAL, GRID))
        parts.append(f'<text x="{left - 10}" y="{mid + 4:.1f}" text-anchor="end" font-size="13" fill="{INK}">'
                     f'{_e(s.get("model"))} · {_e(s.get("provider"))}</text>')
        draw = _latency_samples if has_samples else _latency_summary
        parts += draw(s, scale, mid, row, dark, light)
        parts.append(f'<text x="{width - right + 10}" y="{mid + 4:.1f}" font-size="12" fill="{INK}">'
                     f'median {_fmt(s.get("median_ms"), 3)} ms</text>')
    parts.append("</svg>")
    return "".join(parts)


def _latency_summary(s: dict, scale: Callable[[float], float], mid: float, row: int, dark: str,
                     light: str) -> list[str]:
    x = {k: scale(s[k]) for k in ("min_ms", "p90_ms", "p99_ms", "max_ms", "median_ms", "mean_ms")}
    lo_ci, hi_ci = (scale(v) for v in s.get("median_ci_ms") or (s["median_ms"], s["median_ms"]))
    h = row * 0.42
    return [
        f'<line x1="{x["p90_ms"]:.1f}" y1="{mid:.1f}" x2="{x["max_ms"]:.1f}" y2="{mid:.1f}" stroke="{dark}" '
        'stroke-width="2"/>',
        f'<line x1="{x["max_ms"]:.1f}" y1="{mid - 6:.1f}" x2="{x["max_ms"]:.1f}" y2="{mid + 6:.1f}" '
        f'stroke="{dark}" stroke-width="2"><title>max {s["max_ms"]:.4g} ms</title></line>',
        f'<rect x="{x["min_ms"]:.1f}" y="{mid - h / 2:.1f}" width="{max(x["p90_ms"] - x["min_ms"], 2):.1f}" '
        f'height="{h:.1f}" fill="{dark}" rx="3"><title>min {s["min_ms"]:.4g} ms – p90 {s["p90_ms"]:.4g} ms'
        "</title></rect>",
        f'<rect x="{lo_ci - 1:.1f}" y="{mid - h / 2 - 4:.1f}" width="{max(hi_ci - lo_ci, 0) + 2:.1f}" '
        f'height="{h + 8:.1f}" fill="{light}" stroke="{dark}"><title>median {s["median_ms"]:.4g} ms, 95 % '
        f"interval {s['median_ci_ms'][0]:.4g}–{s['median_ci_ms'][1]:.4g} ms</title></rect>"
        if s.get("median_ci_ms") else "",
        f'<line x1="{x["median_ms"]:.1f}" y1="{mid - h / 2 - 4:.1f}" x2="{x["median_ms"]:.1f}" '
        f'y2="{mid + h / 2 + 4:.1f}" stroke="#fff" stroke-width="2.5"/>',
        f'<line x1="{x["median_ms"]:.1f}" y1="{mid - h / 2 - 4:.1f}" x2="{x["median_ms"]:.1f}" '
        f'y2="{mid + h / 2 + 4:.1f}" stroke="{INK}" stroke-width="1"/>',
        _diamond(x["mean_ms"], mid + h / 2 + 9, 4.5, dark, f'mean {s["mean_ms"]:.4g} ms'),
        f'<path d="M{x["p99_ms"] - 5:.1f},{mid - h / 2 - 12:.1f} h10 l-5,7 z" fill="{dark}">'
        f'<title>p99 {s["p99_ms"]:.4g} ms</title></path>',
    ]


def _latency_samples(s: dict, scale: Callable[[float], float], mid: float, row: int, dark: str,
                     light: str) -> list[str]:
    t = sorted(float(v) for v in s["samples_ms"])
    q1, med, q3 = (_quantile(t, q) for q in (0.25, 0.5, 0.75))
    h = row * 0.5
    parts = [
        f'<line x1="{scale(t[0]):.1f}" y1="{mid:.1f}" x2="{scale(t[-1]):.1f}" y2="{mid:.1f}" stroke="{dark}"/>',
        f'<rect x="{scale(q1):.1f}" y="{mid - h / 2:.1f}" width="{max(scale(q3) - scale(q1), 2):.1f}" '
        f'height="{h:.1f}" fill="{light}" stroke="{dark}"><title>p25 {q1:.4g} – p75 {q3:.4g} ms</title></rect>',
    ]
    for i, v in enumerate(s["samples_ms"]):
        # Deterministic jitter (golden-ratio sequence), so the same report renders the same page.
        dy = ((i * 0.618034) % 1.0 - 0.5) * h
        parts.append(f'<circle cx="{scale(float(v)):.1f}" cy="{mid + dy:.1f}" r="2.2" fill="{dark}" '
                     'fill-opacity="0.75"/>')
    parts.append(f'<line x1="{scale(med):.1f}" y1="{mid - h / 2 - 3:.1f}" x2="{scale(med):.1f}" '
                 f'y2="{mid + h / 2 + 3:.1f}" stroke="{INK}" stroke-width="2.5"/>')
    return parts


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default percentile)."""
    pos = q * (len(sorted_values) - 1)
    i = math.floor(pos)
    j = min(i + 1, len(sorted_values) - 1)
    return sorted_values[i] + (sorted_values[j] - sorted_values[i]) * (pos - i)


# -- tune sections ----------------------------------------------------------------------------

def _tune_banner(res: dict) -> str:
    ok = bool(res.get("within_budget"))
    metric = res.get("metric", "metric")
    if res.get("mode") == "target-size":
        budget = f"size {_mb(res.get('size_bytes'))} (target {_mb(res.get('budget'))})"
    else:
        budget = f"{metric} drop {_fmt(res.get('drop'))} (budget {_fmt(res.get('budget'))})"
    size, float_bytes = res.get("size_bytes"), res.get("float_bytes")
    smaller = f" · {float_bytes / size:.2f}× smaller than float" if size and float_bytes else ""
    word = "WITHIN BUDGET" if ok else "OVER BUDGET"
    return (f'<div class="banner {"pass" if ok else "fail"}"><b>{word}</b><span>{_e(budget)} · '
            f'{_e(_mb(size))}{_e(smaller)}</span></div>')


def _chosen(res: dict) -> dict | None:
    """The candidate tune wrote: the last held-out "tuned" one (after any fallback steps)."""
    tuned = [c for c in res.get("candidates") or [] if c.get("split") == "held-out"
             and str(c.get("label", "")).startswith("tuned")]
    return tuned[-1] if tuned else None


def _frontier(res: dict) -> str:
    cands = [c for c in res.get("candidates") or []
             if _finite(c.get("size_bytes")) and _finite(c.get("metric"))]
    if not cands:
        return _not_measured("the tune result lists no candidates")
    metric = str(res.get("metric", "metric"))
    return _frontier_chart(cands, _chosen(res), metric, _budget_line(res)) + (
        '<p class="note">search-split sizes are estimates, held-out sizes are files; the line joins each '
        "split's frontier (no other candidate is smaller and at least as good).</p>")


def _budget_line(res: dict) -> float | None:
    """The lowest acceptable metric on held-out data (max-drop mode), else None."""
    ref, budget = res.get("reference_metric"), res.get("budget")
    if res.get("mode") != "max-drop" or not _finite(ref) or not _finite(budget):
        return None
    return ref - budget if res.get("higher_is_better", True) else ref + budget


def _frontier_chart(cands: Sequence[dict], chosen: dict | None, metric: str, budget: float | None) -> str:
    left, right, top, bottom = 80, 40, 40, 56
    width, height = CHART_WIDTH, 440
    xs = [c["size_bytes"] / 1e6 for c in cands]
    ys = [c["metric"] for c in cands] + ([budget] if budget is not None else [])
    xlo, xhi = 0.0, max(xs) * 1.05
    ylo, yhi = min(ys), max(ys)
    pad = (yhi - ylo) * 0.08 or abs(yhi) * 0.02 or 0.01
    sx = _Linear(xlo, xhi, left, width - right)
    sy = _Linear(ylo - pad, yhi + pad, height - bottom, top)
    parts = [_svg_open(width, height, f"model size in MB against {metric}")]
    parts += _x_axis(sx, top, height - bottom, "model size (MB, 10⁶ bytes)")
    parts += _y_axis(sy, left, width - right, metric)
    parts.append(_legend(left, 18, [(CANDIDATE_LIGHT, "search split (estimated size)", "dot"),
                                    (CANDIDATE, "held-out (file size)", "dot"),
                                    (CHOSEN, "chosen (written by tune)", "ring"),
                                    (FAIL, "budget", "dash")]))
    if budget is not None:
        yb = sy(budget)
        parts.append(f'<line x1="{left}" y1="{yb:.1f}" x2="{width - right}" y2="{yb:.1f}" stroke="{FAIL}" '
                     f'stroke-dasharray="6 4"/><text x="{width - right - 4}" y="{yb - 5:.1f}" text-anchor="end" '
                     f'font-size="11" fill="{FAIL}">budget: {_e(metric)} ≥ {budget:.4g}</text>')
    for split, colour in (("search", CANDIDATE_LIGHT), ("held-out", CANDIDATE)):
        front = sorted((c for c in cands if c.get("split") == split and c.get("frontier")),
                       key=lambda c: c["size_bytes"])
        if len(front) > 1:
            pts = " ".join(f"{sx(c['size_bytes'] / 1e6):.1f},{sy(c['metric']):.1f}" for c in front)
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
    labels: dict[tuple[float, float], list[str]] = {}
    for c in sorted(cands, key=lambda c: c.get("split") == "held-out"):
        x, y = sx(c["size_bytes"] / 1e6), sy(c["metric"])
        held = c.get("split") == "held-out"
        tip = (f'{c.get("label")} ({c.get("split")}): {c["size_bytes"] / 1e6:.3f} MB, {metric} '
               f'{c["metric"]:.4g}, {c.get("mix", "")}')
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{6 if held else 4.5}" '
                     f'fill="{CANDIDATE if held else CANDIDATE_LIGHT}" stroke="#fff"><title>{_e(tip)}</title></circle>')
        if held:
            labels.setdefault((round(x), round(y)), []).append(str(c.get("label")))
    boxes: list[tuple[float, float, float, float]] = []
    for (x, y), names in labels.items():
        # Candidates on one point share a label; a label takes the first slot (above, then
        # below the point, right of it or left near the right edge) that overlaps no other.
        text = " = ".join(names)
        w = _text_width(text, 12)
        right_side = x + 15 + w <= width - right
        x0 = x + 15 if right_side else x - 15 - w
        for dy in (-10, 18, -25, 33, -40, 48, -55):
            box = (x0, y + dy - 10, x0 + w, y + dy + 3)
            if not any(b[0] < box[2] and box[0] < b[2] and b[1] < box[3] and box[1] < b[3] for b in boxes):
                break
        boxes.append(box)
        parts.append(f'<text x="{x0:.1f}" y="{y + dy:.1f}" font-size="12" fill="{INK}">{_e(text)}</text>')
    if chosen is not None:
        x, y = sx(chosen["size_bytes"] / 1e6), sy(chosen["metric"])
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="12" fill="none" stroke="{CHOSEN}" stroke-width="4">'
                     f'<title>chosen: {_e(chosen.get("label"))}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def _candidates_table(res: dict) -> str:
    cands = res.get("candidates") or []
    if not cands:
        return _not_measured("the tune result lists no candidates")
    chosen = _chosen(res)
    rows = []
    for c in sorted(cands, key=lambda c: (c.get("split") != "held-out", c.get("size_bytes", 0))):
        mark = f' <span class="pill" style="background:{CHOSEN}">chosen</span>' if c is chosen else ""
        rows.append([_e(c.get("label")) + mark, _e(c.get("split")), _e(_mb(c.get("size_bytes"))),
                     _e(_fmt(c.get("metric"))), _e(_fmt(c.get("drop"))), _e(_fmt(c.get("sqnr_db"), 3)),
                     f"<code>{_e(c.get('mix', ''))}</code>", "yes" if c.get("frontier") else ""])
    head = ["candidate", "split", "size", _e(res.get("metric", "metric")), "drop", "output SQNR dB",
            "groups per bits", "frontier"]
    return _table(head, rows, left=2)


def _groups_table(groups: Sequence[dict]) -> str:
    if not groups:
        return _not_measured("the tune result lists no layer groups")
    rows = [[f"<code>{_e(g.get('key'))}</code>", _e(g.get("op_type")), _e(g.get("members")),
             _e(f"{g.get('params', 0):,}"), _e("float" if g.get("bits") == 32 else f"{g.get('bits')} bits")]
            for g in groups]
    return _table(["group", "op", "layers", "parameters", "precision"], rows, left=2)


# -- SVG building blocks ----------------------------------------------------------------------

def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class _Linear:
    """Maps data values in [lo, hi] to pixels in [a, b] (b < a for a y axis)."""

    def __init__(self, lo: float, hi: float, a: float, b: float) -> None:
        self.lo, self.hi = (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)
        self.a, self.b = a, b

    def __call__(self, v: float) -> float:
        return self.a + (v - self.lo) / (self.hi - self.lo) * (self.b - self.a)

    def ticks(self) -> list[float]:
        step = _nice_step((self.hi - self.lo) / 6)
        first = math.ceil(self.lo / step - 1e-9)
        return [k * step for k in range(first, math.floor(self.hi / step + 1e-9) + 1)]


class _Log(_Linear):
    """The same on a log10 axis; ticks at 1, 2 and 5 times each power of ten."""

    def __call__(self, v: float) -> float:
        v = max(v, self.lo)
        return self.a + math.log10(v / self.lo) / math.log10(self.hi / self.lo) * (self.b - self.a)

    def ticks(self) -> list[float]:
        out = []
        for p in range(math.floor(math.log10(self.lo)), math.ceil(math.log10(self.hi)) + 1):
            out += [m * 10.0**p for m in (1, 2, 5) if self.lo <= m * 10.0**p <= self.hi]
        return out


def _nice_step(raw: float) -> float:
    if raw <= 0 or not math.isfinite(raw):
        return 1.0
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def _tick_label(v: float) -> str:
    return f"{v:.3g}" if v != 0 else "0"


def _svg_open(width: int, height: int, label: str) -> str:
    return (f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="{_e(label)}">')


def _x_axis(scale: _Linear, top: float, bottom: float, label: str) -> list[str]:
    parts = []
    for t in scale.ticks():
        x = scale(t)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="{GRID}"/>'
                     f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle" font-size="11" '
                     f'fill="{NEUTRAL}">{_tick_label(t)}</text>')
    parts.append(f'<line x1="{scale.a}" y1="{bottom}" x2="{scale.b}" y2="{bottom}" stroke="{NEUTRAL}"/>')
    parts.append(f'<text x="{(scale.a + scale.b) / 2:.1f}" y="{bottom + 38}" text-anchor="middle" '
                 f'font-size="12.5" fill="{INK}">{_e(label)}</text>')
    return parts


def _y_axis(scale: _Linear, left: float, right: float, label: str) -> list[str]:
    parts = []
    for t in scale.ticks():
        y = scale(t)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="{GRID}"/>'
                     f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end" font-size="11" '
                     f'fill="{NEUTRAL}">{_tick_label(t)}</text>')
    parts.append(f'<line x1="{left}" y1="{scale.a}" x2="{left}" y2="{scale.b}" stroke="{NEUTRAL}"/>')
    mid = (scale.a + scale.b) / 2
    parts.append(f'<text x="18" y="{mid:.1f}" transform="rotate(-90 18 {mid:.1f})" text-anchor="middle" '
                 f'font-size="12.5" fill="{INK}">{_e(label)}</text>')
    return parts


def _text_width(text: str, size: float) -> float:
    """A generous estimate of a sans-serif label's width in px (SVG has no text metrics here)."""
    return 0.58 * size * len(text)


def _diamond(x: float, y: float, r: float, colour: str, title: str) -> str:
    return (f'<path d="M{x:.1f},{y - r:.1f} l{r},{r} l{-r},{r} l{-r},{-r} z" fill="#fff" stroke="{colour}" '
            f'stroke-width="1.5"><title>{_e(title)}</title></path>')


def _legend(x: float, y: float, items: Sequence[tuple[str, str, str]]) -> str:
    parts = []
    for colour, text, kind in items:
        if kind == "rect":
            parts.append(f'<rect x="{x:.1f}" y="{y - 9}" width="14" height="10" rx="2" fill="{colour}"/>')
        elif kind == "tick":
            parts.append(f'<line x1="{x + 7:.1f}" y1="{y - 11}" x2="{x + 7:.1f}" y2="{y + 2}" stroke="{colour}" '
                         'stroke-width="3"/>')
        elif kind == "dot":
            parts.append(f'<circle cx="{x + 7:.1f}" cy="{y - 4}" r="5" fill="{colour}"/>')
        elif kind == "ring":
            parts.append(f'<circle cx="{x + 7:.1f}" cy="{y - 4}" r="6" fill="none" stroke="{colour}" '
                         'stroke-width="3"/>')
        elif kind == "star":
            parts.append(f'<text x="{x + 7:.1f}" y="{y}" font-size="12" text-anchor="middle" fill="{colour}">★</text>')
        else:
            parts.append(f'<line x1="{x:.1f}" y1="{y - 4}" x2="{x + 16:.1f}" y2="{y - 4}" stroke="{colour}" '
                         'stroke-dasharray="4 3" stroke-width="2"/>')
        parts.append(f'<text x="{x + 20:.1f}" y="{y}" font-size="12" fill="{INK}">{_e(text)}</text>')
        x += 30 + _text_width(text, 12)
    return "".join(parts)
