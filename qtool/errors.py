"""The one exception family of qtool, and the exit codes the CLI maps it to.

Library code raises these; only `qtool.cli` catches them, prints ``error:`` and ``hint:``
to stderr and exits with the code below.
"""

from __future__ import annotations

# Shown on stderr when Ctrl-C stops a command: every output is written to a temporary file
# and renamed into place only when complete, so an interrupted command leaves nothing behind.
# Here, not in qtool.cli, so that the entry point can say it before the CLI is imported.
INTERRUPTED = "interrupted, nothing was written"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a command stopped by Ctrl-C

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_GATE_FAILED = 3


class QtoolError(Exception):
    """A user-facing failure: a message that says what went wrong and a hint that says what to do."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(QtoolError):
    """Bad flags or flag combinations (exit 2)."""

    exit_code = EXIT_USAGE


class ModelError(QtoolError):
    """A model file that cannot be read, is not ONNX, or that onnxruntime cannot load."""


class DataError(QtoolError):
    """A dataset folder that is empty, unreadable or does not match the model's inputs."""


class RecipeError(QtoolError):
    """A recipe with unknown keys or invalid values."""

    exit_code = EXIT_USAGE


class CalibrationError(QtoolError):
    """Calibration failed: non-finite activations, a table for another model, a bad shard."""


class ConversionError(QtoolError):
    """A rewrite could not be applied (and nothing was written)."""


class NativeError(QtoolError):
    """A C kernel returned a non-zero status."""


class GateFailed(QtoolError):
    """A quality gate (accuracy or latency threshold) was not met (exit 3)."""

    exit_code = EXIT_GATE_FAILED
