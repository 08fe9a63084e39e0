"""Executors: where fanned-out work runs (local processes or a Ray cluster).

``make_executor(spec, workers)`` turns the CLI's ``--executor`` / ``--workers`` into one:

- ``local`` (default): ``workers`` processes on this machine (one: this process itself);
- ``ray``: the Ray cluster this machine belongs to, or a private one started here;
- ``ray://HOST:PORT``: a remote Ray cluster through Ray Client.

Work that fans out (calibration shards, tune's candidates, sharded eval, batch jobs) is a
list of ``Task``; ``Executor.map`` returns their results in task order, and every merge is
done in that order, so the answer does not depend on where or in which order tasks ran.
"""

from __future__ import annotations

from qtool.errors import UsageError
from qtool.executors.base import DEFAULT_RETRIES, Executor, ShardError, Shared, Task

__all__ = ["DEFAULT_RETRIES", "EXECUTOR_HELP", "Executor", "InlineExecutor", "LocalExecutor", "ShardError", "Shared", "Task", "make_executor",
           "parse_executor"]

EXECUTOR_HELP = ("Where shards run: local (this machine's processes, see --workers), ray (this machine's "
                 "Ray cluster, or a private one), or ray://HOST:10001 (a cluster's head).")


def __getattr__(name: str):  # noqa: ANN202 - the executor classes, imported on first use
    # The CLI imports this package for its help text: multiprocessing and concurrent.futures
    # load only when an executor is made.
    if name in ("InlineExecutor", "LocalExecutor"):
        from qtool.executors import local

        return getattr(local, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_executor(spec: str | None) -> tuple[str, str | None]:
    """``("local", None)``, ``("ray", None)`` or ``("ray", "ray://host:port")``."""
    if spec is None or spec == "local":
        return "local", None
    if spec == "ray":
        return "ray", None
    if spec.startswith("ray://") and len(spec) > len("ray://"):
        return "ray", spec
    raise UsageError(f"unknown executor {spec!r}", "use --executor local, ray, or ray://HEAD:10001")


def make_executor(spec: str | None = None, workers: int = 1) -> Executor:
    """The executor ``spec`` names (see the module doc). ``workers`` sizes a local pool; on
    Ray the cluster's CPUs decide, so a ``workers`` above 1 there is an error."""
    kind, address = parse_executor(spec)
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}", "e.g. --workers 2")
    if kind == "local":
        from qtool.executors.local import InlineExecutor, LocalExecutor

        return LocalExecutor(workers) if workers > 1 else InlineExecutor()
    if workers > 1:
        raise UsageError("--workers sizes local processes; a Ray cluster's size is its CPUs",
                         "drop --workers with --executor ray (start more nodes, or ray start --num-cpus N)")
    from qtool.executors.rayexec import RayExecutor

    return RayExecutor(address)
