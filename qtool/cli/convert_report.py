"""The human report of `qtool convert`: what became of each op, each pass's counts and notes,
and the guard's attempts (``--json`` prints the whole report instead)."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from qtool.cli.app import console, info
from qtool.pipeline.summary import GENERIC_REASONS, UNSUPPORTED

MAX_NOTES = 6  # per pass in the human report; --json has them all
MAX_UNTOUCHED = 8  # op types named on the "left float" line; --json has them all


def _split_untouched(ops: dict) -> tuple[dict, dict]:
    """The table's rows, and the op types the scheme does not handle at all (nothing
    quantized, no reason but the scheme's generic one): a decoder's 4,900 Unsqueeze, Mul and
    Concat nodes under weight-only would otherwise bury the rows that say something."""
    untouched = {op: row for op, row in ops.items()
                 if not row["quantized"] and row["reasons"] and set(row["reasons"]) <= GENERIC_REASONS}
    return {op: row for op, row in ops.items() if op not in untouched}, untouched


def _untouched_line(untouched: dict) -> str:
    """``left float: 4890 nodes of 25 op types this scheme does not handle (Unsqueeze 1005, ...)``"""
    reasons = {reason for row in untouched.values() for reason in row["reasons"]}
    why = "this scheme does not handle" if reasons == {UNSUPPORTED} else "; ".join(sorted(reasons))
    ranked = sorted(untouched.items(), key=lambda item: (-item[1]["float"], item[0]))
    named = ", ".join(f"{op} {row['float']}" for op, row in ranked[:MAX_UNTOUCHED])
    more = f", {len(ranked) - MAX_UNTOUCHED} more in --json" if len(ranked) > MAX_UNTOUCHED else ""
    nodes = sum(row["float"] for row in untouched.values())
    return f"left float: {nodes} node(s) of {len(untouched)} op type(s) {escape(why)} ({named}{more})"


def print_report(report: dict) -> None:
    ops = report["ops"]
    if ops:
        table = Table(title=f"{report['mode']} ({report['format']})", title_justify="left", show_edge=False)
        for col in ("op", "quantized", "float", "why float"):
            table.add_column(col, justify="right" if col in ("quantized", "float") else "left")
        shown, untouched = _split_untouched(ops)
        for op, row in shown.items():
            reasons = "; ".join(f"{escape(k)} ({v})" for k, v in row["reasons"].items())
            table.add_row(op, str(row["quantized"]), str(row["float"]), reasons)
        if shown:
            console.print(table)
        if untouched:
            info(_untouched_line(untouched))
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
