"""What every executor shares: a named task, the failure that names it, and the map contract.

A task is a module-level function and its arguments: both travel by pickle (local processes)
or cloudpickle (Ray), so the function must be importable by name on the worker. Results come
back in task order whatever order the workers finish in, so a caller that merges them in
that order gets the same answer on 1 process, K processes or a cluster.
"""

from __future__ import annotations

import abc
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from qtool.errors import EXIT_ERROR, QtoolError

# A lost worker (killed process, lost node) is retried this many times; an exception raised by
# the task itself is not: qtool's work is deterministic, so it would fail the same way again.
DEFAULT_RETRIES = 3


class ShardError(QtoolError):
    """One task of a fanned-out run failed; the message names it (``shard 2/4``, ``conv1@4``)."""

    def __init__(self, message: str, hint: str = "", exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Task:
    """``fn(*args, **kwargs)`` on some worker, known as ``name`` in progress and errors."""

    name: str
    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def task_failed(task: Task, exc: BaseException) -> ShardError:
    """The error for a task whose own code raised ``exc``: the task's name first, then the
    original message and hint (a QtoolError keeps its exit code, so a usage error stays 2)."""
    if isinstance(exc, QtoolError):
        return ShardError(f"{task.name} failed: {exc.message}", exc.hint, exc.exit_code)
    text = str(exc).strip().splitlines()
    detail = f"{type(exc).__name__}: {text[-1] if text else ''}".rstrip(": ")
    return ShardError(f"{task.name} failed: {detail}",
                      "run it alone (without --executor/--workers) to see the full traceback")


def worker_lost(task: Task, attempts: int, detail: str) -> ShardError:
    return ShardError(
        f"{task.name} failed: its worker was lost {attempts} time(s) ({detail})",
        "a worker process died (out of memory? killed?); check the node's memory, or use fewer workers",
    )


# Values a worker process already fetched through a Shared handle, by key: a task that
# needs the same large value (a model, reference outputs) as the previous one on that worker
# does not fetch or rebuild it again. A few entries only: each may be hundreds of MB.
_FETCHED: dict[str, Any] = {}
_FETCHED_MAX = 2


@dataclass(frozen=True)
class Shared:
    """A handle to one large value shared by many tasks, fetched once per worker process:
    a pickle file in the local executor's scratch folder, or a Ray object reference."""

    key: str
    path: str | None = None
    ref: Any = None
    value: Any = None  # in-process executors hand the value itself

    def get(self) -> Any:
        if self.value is not None:
            return self.value
        if self.key in _FETCHED:
            return _FETCHED[self.key]
        if self.path is not None:
            with open(self.path, "rb") as f:
                value = pickle.load(f)
        else:
            import ray

            value = ray.get(self.ref)
        while len(_FETCHED) >= _FETCHED_MAX:
            _FETCHED.pop(next(iter(_FETCHED)))
        _FETCHED[self.key] = value
        return value


class Executor(abc.ABC):
    """Runs independent tasks on ``workers`` slots and returns their results in task order."""

    kind: str = ""
    workers: int = 1
    retries: int = DEFAULT_RETRIES

    @abc.abstractmethod
    def map(self, tasks: Sequence[Task], on_done: Callable[[Task], None] | None = None) -> list:
        """Run every task; ``on_done(task)`` as each finishes. Raises ShardError naming the
        first failed task (the others are stopped). Ctrl-C stops every task it started."""

    def call_each(self, fn: Callable[..., Any], calls: Sequence[tuple[str, tuple]]) -> list:
        """``fn(*args)`` for each ``(name, args)`` of ``calls``, as tasks known by ``name``; the
        results in order. For callers that must not import this package (the passes)."""
        return self.map([Task(name, fn, args) for name, args in calls])

    def put(self, value: Any) -> Any:
        """A handle for ``value`` that tasks receive as an argument: the value itself
        locally, an object-store reference on Ray (shipped to each node once)."""
        return value

    @abc.abstractmethod
    def share(self, value: Any) -> Shared:
        """A Shared handle to ``value`` for tasks that each call ``.get()`` (once per worker)."""

    def describe(self) -> str:
        return f"{self.kind} x{self.workers}"

    def close(self) -> None:  # noqa: B027 - most executors hold nothing to release
        """Release what this executor started (processes, a Ray connection it opened)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
