"""How samples reach a worker: by path (shared storage) or shipped by the driver.

By path, a task gets the data folder and reads only its own shard's files; every node must
see the folder at the same path (NFS, a bucket mount). When the data lives only where the
driver runs, ``ship`` loads each shard's samples in the driver into a ``HeldDataset`` and the
executor puts it in Ray's object store; the worker reads the arrays from there. A held shard
keeps the samples' global positions, so batching, sharding and labels are those of the folder.
"""

from __future__ import annotations

import copy

from qtool.data import Dataset, Feed
from qtool.errors import DataError


class HeldDataset(Dataset):
    """A Dataset whose samples at ``positions`` were read already (arrays held in memory)."""

    held: dict[int, Feed]
    held_labels: object

    @classmethod
    def of(cls, dataset: Dataset, positions) -> HeldDataset:  # noqa: ANN001 - an iterable of ints
        clone = copy.copy(dataset)
        clone.__class__ = cls
        clone.held = {i: dataset.load_sample(i) for i in positions}
        clone.held_labels = dataset.labels()  # read here: the worker may not see the folder
        return clone

    def load_sample(self, index: int) -> Feed:
        if index not in self.held:
            raise DataError(f"sample {index} was not shipped with this shard",
                            "ship every sample the shard reads (qtool.executors.data.shard_positions)")
        return self.held[index]

    def labels(self):  # noqa: ANN201 - the labels array or None
        return self.held_labels


def shard_positions(count: int, batch_size: int, shard: tuple[int, int]) -> list[int]:
    """The sample positions shard (i, n) reads: every n-th batch of ``batch_size`` from i,
    exactly as Dataset.batches selects them."""
    index, n = shard
    batch_size = max(1, batch_size)
    return [p for g, start in enumerate(range(0, count, batch_size)) if g % n == index
            for p in range(start, min(start + batch_size, count))]


def effective_batch_size(dataset: Dataset, batch_size: int) -> int:
    """1 for a model with a fixed batch dimension (Dataset.batches feeds those one by one)."""
    if batch_size > 1 and any(not s.batch_dynamic for s in dataset.inputs if s.shape):
        return 1
    return max(1, batch_size)
