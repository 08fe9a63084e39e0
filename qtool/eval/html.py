"""One self-contained HTML file for `qtool eval --json`'s report and `qtool tune --json`'s result.

The page loads nothing: styles are inline, charts are SVG drawn here, and a
Content-Security-Policy forbids every fetch, so it opens the same offline, in a CI
artifact viewer or attached to an e-mail. Every string that comes from a model, a path or
a label is HTML-escaped. A section whose data the report lacks says "not measured".

The charts (qtool.eval.svg) are described there, with their units.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qtool.eval.svg import CHOSEN, FAIL, PASS, frontier_chart, latency_chart, layer_chart
from qtool.fileio import write_text_atomic

__all__ = ["render_eval", "render_tune", "write_html"]

MAX_LAYERS = 30  # bars in the per-layer chart; the rest are counted, and all are in the JSON

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
        # Only with --runtimes: a page about one runtime gains no empty section.
        _section("Runtimes (--runtimes)", _runtimes(report["runtimes"])) if report.get("runtimes") else "",
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
    chart = layer_chart(shown, suggested)
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


def _latency(stats: Sequence[dict], ratios: dict) -> str:
    if not stats:
        return _not_measured("run qtool eval with --latency for candidate and reference timings")
    order = {"reference": 0, "candidate": 1}
    rows = sorted(stats, key=lambda s: (str(s.get("provider")), order.get(s.get("model"), 2)))
    has_samples = all(s.get("samples_ms") for s in rows)
    chart = latency_chart(rows, has_samples)
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
    return frontier_chart(cands, _chosen(res), metric, _budget_line(res)) + (
        '<p class="note">search-split sizes are estimates, held-out sizes are files; the line joins each '
        "split's frontier (no other candidate is smaller and at least as good).</p>")


def _budget_line(res: dict) -> float | None:
    """The lowest acceptable metric on held-out data (max-drop mode), else None."""
    ref, budget = res.get("reference_metric"), res.get("budget")
    if res.get("mode") != "max-drop" or not _finite(ref) or not _finite(budget):
        return None
    return ref - budget if res.get("higher_is_better", True) else ref + budget




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


def _runtimes(section: dict) -> str:
    """Each deployment's latency and agreement, then which is fastest at the floor."""
    from qtool.eval.matrix import TABLE_HEAD, table_rows

    lines = section.get("recommendation") or []
    head = f"<p><b>{_e(lines[0])}</b></p>" if lines else ""
    rest = "".join(f"<li>{_e(x)}</li>" for x in lines[1:])
    note = (f'<p class="note">agreement with the {_e(section["truth"])}; timing: {_e(section["timing"]["mode"])}, '
            f'{_e(section["timing"]["rounds"])} round(s)</p>')
    rows = [[_e(c) for c in r] for r in table_rows(section)]
    return head + (f"<ul>{rest}</ul>" if rest else "") + _table(TABLE_HEAD, rows, left=3) + note

