"""qtool's command line: the only place that prints to the terminal or exits.

Each command lives in its own module and registers itself on the shared ``app``; importing
them here is what makes them part of the CLI.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback

from qtool._deferred import defer_unused

# The command line is a process of our own: defer sympy (0.3 s of start-up) before anything
# imports onnx-ir. Importing qtool as a library changes nothing in the caller's sys.modules.
defer_unused()

import typer  # noqa: E402
from rich.markup import escape  # noqa: E402

from qtool.cli.app import (  # noqa: E402
    NoArguments,
    app,
    console,
    settings,
)
from qtool.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, INTERRUPTED, QtoolError  # noqa: E402

try:  # typer >= 0.20 vendors click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer with click installed
    from click import exceptions as click_exceptions

from qtool.cli import batch as _batch  # noqa: E402,F401  (registers the command)
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
        # make_context + invoke rather than command.main(): Typer's main turns Ctrl-C into a
        # silent exit code 130 before any handler of ours could say what happened.
        with command.make_context("qtool", argv) as ctx:
            result = command.invoke(ctx)
        return result if isinstance(result, int) else 0
    except NoArguments as exc:
        console.print(exc.help, markup=False, highlight=False)
        return EXIT_USAGE
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
        _say_interrupted()
        return EXIT_INTERRUPTED
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


_said_interrupted = threading.Lock()


def _say_interrupted() -> None:
    """The one stderr line for Ctrl-C, printed once even if the watchdog races the handler."""
    if _said_interrupted.acquire(blocking=False):
        sys.stderr.write(INTERRUPTED + "\n")
        sys.stderr.flush()


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
    return _bare_json_means_stdout(rest)


def _bare_json_means_stdout(argv: list[str]) -> list[str]:
    """``eval --json`` with no path prints to stdout, as ``--json`` does in every other
    command; ``eval --json PATH`` still writes the file."""
    if not argv or argv[0] != "eval" or "--json" not in argv:
        return argv
    at = argv.index("--json")
    following = argv[at + 1] if at + 1 < len(argv) else None
    if following is None or (following.startswith("-") and following != "-"):
        return argv[:at + 1] + ["-"] + argv[at + 1:]
    return argv


def _report(message: str, hint: str) -> None:
    console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    if hint:
        console.print(f"[bold]hint:[/bold] {escape(hint)}", highlight=False, soft_wrap=True)


# After Ctrl-C the main thread unwinds (temporary outputs are removed on the way) and the
# command exits. Work running in other threads (weight quantization workers, onnxruntime
# calls that do not check for signals) cannot be interrupted and would hold the exit until
# it finishes: GPTQ on a 67 MB model took 13-19 s to stop. So the exit does not wait for
# threads, and if the main thread itself is still stuck in such a call after this grace
# period, the process exits anyway.
INTERRUPT_GRACE_S = 1.0


def _watch_for_interrupts() -> None:
    """Start a thread that sees SIGINT at once (signal.set_wakeup_fd: the C-level handler
    writes to a pipe even while the main thread is inside a long C call) and ends the process
    INTERRUPT_GRACE_S later if it is still running."""
    try:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except (ValueError, OSError):  # not the main thread, or no pipes: plain Ctrl-C handling
        return

    def watch() -> None:
        while True:
            try:
                signals = os.read(read_fd, 64)
            except OSError:
                return
            if signal.SIGINT in signals:
                timer = threading.Timer(INTERRUPT_GRACE_S, _exit_interrupted)
                timer.daemon = True  # a command that still ends on its own is not held
                timer.start()
                return

    threading.Thread(target=watch, name="qtool-interrupt-watch", daemon=True).start()


def _exit_interrupted() -> None:
    _say_interrupted()
    _exit_now(EXIT_INTERRUPTED)


def _exit_now(code: int) -> None:
    """Exit without joining worker threads (they only compute; nothing they hold is written)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main() -> None:
    _watch_for_interrupts()
    try:
        code = run(sys.argv[1:])
    except KeyboardInterrupt:  # Ctrl-C after the command's own handler, e.g. while returning
        _say_interrupted()
        code = EXIT_INTERRUPTED
    if code == EXIT_INTERRUPTED:
        _exit_now(code)
    sys.exit(code)
