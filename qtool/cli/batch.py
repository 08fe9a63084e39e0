"""`qtool batch`: a model zoo through convert + eval + gates in one job, one exit code."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from qtool.cli.app import app, console, emit_json, info, progress, settings
from qtool.executors import EXECUTOR_HELP


@app.command("batch")
def batch_command(
    source: Path = typer.Argument(..., help="A manifest (.toml/.json) or a folder of .onnx models."),
    output: Path = typer.Option(..., "-o", "--output", metavar="DIR", help="Folder for NAME.onnx and NAME.eval.json."),
    recipe: str = typer.Option(None, "--recipe", metavar="NAME|FILE", help="Default recipe for every model [default: convert's]."),
    data: Path = typer.Option(None, "--data", metavar="DIR", help="Default calibration/guard samples."),
    eval_data: Path = typer.Option(None, "--eval-data", metavar="DIR", help="Default held-out samples for eval and the gates."),
    max_drop: str = typer.Option(None, "--max-drop", metavar="X|N%", help="Default gate: max metric drop (0.01 or 1%)."),
    min_sqnr: float = typer.Option(None, "--min-sqnr", metavar="DB", help="Default gate: min output SQNR in dB."),
    executor: str = typer.Option(None, "--executor", metavar="local|ray|ray://HOST:PORT", help=EXECUTOR_HELP + " One model per task."),
    workers: int = typer.Option(1, "--workers", metavar="K", help="With --executor local: K models at a time."),
    json_out: bool = typer.Option(False, "--json", help="Print the rows as JSON on stdout."),
) -> None:
    """Convert, evaluate and gate many models in one job: one row per model, one exit code.

    A manifest has a [defaults] table and one [[model]] table per model, with the keys path,
    name, recipe, data, calib, eval_data, metric, max_drop, min_sqnr, guard, threads (paths
    relative to the manifest). A folder means every .onnx in it, with the defaults given
    here. A model that fails is reported in its row and the others still run.

    Exit codes: 0 every model passed, 1 a model errored, 2 usage error, 3 a gate failed
    (or convert refused a model).

    \b
    Examples:
      qtool batch zoo.toml -o out/ --workers 2
      qtool batch models/ -o out/ --recipe int8-static --data calib/ --eval-data eval/ --max-drop 1%
      qtool batch zoo.toml -o /shared/out --executor ray://head:10001
    """
    from qtool.errors import UsageError
    from qtool.executors import make_executor, parse_executor
    from qtool.executors.batch import batch_exit_code, read_jobs, run_batch

    if workers > 1 and parse_executor(executor)[0] != "local":
        raise UsageError("--workers sizes local processes", "drop --workers with --executor ray")
    output.mkdir(parents=True, exist_ok=True)
    given = {"recipe": recipe, "data": str(data) if data else None, "eval_data": str(eval_data) if eval_data else None,
             "max_drop": max_drop, "min_sqnr": min_sqnr}
    jobs = read_jobs(source, output, {k: v for k, v in given.items() if v is not None})
    with make_executor(executor, workers) as ex:
        with progress(f"batch ({ex.describe()})", len(jobs), "models") as advance:
            rows = run_batch(jobs, ex, lambda task: advance(1))
    if json_out:
        emit_json(rows)
    if not settings.quiet:
        _print_rows(rows)
    code = batch_exit_code(rows)
    info(f"{sum(r['status'] == 'passed' for r in rows)} of {len(rows)} models passed; exit {code}")
    raise typer.Exit(code)


def _print_rows(rows: list[dict]) -> None:
    t = Table(title="batch", title_justify="left", show_edge=False)
    for col in ("model", "status", "size", "metric", "drop", "SQNR dB", "s", "detail"):
        t.add_column(col, justify="left" if col in ("model", "status", "metric", "detail") else "right")
    for r in rows:
        size = f"{r['bytes'] / 1e6:.2f} MB ({r['float_bytes'] / r['bytes']:.1f}x)" if r["bytes"] else ""
        metric = f"{r['metric']} {r['value']:.4g}" if r["metric"] else ""
        t.add_row(escape(r["name"]), r["status"], size, metric, _num(r["drop"]), _num(r["sqnr_db"]),
                  f"{r['seconds']:.1f}", escape(r["detail"][:160]))
    console.print(t)


def _num(v) -> str:  # noqa: ANN001
    return "" if v is None else f"{v:.4g}"
