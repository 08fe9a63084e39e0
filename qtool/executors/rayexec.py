"""Ray: the same tasks on a Ray cluster (``--executor ray`` or ``--executor ray://HOST:PORT``).

- ``ray``: ``ray.init()`` joins the cluster this machine already belongs to (``ray start``,
  or RAY_ADDRESS) and otherwise starts a private one on this machine;
  ``ray://HOST:10001`` connects through Ray Client to a head started with ``ray start --head``.
  A process that already called ``ray.init`` (a notebook, a test) is used as it is.
- Each task is a Ray task asking for one CPU. ``max_retries`` re-runs a task whose worker
  process or node was lost; exceptions raised by the task are not retried
  (``retry_exceptions=False``): qtool's work is deterministic and would fail again.
- Ctrl-C cancels every task of the run (``ray.cancel(force=True)`` ends running ones).
- ``put`` stores a value in the object store once; tasks get it as an argument.
Workers import qtool by name: every node needs the same qtool installed (``pip install
qtool[ray]``), and the data paths a task reads must exist on the node (shared storage), unless
the driver ships the data through ``put``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from qtool.errors import UsageError
from qtool.executors.base import DEFAULT_RETRIES, Executor, Shared, Task, task_failed, worker_lost

RAY_EXTRA_HINT = "install the Ray extra: pip install 'qtool[ray]' (or pip install 'ray>=2.9')"


def import_ray():  # noqa: ANN201 - the ray module
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray needs Ray, which is not installed", RAY_EXTRA_HINT) from None
    return ray


def _call(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


class RayExecutor(Executor):
    kind = "ray"

    def __init__(self, address: str | None = None, retries: int = DEFAULT_RETRIES) -> None:
        ray = import_ray()
        self.ray = ray
        self.address = address
        self.retries = retries
        self._owns = False
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = address or "a local cluster"
                raise UsageError(f"cannot connect to Ray at {where}: {str(exc).splitlines()[0][:200]}",
                                 "start one with `ray start --head`, then --executor ray://HEAD:10001") from None
            self._owns = True
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote = ray.remote(num_cpus=1, max_retries=retries, retry_exceptions=False)(_call)

    def describe(self) -> str:
        nodes = len([n for n in self.ray.nodes() if n.get("Alive")])
        return f"ray ({nodes} node(s), {self.workers} CPU)"

    def put(self, value: Any) -> Any:
        return self.ray.put(value)

    def share(self, value: Any) -> Shared:
        ref = self.ray.put(value)
        return Shared(ref.hex(), ref=ref)

    def map(self, tasks: Sequence[Task], on_done: Callable[[Task], None] | None = None) -> list:
        ray = self.ray
        tasks = list(tasks)
        # Top-level ObjectRef arguments are resolved by Ray before the call (object-store data).
        refs = [self._remote.options(name=t.name[:100]).remote(t.fn, *t.args, **t.kwargs) for t in tasks]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list = [None] * len(tasks)
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    i = index[ref]
                    results[i] = self._get(ref, tasks[i])
                    if on_done is not None:
                        on_done(tasks[i])
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        return results

    def _get(self, ref, task: Task) -> Any:  # noqa: ANN001
        ex = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except ex.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            raise task_failed(task, cause) from None
        except (ex.WorkerCrashedError, ex.NodeDiedError, ex.ObjectLostError) as exc:
            raise worker_lost(task, self.retries + 1, type(exc).__name__) from None

    def close(self) -> None:
        if self._owns and self.ray.is_initialized():
            self.ray.shutdown()
        self._owns = False
