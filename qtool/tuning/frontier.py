"""Phase 5 of ``qtool tune``: the candidates it tried, size vs metric, the Pareto frontier.

Besides the search's and the verification's candidates, uniform ones (every group at each
candidate precision, where allowed) are scored on held-out data when time allows, so the
table compares tuned against uniform int8 / int4.

A candidate is on the frontier when no other candidate of the same split is at most as
large *and* at least as good, with one of the two strictly. Sizes are bytes (the estimate
for search-split candidates, the file size for held-out ones); the plot's x axis is MB.
"""

from __future__ import annotations

import html
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qtool.errors import UsageError

if TYPE_CHECKING:
    from qtool.tuning.options import Clock
    from qtool.tuning.recipes import Builder
    from qtool.tuning.sensitivity import Scorer


def mix(bits: Sequence[int]) -> str:
    """Groups per precision, highest first: ``"32:2 8:10 4:3"``."""
    return " ".join(f"{b}:{n}" for b, n in sorted(Counter(bits).items(), reverse=True))


@dataclass
class Candidate:
    label: str
    split: str  # "search" | "held-out"
    size_bytes: float
    metric: float
    drop: float
    sqnr_db: float
    mix: str  # e.g. "32:2 8:10 4:3" (groups per precision)
    frontier: bool = False

    @classmethod
    def scored(cls, label: str, split: str, size_bytes: float, score, drop: float, bits: Sequence[int]) -> Candidate:
        """From a qtool.tuning.sensitivity.Score and the bits per group it was measured at."""
        return cls(label, split, float(size_bytes), score.metric, drop, score.sqnr_db, mix(bits))

    def to_dict(self) -> dict:
        return asdict(self)


def mark_frontier(candidates: Sequence[Candidate]) -> None:
    """Set ``frontier`` on every candidate no other of its split dominates (by size, drop)."""
    for c in candidates:
        c.frontier = not any(
            o is not c and o.split == c.split and o.size_bytes <= c.size_bytes and o.drop <= c.drop
            and (o.size_bytes < c.size_bytes or o.drop < c.drop)
            for o in candidates
        )


