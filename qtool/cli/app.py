"""The Typer app and the terminal plumbing every command shares.

Results go to stdout (``--json``); tables, progress and messages go to stderr, so
``qtool inspect m.onnx --json | jq`` works while progress stays visible.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from qtool import __version__

HELP = """\
Compress ONNX models and prove the result.

\b
  qtool inspect model.onnx                      what is in a model, what can be quantized
  qtool calibrate model.onnx --data calib/ -o table.json
  qtool convert model.onnx -o int8.onnx --calib table.json
  qtool convert model.onnx -o int4.onnx --bits 4
  qtool eval int8.onnx --reference model.onnx --data eval/ --max-drop 0.01

Exit codes: 0 success, 1 error, 2 usage error, 3 a quality gate failed.
"""



class NoArguments(Exception):
    """A command (or bare ``qtool``) run without arguments: its help is the answer (exit 2)."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx.get_help())
        self.help = ctx.get_help()


# -- help text ---------------------------------------------------------------------------
# Typer renders required arguments as ``{model}`` and option values as Python types
# (``<list[str]>``, ``<path>``). qtool's help uses the conventional upper-case names instead:
# ``Usage: qtool convert [OPTIONS] MODEL``, ``--exclude TEXT``, ``--method [minmax|...]``.

_TYPE_METAVARS = {int: "INTEGER", float: "FLOAT", str: "TEXT", bool: "BOOLEAN",
                  "integer": "INTEGER", "float": "FLOAT", "path": "PATH", "text": "TEXT",
                  "boolean": "BOOLEAN", "file": "FILE"}


def _metavar(param: Any) -> str:
    """INTEGER, FLOAT, TEXT, PATH or [a|b|c], from Typer's type descriptor (Typer >= 0.20)
    or the click type (older Typer)."""
    desc = getattr(param, "type_descriptor", None)
    if desc is not None:
        if desc.is_choice:
            return "[" + "|".join(str(getattr(c, "value", c)) for c in desc.choices) + "]"
        if desc.is_path:
            return "PATH"
        annotation = desc.annotation
        if desc.is_list:
            annotation = getattr(annotation, "__args__", (str,))[0]
        return _TYPE_METAVARS.get(annotation, "VALUE")
    kind = getattr(param, "type", None)
    choices = getattr(kind, "choices", None)
    if choices:
        return "[" + "|".join(str(getattr(c, "value", c)) for c in choices) + "]"
    return _TYPE_METAVARS.get(getattr(kind, "name", ""), "VALUE")


def _no_arguments(command: Any, ctx: Any, args: list[str]) -> None:
    if not args and not ctx.resilient_parsing:
        raise NoArguments(ctx)


class QtoolCommand(TyperCommand):
    """A command whose help shows MODEL, not ``{model}``, and value names, not Python types."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.param_type_name == "argument":
                param.metavar = param.metavar or param.name.upper()
            elif param.metavar is None and not getattr(param, "is_flag", False):
                param.metavar = _metavar(param)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(param.metavar + ("..." if param.nargs != 1 else ""))
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                arguments.append((param.metavar + ("..." if param.nargs != 1 else ""), param.help or ""))
            else:
                record = param.get_help_record(ctx)
                if record is not None:
                    options.append(record)
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        if options:
            with formatter.section("Options"):
                formatter.write_dl(options)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        _no_arguments(self, ctx, args)
        return super().parse_args(ctx, args)


class QtoolGroup(TyperGroup):
    """The root group: bare ``qtool`` prints the help (exit 2, a usage error), not an error:
    line that quotes it."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        _no_arguments(self, ctx, args)
        return super().parse_args(ctx, args)


class QtoolTyper(typer.Typer):
    """Every command registered on the app renders its help the qtool way."""

    def command(self, *args: Any, cls: Any = None, **kwargs: Any) -> Callable:
        return super().command(*args, cls=cls or QtoolCommand, **kwargs)


app = QtoolTyper(
    name="qtool",
    help=HELP,
    cls=QtoolGroup,
    no_args_is_help=False,  # QtoolGroup handles it: help text, exit 2, no "error: Usage:"
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@dataclass
class Settings:
    verbose: bool = False
    quiet: bool = False


settings = Settings()

# In a terminal Rich wraps at the terminal's width. Elsewhere (CI logs, files, pipes) it would
# wrap at 80 columns, splitting warnings mid-sentence and cutting table cells; there every
# message stays one line and tables take the width they need (COLUMNS, when set, still rules).
LOG_WIDTH = 4096


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty() or os.environ.get("COLUMNS"):
        return Console(stderr=stderr, highlight=False, soft_wrap=not stderr)
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=LOG_WIDTH)


console = _console(stderr=True)
stdout = _console(stderr=False)


def info(message: str) -> None:
    """A line on stderr, unless --quiet."""
    if not settings.quiet:
        console.print(message)


def warn(message: str) -> None:
    """A warning on stderr; shown even with --quiet."""
    console.print(f"[yellow]warning:[/yellow] {message}")


