"""`qtool tune`: mixed precision per layer group, the smallest model within an accuracy budget."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from qtool.cli.app import app, console, emit_json, info, progress, settings, warn


class GroupBy(str, Enum):
    auto = "auto"
    layer = "layer"
    role = "role"


def _default_cache() -> Path:
    import os

    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "qtool" / "tune"


@app.command("tune")
def tune_command(
    model: Path = typer.Argument(..., help="The float .onnx model (never modified)."),
    data: Path = typer.Option(..., "--data", metavar="DIR", help="Sample folder: every other sample searches, the rest is held out."),
    output: Path = typer.Option(..., "-o", "--output", metavar="FILE", help="Where to write the tuned model (recipe and table beside it)."),
    eval_data: Path = typer.Option(None, "--eval-data", metavar="DIR", help="Held-out sample folder (then all of --data searches)."),
    metric: str = typer.Option(None, "--metric", metavar="METRIC", help="top1, top5, accuracy, perplexity, cosine or module:function [default: by model]."),
    max_drop: str = typer.Option(None, "--max-drop", metavar="X|N%", help="Largest metric loss: metric units (0.01) or percent of float (2%) [default: 1%]."),
    target_size: float = typer.Option(None, "--target-size", metavar="MB", help="Largest model size in MB, instead of --max-drop (then accuracy is maximised)."),
    bits: str = typer.Option("8,4", "--bits", metavar="B,B,...", help="Candidate precisions below float, e.g. 8,4 or 8,4,2."),
    budget_minutes: float = typer.Option(None, "--budget-minutes", metavar="MIN", help="Wall-clock budget; measuring stops in time to verify [default: none]."),
    recipe: str = typer.Option(None, "--recipe", metavar="NAME|FILE", help="Base recipe (preset or .toml) [default: int8-static for CNNs, int4-weight-only otherwise]."),
    group: GroupBy = typer.Option(GroupBy.auto, "--group", help="layer, role (layers named alike up to digits), auto (layer up to 32 layers)."),
    limit: int = typer.Option(0, "--limit", metavar="N", help="At most N samples per split, 0 for all."),
    cache: Path = typer.Option(None, "--cache", metavar="DIR", help="Sensitivity cache folder [default: ~/.cache/qtool/tune]."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Measure everything again, keep nothing."),
    plot: Path = typer.Option(None, "--plot", metavar="FILE", help="Write the size-vs-metric frontier to this .png or .svg."),
    uniform: bool = typer.Option(True, "--uniform/--no-uniform", help="Also score uniform candidates (every group at each --bits) on held-out data."),
    threads: int = typer.Option(0, "--threads", metavar="T", help="onnxruntime intra-op threads, 0 for its default."),
    allow_opset_upgrade: bool = typer.Option(False, "--allow-opset-upgrade", help="Let Conv weights take 4/2 bits (blocked DequantizeLinear) by raising the opset to 21/25."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    html: Path = typer.Option(None, "--html", metavar="FILE", help="Write a self-contained HTML report (the size-vs-metric frontier) to FILE."),
    executor: str = typer.Option(None, "--executor", metavar="local|ray|ray://HOST:PORT", help="Build and score the sensitivity candidates, and split each held-out check, over workers: local (one process per CPU), ray, or ray://HEAD:10001. Same result as without."),
) -> None:
    """Find per-layer precisions (float, int8, int4, lower) that minimise size within --max-drop.

    Sensitivity: each layer group alone at each precision, scored on the search split
    (cached). Search: a greedy chain of precision cuts, the longest prefix within budget.
    Verify: the result is scored on held-out samples; over budget, the most sensitive
    lowered group goes up a precision and it is checked again. Writes OUT, OUT's recipe
    (OUT.recipe.toml, which `qtool convert --recipe` reproduces OUT from), OUT.frontier.md,
    and for static int8 the calibration table OUT.calib.json. Exit 3 when the verified
    drop is over budget (time ran out during the fallback).

    \b
    \b
    Examples:
      qtool tune cnn.onnx --data samples/ -o cnn.tuned.onnx --max-drop 0.01
      qtool tune llm.onnx --data windows/ -o llm.tuned.onnx --max-drop 2% --bits 8,4 --limit 8
      qtool tune m.onnx --data d/ --eval-data held/ -o m.small.onnx --target-size 5 --plot f.svg
    """
    from qtool.errors import GateFailed, ModelError, UsageError
    from qtool.tuning import tune

    if limit < 0:
        raise UsageError(f"--limit must be >= 0, got {limit}", "0 uses every sample; e.g. --limit 64")
    if threads < 0:
        raise UsageError(f"--threads must be >= 0, got {threads}", "0 lets onnxruntime choose")
    if no_cache and cache is not None:
        raise UsageError("--cache and --no-cache cannot be combined", "drop one of them")
    if not model.exists():
        raise ModelError(f"model file not found: {model}", "check the path")
    if html is not None:
        from qtool.cli.eval import check_outputs

        check_outputs({"--html": html, "-o": output}, {"model": model}, data)
    import contextlib
    import os

    from qtool.executors import make_executor, parse_executor

    workers = (os.cpu_count() or 1) if parse_executor(executor)[0] == "local" else 1
    with make_executor(executor, workers) if executor else contextlib.nullcontext() as ex:
        result = tune(
            model, data, output, eval_data=eval_data, metric=metric, max_drop=max_drop,
            target_mb=target_size, bits=bits, budget_minutes=budget_minutes, recipe=recipe,
            group=group.value, limit=limit, cache_dir=None if no_cache else (cache or _default_cache()),
            plot_path=plot, uniform=uniform, threads=threads, allow_opset_upgrade=allow_opset_upgrade,
            progress=progress, executor=ex,
        )
    doc = result.to_dict()
    if html is not None:
        from qtool.eval.html import render_tune, write_html

        write_html(render_tune(json.loads(json.dumps(doc))), html)
        info(f"HTML report written to {escape(str(html))}")
    if json_out:
        emit_json(doc)
    if not settings.quiet or not json_out:
        _print(result)
    if not result.within_budget:
        what = (f"{result.metric} drop {result.drop:.4g} > {result.budget:.4g}" if result.mode == "max-drop"
                else f"size {result.size_bytes / 1e6:.2f} MB > {result.budget / 1e6:.2f} MB")
        raise GateFailed(f"the tuned model misses the budget on held-out data: {what}",
                         "give more --budget-minutes, a looser budget, or higher --bits")


def _print(result) -> None:
    table = Table(title=f"qtool tune: {result.metric} on held-out data", title_justify="left")
    for col in ("candidate", "size MB", result.metric, "drop", "groups per bits", "frontier"):
        table.add_column(col, justify="left" if col in ("candidate", "groups per bits") else "right")
    for c in sorted((c for c in result.candidates if c.split == "held-out"), key=lambda c: c.size_bytes):
        table.add_row(escape(c.label), f"{c.size_bytes / 1e6:.3f}", f"{c.metric:.4f}", f"{c.drop:+.4f}",
                      c.mix, "yes" if c.frontier else "")
    console.print(table)
    for note in result.notes:
        warn(note) if "time budget" in note else info(f"note: {escape(note)}")
    info(f"wrote {escape(str(result.output))} ({result.size_bytes / 1e6:.2f} MB, float {result.float_bytes / 1e6:.2f} MB), "
         f"{escape(str(result.recipe_path))}, {escape(str(result.frontier_path))}"
         + (f", {escape(str(result.table_path))}" if result.table_path else "")
         + (f", {escape(str(result.plot_path))}" if result.plot_path else ""))
    info(f"{result.measured} measurements ({result.cached} from the cache), {result.fallback_steps} fallback "
         f"step(s), {result.seconds:.1f} s")