def table_markdown(candidates: Sequence[Candidate], metric: str) -> str:
    """A Markdown table, held-out rows first, each split by size."""
    rows = sorted(candidates, key=lambda c: (c.split != "held-out", c.size_bytes))
    lines = [
        f"| candidate | split | size MB | {metric} | drop | output SQNR dB | groups per bits | frontier |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in rows:
        lines.append(
            f"| {c.label} | {c.split} | {c.size_bytes / 1e6:.3f} | {c.metric:.4f} | {c.drop:+.4f} | "
            f"{c.sqnr_db:.1f} | {c.mix} | {'yes' if c.frontier else ''} |"
        )
    return "\n".join(lines) + "\n"


def plot(candidates: Sequence[Candidate], path: str | os.PathLike, metric: str) -> Path:
    """Write the size-vs-metric plot to ``path`` (.svg always; .png needs matplotlib)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".svg", ".png"):
        raise UsageError(f"--plot {path}: unknown image type {suffix or '(none)'}", "use a .svg or .png path")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if suffix == ".png":
            raise UsageError("--plot .png needs matplotlib, which is not installed",
                             "pip install matplotlib, or pass a .svg path (written without it)") from None
        path.write_text(svg(candidates, metric))
        return path
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for split, marker in (("search", "o"), ("held-out", "s")):
        pts = [c for c in candidates if c.split == split]
        if not pts:
            continue
        ax.scatter([c.size_bytes / 1e6 for c in pts], [c.metric for c in pts], marker=marker, label=split, alpha=0.7)
        front = sorted((c for c in pts if c.frontier), key=lambda c: c.size_bytes)
        ax.plot([c.size_bytes / 1e6 for c in front], [c.metric for c in front], linewidth=1)
        for c in pts:
            if c.split == "held-out":
                ax.annotate(c.label, (c.size_bytes / 1e6, c.metric), fontsize=7)
    ax.set_xlabel("size (MB)")
    ax.set_ylabel(metric)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def svg(candidates: Sequence[Candidate], metric: str, width: int = 640, height: int = 400) -> str:
    """A dependency-free SVG scatter of the candidates, frontier joined by a line."""
    pad = 56
    xs = [c.size_bytes / 1e6 for c in candidates] or [0.0, 1.0]
    ys = [c.metric for c in candidates] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1 = x1 if x1 > x0 else x0 + 1.0
    y1 = y1 if y1 > y0 else y0 + 1.0

    def px(x: float) -> float:
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def py(y: float) -> float:
        return height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
        f'<text x="{width / 2}" y="{height - 16}" text-anchor="middle">size (MB): {x0:.2f} .. {x1:.2f}</text>',
        (f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">'
         f'{html.escape(metric)}: {y0:.4g} .. {y1:.4g}</text>'),
    ]
    colours = {"search": "#1f77b4", "held-out": "#d62728"}
    for split, colour in colours.items():
        front = sorted((c for c in candidates if c.split == split and c.frontier), key=lambda c: c.size_bytes)
        if len(front) > 1:
            points = " ".join(f"{px(c.size_bytes / 1e6):.1f},{py(c.metric):.1f}" for c in front)
            parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}"/>')
        for c in candidates:
            if c.split != split:
                continue
            x, y = px(c.size_bytes / 1e6), py(c.metric)
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}"><title>'
                         f'{html.escape(c.label)}</title></circle>')
            if split == "held-out":
                parts.append(f'<text x="{x + 5:.1f}" y="{y - 5:.1f}">{html.escape(c.label)}</text>')
    parts.append(f'<text x="{width - pad}" y="20" text-anchor="end" fill="{colours["search"]}">search split</text>')
    parts.append(f'<text x="{width - pad}" y="34" text-anchor="end" fill="{colours["held-out"]}">held-out</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def uniform_candidates(builder: Builder, held: Scorer, bits: Sequence[int], float_bytes: int, clock: Clock,
                       progress, scratch: Path) -> tuple[list[Candidate], list[str]]:
    """The float model, then every group at each of ``bits`` (or the nearest higher precision
    it allows), scored on the held-out split by ``held``; (candidates, notes).

    ``scratch``: the folder a temporary folder for the uniform models (one at a time) goes in.
    """
    from qtool.model import model_size_bytes, save

    groups = builder.groups
    float_bits = [grp.choices[0] for grp in groups]
    out = [Candidate("float", "held-out", float(float_bytes), held.reference.metric, 0.0, float("inf"),
                     mix(float_bits))]
    notes = []
    tmp = Path(tempfile.mkdtemp(prefix=".qtool-tune-", dir=scratch))
    try:
        with progress("uniform candidates (held-out)", len(bits) + 1, "models") as advance:
            advance(1)
            for b in bits:
                if clock.short_of(2):
                    notes.append(f"time budget: uniform {b}-bit not evaluated")
                    break
                assign = [min(c for c in grp.choices if c >= b) for grp in groups]
                path = tmp / f"uniform{b}.onnx"
                save(builder.build(assign), path, verify=False)
                score = held.score(path)
                where = "" if all(a == b for a in assign) else " (where allowed)"
                out.append(Candidate.scored(f"uniform {b}{where}", "held-out", model_size_bytes(path), score,
                                            held.drop(score), assign))
                path.unlink()
                advance(1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, notes


def write_frontier(candidates: Sequence[Candidate], path: Path, model_name: str, metric: str,
                   higher_is_better: bool) -> Path:
    """Mark the frontier and write it as ``path`` (Markdown)."""
    mark_frontier(candidates)
    path.write_text(
        f"# qtool tune: {model_name}\n\nmetric: {metric} ({'higher' if higher_is_better else 'lower'} "
        f"is better); drop = loss vs the float model on the same split; search-split sizes are estimates, "
        f"held-out sizes are files.\n\n" + table_markdown(candidates, metric)
    )
    return path