def warn_if_workers_cannot_help(executor) -> None:  # noqa: ANN001 - qtool.executors.Executor
    """Say when local workers will be no faster: on K or fewer cores one process already
    keeps every core busy (calibration's two sessions, gptq's layers on threads)."""
    from qtool.hardware import available_cores

    cores = available_cores()
    if getattr(executor, "kind", None) == "local" and executor.workers > 1 and cores <= executor.workers:
        warn(f"{executor.workers} local workers on {cores} cores: one process already uses every core, "
             "so this is no faster (calibration 1.01x, gptq 0.90x on 2 cores, bench/results/scale.md); "
             "workers pay off with more cores each or on a Ray cluster (--executor ray://HOST:PORT)")


def debug(message: str) -> None:
    if settings.verbose:
        console.print(f"[dim]{message}[/dim]")


def emit_json(data: Any) -> None:
    """Write a result document to stdout (the only thing commands print there)."""
    sys.stdout.write(json.dumps(data, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# -- progress ----------------------------------------------------------------------------
# A bar counts in one unit, named by its caller. Without a unit the helper cannot know what
# the numbers are (bytes, nodes, samples), so it shows no count and no rate: the bar and
# percentage when the total is known, a spinner and the elapsed time when it is not. With a
# unit and an unknown total it shows the count and the elapsed time, never a rate
# (qtool.pipeline.progress documents the same contract for library callers).


def _amount(value: float, unit: str) -> str:
    return f"{value / 1e6:.1f}" if unit == "B" else f"{value:.0f}"


class _CountColumn(ProgressColumn):
    """``done/total unit`` (``done unit`` while the total is unknown); MB for bytes."""

    def __init__(self, unit: str | None) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Any) -> Text:
        if self.unit is None:
            return Text("")
        shown = "MB" if self.unit == "B" else self.unit
        done = _amount(task.completed, self.unit)
        if task.total is None:
            return Text(f"{done} {shown}", style="progress.download")
        return Text(f"{done}/{_amount(task.total, self.unit)} {shown}", style="progress.download")


class _RateColumn(ProgressColumn):
    """``N unit/s`` (MB/s for bytes); nothing without a unit, or while the total is unknown
    (a caller that cannot size the work, e.g. steps of differing cost, has no steady rate)."""

    def __init__(self, unit: str | None) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        if self.unit is None or task.total is None or not speed:
            return Text("")
        if self.unit == "B":
            return Text(f"{speed / 1e6:.1f} MB/s", style="progress.data.speed")
        return Text(f"{speed:.1f} {self.unit}/s", style="progress.data.speed")


class _PercentColumn(ProgressColumn):
    def render(self, task: Any) -> Text:
        if task.total is None:
            return Text("")
        return Text(f"{task.percentage:>3.0f}%", style="progress.percentage")


class _RemainingColumn(ProgressColumn):
    """``eta M:SS`` once the total is known and a rate measured; nothing before."""

    max_refresh = 0.5

    def render(self, task: Any) -> Text:
        remaining = task.time_remaining
        if task.total is None or remaining is None or task.finished:
            return Text("")
        minutes, seconds = divmod(int(remaining), 60)
        return Text(f"eta {minutes}:{seconds:02d}", style="progress.remaining")


Advance = Callable[..., None]


@contextlib.contextmanager
def progress(description: str, total: float | None, unit: str | None = None) -> Iterator[Advance]:
    """A progress bar on stderr. ``unit`` names what is counted ("samples", "layers", or "B"
    for bytes, shown as MB); ``total`` may be None when unknown. Yields
    ``advance(n=1, total=None)``: adds ``n`` done and, when given, sets the total (a callee
    that learns it late). A no-op when --quiet."""
    if settings.quiet:
        yield lambda n=1, total=None: None
        return
    columns = [
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        _PercentColumn(),
        _CountColumn(unit),
        _RateColumn(unit),
        TimeElapsedColumn(),
        _RemainingColumn(),
    ]
    # A log gets each finished bar once, as one line (Rich's live display would add a blank
    # line after it, and before the error: line of a step that failed).
    interactive = console.is_interactive
    with Progress(*columns, console=console, transient=False, disable=not interactive) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: float = 1, total: float | None = None) -> None:
            if total is not None:
                bar.update(task, total=total)
            bar.advance(task, n)

        try:
            yield advance
        except BaseException:
            bar.live.transient = True  # a failed step leaves only its error: line behind
            raise
    if not interactive:
        console.print(bar.get_renderable())


@contextlib.contextmanager
def timed() -> Iterator[dict]:
    """Measure wall time into ``result['seconds']``."""
    result: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield result
    finally:
        result["seconds"] = time.perf_counter() - start


def version_callback(value: bool) -> None:
    if value:
        from qtool.hardware import kernel_backend

        backend = kernel_backend()
        paths = ", ".join(backend["isa_paths"]) or "none"
        sys.stdout.write(f"qtool {__version__} (kernels: {backend['backend']}; isa: {paths})\n")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True,
        help="Print the version and the active kernel backend, then exit.",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More detail; tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only results and errors; no progress."),
) -> None:
    settings.verbose = settings.verbose or verbose
    settings.quiet = settings.quiet or quiet
