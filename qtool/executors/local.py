"""Local processes: today's ``--workers K`` behind the executor interface.

A pool of K worker processes (forkserver: a clean interpreter per worker, never a fork of a
parent that already runs onnxruntime threads). A worker that dies (killed, out of memory)
breaks the whole pool in concurrent.futures, so the pool is rebuilt and every task that had
not finished is submitted again; each such loss counts as one attempt of those tasks.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from qtool.executors.base import DEFAULT_RETRIES, Executor, Shared, Task, task_failed, worker_lost

# Imported once by the forkserver, so each worker forks with them loaded: this halves a
# pool's start (about 5 s of imports per worker on a loaded 2-core machine otherwise).
PRELOAD = ["qtool.pipeline", "qtool.executors.calibrate", "qtool.eval.sharded", "qtool.tuning.sensitivity"]


def _call(task: Task):  # noqa: ANN202 - whatever the task returns
    return task.fn(*task.args, **task.kwargs)


def _share_cores(blas_threads: int) -> None:
    """Worker start: BLAS held to the worker's share of the cores. Left at its default, each
    worker's OpenBLAS takes every core and spins while it waits: gptq's layers on 2 workers
    ran at 0.54x of one process on 2 cores (Ray workers get OMP_NUM_THREADS=1 from Ray)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a declared dependency; without it nothing changes
        return
    threadpool_limits(blas_threads, user_api="blas")  # for the life of the worker


class LocalExecutor(Executor):
    kind = "local"

    def __init__(self, workers: int = 1, retries: int = DEFAULT_RETRIES) -> None:
        self.workers = max(1, workers)
        self.retries = retries
        self._pool: ProcessPoolExecutor | None = None
        self._scratch: str | None = None

    def share(self, value) -> Shared:  # noqa: ANN001
        # A pickle file each worker loads once: a pool pickles every task's arguments again.
        if self._scratch is None:
            self._scratch = tempfile.mkdtemp(prefix="qtool-shared-")
        key = uuid.uuid4().hex
        path = os.path.join(self._scratch, key + ".pkl")
        with open(path, "wb") as f:
            pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
        return Shared(key, path=path)

    def _new_pool(self) -> ProcessPoolExecutor:
        self._shutdown(kill=True)
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)  # used when the forkserver starts (once per process)
        from qtool.hardware import available_cores

        self._pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_share_cores,
                                         initargs=(max(1, available_cores() // self.workers),))
        return self._pool

    def map(self, tasks: Sequence[Task], on_done: Callable[[Task], None] | None = None) -> list:
        tasks = list(tasks)
        results: list = [None] * len(tasks)
        attempts = [0] * len(tasks)
        todo = list(range(len(tasks)))
        try:
            while todo:
                pool = self._pool or self._new_pool()
                futures: dict[Future, int] = {}
                for i in todo:
                    attempts[i] += 1
                    futures[pool.submit(_call, tasks[i])] = i
                todo = self._collect(futures, tasks, results, attempts, on_done)
        except BaseException:
            # Ctrl-C or a failed task: stop every process this run started, now.
            self._shutdown(kill=True)
            raise
        return results

    def _collect(self, futures: dict, tasks: list[Task], results: list, attempts: list[int],
                 on_done) -> list[int]:
        """Wait for ``futures``; return the tasks to submit again (their worker was lost)."""
        lost: list[int] = []
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                i = futures[f]
                exc = f.exception()
                if isinstance(exc, BrokenProcessPool):
                    if attempts[i] > self.retries:
                        raise worker_lost(tasks[i], attempts[i], "the process exited abruptly")
                    lost.append(i)
                elif exc is not None:
                    raise task_failed(tasks[i], exc) from None
                else:
                    results[i] = f.result()
                    if on_done is not None:
                        on_done(tasks[i])
        if lost:
            self._new_pool()
        return sorted(lost)

    def _shutdown(self, kill: bool) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if kill:
            # concurrent.futures has no public way to stop running tasks: end the processes.
            for proc in list(getattr(pool, "_processes", {}).values()):
                if proc.is_alive():
                    proc.kill()
        pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        self._shutdown(kill=False)
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


class InlineExecutor(Executor):
    """Tasks run one after another in this process (``--workers 1``): no start-up cost, no
    isolation; a task's exception still comes back naming the task."""

    kind = "inline"
    workers = 1

    def describe(self) -> str:
        return "this process"

    def share(self, value) -> Shared:  # noqa: ANN001
        return Shared(uuid.uuid4().hex, value=value)

    def map(self, tasks: Sequence[Task], on_done: Callable[[Task], None] | None = None) -> list:
        results = []
        for task in tasks:
            try:
                results.append(_call(task))
            except Exception as exc:  # noqa: BLE001 - every failure is reported with the task's name
                raise task_failed(task, exc) from None
            if on_done is not None:
                on_done(task)
        return results
