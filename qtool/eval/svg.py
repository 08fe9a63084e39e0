"""The SVG charts of qtool's HTML report, drawn here with no plotting library.

Every function returns an ``<svg>`` element to inline in a page (no xmlns: HTML5 does not
need one, and the page holds no URL). Coordinates are px in a ``viewBox`` CHART_WIDTH wide,
scaled to the page's width. Units are on each axis title. Text is HTML-escaped.

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
import math
from collections.abc import Callable, Sequence

__all__ = ["CANDIDATE", "CHOSEN", "FAIL", "LAYER_BAR", "PASS", "REFERENCE", "Linear", "Log", "frontier_chart", "latency_chart",
           "layer_chart", "nice_step"]

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

CHART_WIDTH = 960


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def layer_chart(layers: Sequence[dict], suggested: set[str]) -> str:
    row, left, right, top, bottom = 24, 230, 70, 34, 48
    width = CHART_WIDTH
    height = top + bottom + row * len(layers)
    finite = [v for la in layers for v in (la.get("local_sqnr_db"), la.get("sqnr_db")) if v is not None]
    lo = min([0.0, *finite])
    hi = max([1.0, *finite])
    scale = Linear(lo, hi, left, width - right)
    parts = [_svg_open(width, height, "per-layer SQNR in dB, worst layer first")]
    parts += _axis(scale, (top, height - bottom), "SQNR (dB), higher is better")
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


def latency_chart(rows: Sequence[dict], has_samples: bool) -> str:
    row, left, right, top, bottom = 56, 170, 150, 34, 50
    width, height = CHART_WIDTH, top + bottom + row * len(rows)
    values = [v for s in rows for v in (s.get("samples_ms") or [s.get("min_ms"), s.get("max_ms")]) if v]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    log = lo > 0 and hi / lo > 20
    scale = Log(lo, hi, left, width - right) if log else Linear(min(0.0, lo), hi, left, width - right)
    parts = [_svg_open(width, height, "latency per run in milliseconds, reference and candidate")]
    parts += _axis(scale, (top, height - bottom), "time per run (ms" + (", log scale)" if log else ")"))
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
                     f'median {s.get("median_ms", 0):.3g} ms</text>')
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


def frontier_chart(cands: Sequence[dict], chosen: dict | None, metric: str, budget: float | None) -> str:
    left, right, top, bottom = 80, 40, 40, 56
    width, height = CHART_WIDTH, 440
    xs = [c["size_bytes"] / 1e6 for c in cands]
    ys = [c["metric"] for c in cands] + ([budget] if budget is not None else [])
    xlo, xhi = 0.0, max(xs) * 1.05
    ylo, yhi = min(ys), max(ys)
    pad = (yhi - ylo) * 0.08 or abs(yhi) * 0.02 or 0.01
    sx = Linear(xlo, xhi, left, width - right)
    sy = Linear(ylo - pad, yhi + pad, height - bottom, top)
    parts = [_svg_open(width, height, f"model size in MB against {metric}")]
    parts += _axis(sx, (top, height - bottom), "model size (MB, 10⁶ bytes)")
    parts += _axis(sy, (left, width - right), metric, vertical=True)
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


# -- building blocks ------------------------------------------------------------------------

class Linear:
    """Maps data values in [lo, hi] to pixels in [a, b] (b < a for a y axis)."""

    def __init__(self, lo: float, hi: float, a: float, b: float) -> None:
        self.lo, self.hi = (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)
        self.a, self.b = a, b

    def __call__(self, v: float) -> float:
        return self.a + (v - self.lo) / (self.hi - self.lo) * (self.b - self.a)

    def ticks(self) -> list[float]:
        step = nice_step((self.hi - self.lo) / 6)
        first = math.ceil(self.lo / step - 1e-9)
        return [k * step for k in range(first, math.floor(self.hi / step + 1e-9) + 1)]


class Log(Linear):
    """The same on a log10 axis; ticks at 1, 2 and 5 times each power of ten."""

    def __call__(self, v: float) -> float:
        v = max(v, self.lo)
        return self.a + math.log10(v / self.lo) / math.log10(self.hi / self.lo) * (self.b - self.a)

    def ticks(self) -> list[float]:
        out = []
        for p in range(math.floor(math.log10(self.lo)), math.ceil(math.log10(self.hi)) + 1):
            out += [m * 10.0**p for m in (1, 2, 5) if self.lo <= m * 10.0**p <= self.hi]
        return out


def nice_step(raw: float) -> float:
    if raw <= 0 or not math.isfinite(raw):
        return 1.0
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def _tick_label(v: float) -> str:
    return f"{v:.3g}" if v != 0 else "0"


def _svg_open(width: int, height: int, label: str) -> str:
    return (f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="{_e(label)}">')


def _line(x1: float, y1: float, x2: float, y2: float, colour: str) -> str:
    return f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{colour}"/>'


def _axis(scale: Linear, span: tuple[float, float], label: str, vertical: bool = False) -> list[str]:
    """Grid lines across ``span`` (the other axis' pixel range) at each tick, the tick labels,
    the axis line and its title; a horizontal axis sits at span[1], a vertical one at span[0]."""
    lo, hi = span
    parts = []
    for t in scale.ticks():
        p = scale(t)
        grid, (tx, ty, anchor) = ((lo, p, hi, p), (lo - 8, p + 4, "end")) if vertical else \
            ((p, lo, p, hi), (p, hi + 16, "middle"))
        parts.append(_line(*grid, GRID) + f'<text x="{tx:.1f}" y="{ty:.1f}" text-anchor="{anchor}" '
                     f'font-size="11" fill="{NEUTRAL}">{_tick_label(t)}</text>')
    mid = (scale.a + scale.b) / 2
    title = f'font-size="12.5" fill="{INK}" text-anchor="middle">{_e(label)}</text>'
    if vertical:
        parts.append(_line(lo, scale.a, lo, scale.b, NEUTRAL))
        parts.append(f'<text x="18" y="{mid:.1f}" transform="rotate(-90 18 {mid:.1f})" ' + title)
    else:
        parts.append(_line(scale.a, hi, scale.b, hi, NEUTRAL))
        parts.append(f'<text x="{mid:.1f}" y="{hi + 38}" ' + title)
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
