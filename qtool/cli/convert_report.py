"""The human report of `qtool convert`: what became of each op, each pass's counts and notes,
and the guard's attempts (``--json`` prints the whole report instead)."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from qtool.cli.app import console, info

MAX_NOTES = 6  # per pass in the human report; --json has them all


def print_report(report: dict) -> None:
    ops = report["ops"]
    if ops:
        table = Table(title=f"{report['mode']} ({report['format']})", title_justify="left", show_edge=False)
        for col in ("op", "quantized", "float", "why float"):
            table.add_column(col, justify="right" if col in ("quantized", "float") else "left")
        for op, row in ops.items():
            reasons = "; ".join(f"{escape(k)} ({v})" for k, v in row["reasons"].items())
            table.add_row(op, str(row["quantized"]), str(row["float"]), reasons)
        console.print(table)
    for p in report["passes"]:
        counts = ", ".join(f"{k} {v}" for k, v in p["counts"].items() if v)
        if counts:
            info(f"{p['name']}: {escape(counts)}")
        for note in p["notes"][:MAX_NOTES]:
            info(f"{p['name']}: {escape(note)}")
        if len(p["notes"]) > MAX_NOTES:
            info(f"{p['name']}: {len(p['notes']) - MAX_NOTES} more notes in --json")
    if report.get("guard"):
        print_guard(report["guard"])
    sizes = report["size_bytes"]
    if report["output"] is None:
        info("nothing was written")
        return
    info(f"wrote {escape(report['output'])}: {sizes['output'] / 1e6:.2f} MB "
         f"({report['size_ratio']:.2f}x of {sizes['input'] / 1e6:.2f} MB) in {report['seconds']:.1f} s")
    fid = report.get("fidelity")
    if fid:
        info(f"fidelity on one sample: cosine {fid['cosine']:.5f}, SQNR {fid['sqnr_db']:.1f} dB")
    if report.get("identical") is not None:
        info("outputs on one sample: " + ("bit-identical to the input model's" if report["identical"]
                                          else "differ from the input model's"))


def print_guard(guard: dict) -> None:
    """Every candidate the guard measured, and what it decided."""
    table = Table(title=f"guard ({escape(guard['holdout'])})", title_justify="left", show_edge=False)
    for col in ("candidate", "worst SQNR dB", "agreement", "speed vs float", "size MB", "verdict"):
        table.add_column(col, justify="left" if col in ("candidate", "verdict") else "right")
    for a in guard["attempts"]:
        worst = min((o["segment_sqnr_db"] for o in a["outputs"]
                     if isinstance(o["segment_sqnr_db"], float)), default=None)
        agree = [o["agreement"] for o in a["outputs"] if o["agreement"] is not None]
        ratio = a["latency_ratio"]
        verdict = ("meets the floor" if a["meets_floor"] else
                   escape(a["error"] or "; ".join(a["shortfalls"])))
        table.add_row(escape(a["label"]), "-" if worst is None else f"{worst:.1f}",
                      f"{min(agree):.3f}" if agree else "-",
                      f"{1 / ratio:.2f}x" if ratio else "-", f"{a['size_bytes'] / 1e6:.3f}", verdict)
    console.print(table)
    info(f"guard: {escape(guard['decision'])}")
