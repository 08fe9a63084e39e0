"""qtool's command line: the only place that prints to the terminal or exits.

Each command lives in its own module and registers itself on the shared ``app``; importing
them here is what makes them part of the CLI.
"""

from __future__ import annotations

import sys
import traceback

from qtool._deferred import defer_unused

# The command line is a process of our own: defer sympy (0.3 s of start-up) before anything
# imports onnx-ir. Importing qtool as a library changes nothing in the caller's sys.modules.
defer_unused()

import typer  # noqa: E402
from rich.markup import escape  # noqa: E402

from qtool.cli.app import app, console, settings  # noqa: E402
from qtool.errors import EXIT_ERROR, EXIT_USAGE, QtoolError  # noqa: E402

try:  # typer >= 0.20 vendors click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer with click installed
    from click import exceptions as click_exceptions

from qtool.cli import calibrate as _calibrate  # noqa: E402,F401  (registers the command)
from qtool.cli import convert as _convert  # noqa: E402,F401  (registers the command)
from qtool.cli import eval as _eval  # noqa: E402,F401  (registers the command)
from qtool.cli import inspect as _inspect  # noqa: E402,F401  (registers the command)
from qtool.cli import tune as _tune  # noqa: E402,F401  (registers the command)

__all__ = ["app", "main", "run"]


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` and return the exit code (never raises)."""
    command = typer.main.get_command(app)
    argv = _take_global_flags(list(sys.argv[1:] if argv is None else argv))
    try:
        result = command.main(args=argv, prog_name="qtool", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except QtoolError as exc:
        _report(exc.message, exc.hint)
        return exc.exit_code
    except click_exceptions.UsageError as exc:
        sub = exc.ctx.command_path if exc.ctx is not None else "qtool"
        _report(exc.format_message(), f"see '{sub} --help'")
        return EXIT_USAGE
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        _report("interrupted", "nothing was written")
        return 130
    except MemoryError:
        _report("out of memory", "lower --batch-size or --samples, or use a machine with more RAM")
        return EXIT_ERROR
    except Exception as exc:  # a bug in qtool: say so, traceback only with --verbose
        if settings.verbose:
            console.print(traceback.format_exc(), markup=False, highlight=False)
        _report(
            f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            "this is a qtool bug; rerun with --verbose for the traceback and report it",
        )
        return EXIT_ERROR


_GLOBAL_FLAGS = {"-v": "verbose", "--verbose": "verbose", "-q": "quiet", "--quiet": "quiet"}


def _take_global_flags(argv: list[str]) -> list[str]:
    """Accept --verbose/--quiet anywhere on the line, not only before the command."""
    settings.verbose = settings.quiet = False
    rest = []
    for i, arg in enumerate(argv):
        if arg == "--":
            rest.extend(argv[i:])
            break
        if arg in _GLOBAL_FLAGS:
            setattr(settings, _GLOBAL_FLAGS[arg], True)
        else:
            rest.append(arg)
    return rest


def _report(message: str, hint: str) -> None:
    console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    if hint:
        console.print(f"[bold]hint:[/bold] {escape(hint)}", highlight=False, soft_wrap=True)


def main() -> None:
    sys.exit(run(sys.argv[1:]))
